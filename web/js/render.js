// Safe rendering of model and user text.
//
// Replies are Markdown, parsed by marked (GFM: lists, tables, code, links) and then cleaned by
// DOMPurify into a DOM fragment; nothing from the model reaches innerHTML. Two rules on top of
// DOMPurify's defaults, because a model can be steered by whatever it read:
// - raw HTML in the Markdown is shown as text (marked's `html` renderer escapes it), so
//   "<b>x</b>" or "<img onerror>" from a model is visible, never markup;
// - images are never loaded (a URL in a reply must not make the browser fetch anything by
//   itself): an image becomes a plain link "image: alt". Links open in a new tab, without
//   the opener; `javascript:` and other non-web URLs lose their href (DOMPurify's URI rule).
// User messages are plain text: what was typed is what is shown.

import { Marked } from "../vendor/marked/marked.esm.js";
import DOMPurify from "../vendor/dompurify/purify.es.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

const markdown = new Marked({
  gfm: true,
  breaks: true, // a single newline is a line break, as models write it
  async: false,
  renderer: {
    html(token) {
      const text = escapeHtml(token.text);
      return token.block ? `<p>${text}</p>` : text;
    },
    image(token) {
      return `<a href="${escapeHtml(token.href || "")}">image: ${escapeHtml(token.text || token.href || "")}</a>`;
    },
  },
});

const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  FORBID_TAGS: ["img", "picture", "source", "video", "audio", "iframe", "object", "embed", "svg", "math",
    "style", "form", "input", "button", "textarea", "select"],
  FORBID_ATTR: ["style", "id", "name"],
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    if (node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    } else {
      node.classList.add("dead-link"); // its URL was not safe to keep
    }
  }
});

/** A reply's Markdown as a sanitised DOM fragment, code blocks labelled and copyable. */
export function renderMarkdown(text) {
  const fragment = DOMPurify.sanitize(markdown.parse(text), PURIFY);
  for (const pre of fragment.querySelectorAll("pre")) wrapCode(pre);
  for (const table of fragment.querySelectorAll("table")) {
    const wrap = el("div", "table-wrap");
    table.replaceWith(wrap);
    wrap.append(table);
  }
  return fragment;
}

/** A code block gets a bar with its language (or "code") and a Copy button. */
function wrapCode(pre) {
  const code = pre.querySelector("code");
  const tail = code?.lastChild;
  if (tail?.nodeType === Node.TEXT_NODE) tail.data = tail.data.replace(/\n$/, ""); // marked ends every block with one
  const language = /(?:^|\s)language-([\w+#.-]{1,30})/.exec(code?.className || "")?.[1] || "";
  const block = el("div", "codeblock");
  const bar = el("div", "codebar");
  bar.append(el("span", "lang", language || "code"));
  const copy = el("button", "copy-code quiet small", "Copy");
  copy.type = "button";
  copy.setAttribute("aria-label", `Copy the ${language || "code"} block`);
  bar.append(copy);
  pre.replaceWith(block);
  block.append(bar, pre);
}

/** Plain text as paragraphs-in-one (white-space: pre-wrap in CSS). */
export function renderPlain(text) {
  return el("div", "plain", text);
}

/** An element with the given class and text content. */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
