// Export and import of conversations: JSON (everything the page keeps, round-trips exactly)
// and Markdown (for reading and sharing; imports back as text, without reply states).

import { cleanMessages, newConversation, titleFrom } from "./store.js";

const FORMAT = "edison.conversations";
const HEADINGS = { user: "## You", assistant: "## Edison" };
const HEADING_ROLE = /^## (You|Edison)[ \t]*$/;

/** The JSON export of `conversations` (each with its messages loaded). */
export function toJson(conversations) {
  return JSON.stringify({
    format: FORMAT,
    version: 1,
    exported: new Date().toISOString(),
    conversations: conversations.map((c) => ({
      title: c.title, renamed: c.renamed, created: c.created, updated: c.updated, model: c.model || "", messages: c.messages,
    })),
  }, null, 2);
}

/** One conversation as Markdown: its title, then "## You" / "## Edison" sections. */
export function toMarkdown(conversation) {
  const parts = [`# ${conversation.title}`];
  for (const m of conversation.messages) {
    let text = m.content.trim() || (m.role === "assistant" ? "_(empty reply)_" : "");
    if (m.role === "assistant" && m.state === "stopped") text += "\n\n_(stopped)_";
    if (m.role === "assistant" && m.state === "error") text += `\n\n_(error: ${m.error})_`;
    parts.push(`${HEADINGS[m.role]}\n\n${text}`);
  }
  return `${parts.join("\n\n")}\n`;
}

/** Conversations read from an export (JSON or Markdown); throws an Error saying what is wrong. */
export function parseImport(text, fileName = "") {
  const trimmed = text.trimStart();
  if (fileName.endsWith(".json") || trimmed.startsWith("{") || trimmed.startsWith("[")) return fromJson(text);
  return [fromMarkdown(text)];
}

function fromJson(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new Error(`not valid JSON (${err.message})`);
  }
  // A list of messages is the old single-conversation format (edison.conversation.v1).
  const list = Array.isArray(data) ? [{ messages: data }]
    : data?.format === FORMAT && Array.isArray(data.conversations) ? data.conversations
      : data && Array.isArray(data.messages) ? [data] : null;
  if (!list) throw new Error("not an Edison export: expected {\"format\": \"edison.conversations\", …}");
  const out = [];
  for (const item of list) {
    const messages = cleanMessages(item?.messages);
    if (!messages.length) continue;
    const conversation = withTitle(newConversation(messages), item.title);
    if (Number.isFinite(item.created)) conversation.created = item.created;
    if (typeof item.model === "string") conversation.model = item.model;
    out.push(conversation);
  }
  if (!out.length) throw new Error("the file holds no conversation with messages");
  return out;
}

function fromMarkdown(text) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let title = "";
  const messages = [];
  let current = null;
  for (const line of lines) {
    const heading = HEADING_ROLE.exec(line);
    if (heading) {
      current = { role: heading[1] === "You" ? "user" : "assistant", content: "", state: "done" };
      messages.push(current);
    } else if (current) {
      current.content += `${line}\n`;
    } else if (!title && line.startsWith("# ")) {
      title = line.slice(2).trim();
    }
  }
  for (const m of messages) {
    m.content = m.content.trim();
    if (m.role === "assistant" && /\n*_\(stopped\)_$/.test(m.content)) {
      m.content = m.content.replace(/\n*_\(stopped\)_$/, "");
      m.state = "stopped";
    }
    if (m.content === "_(empty reply)_") m.content = "";
  }
  const clean = cleanMessages(messages);
  if (!clean.length) throw new Error("no \"## You\" or \"## Edison\" section found in the Markdown");
  return withTitle(newConversation(clean), title);
}

/** An imported title is kept; it counts as a rename unless it is the one the page would give. */
function withTitle(conversation, title) {
  const clean = typeof title === "string" ? title.trim().replace(/\s+/g, " ").slice(0, 200) : "";
  if (clean && clean !== titleFrom(conversation.messages)) {
    conversation.title = clean;
    conversation.renamed = true;
  }
  return conversation;
}

/** Offers `text` as a file download. */
export function download(fileName, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = fileName;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** A file name from a title: letters, digits and dashes. */
export function fileNameFor(title, extension) {
  const stem = title.toLowerCase().replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-+|-+$/g, "").slice(0, 50) || "conversation";
  return `edison-${stem}.${extension}`;
}
