// Safe rendering of model and user text. Nothing here assigns innerHTML: text only ever
// reaches the page through text nodes, so "<script>" in a reply is shown, never run.

/**
 * Minimal Markdown as DOM: ``` fenced code blocks and paragraphs separated by blank lines
 * (single newlines are kept by CSS `white-space: pre-wrap`).
 */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const parts = text.split(/^```[^\n]*$/m);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/^\n/, "").replace(/\n$/, "");
      pre.append(code);
      fragment.append(pre);
      return;
    }
    for (const block of part.split(/\n[ \t]*\n/)) {
      if (!block.trim()) continue;
      const p = document.createElement("p");
      p.textContent = block.trim();
      fragment.append(p);
    }
  });
  return fragment;
}

/** An element with the given class and text content. */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
