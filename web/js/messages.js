// One message as DOM: who, body (Markdown for replies, plain text for the user), its state
// line, small print (mode, model, speed) and its buttons (copy, regenerate, edit, show all).

import { el, renderMarkdown, renderPlain } from "./render.js";
import { statsLine } from "./phases.js";

/** A user message longer than this (characters or lines) is collapsed behind "Show all". */
const COLLAPSE_CHARS = 1200;
const COLLAPSE_LINES = 14;

/** Replies name their model in small print only when the server offers more than one. */
let namingModels = false;

/** Whether replies name their model; true if it changed (the caller then renders again). */
export function nameModels(on) {
  const changed = namingModels !== Boolean(on);
  namingModels = Boolean(on);
  return changed;
}

/** A message's view; `last` marks the conversation's last reply (it gets Regenerate). */
export function messageView(message, index, { last = false } = {}) {
  const view = el("article", `msg ${message.role}`);
  view.dataset.role = message.role;
  view.dataset.index = String(index);
  view.setAttribute("aria-label", message.role === "user" ? "Your message" : "Edison's reply");
  view.append(el("h2", "who", message.role === "user" ? "You" : "Edison"), el("div", "body"),
    el("p", "state"), el("p", "meta"), el("div", "actions"));
  fill(view, message, { last });
  return view;
}

function button(className, text, label) {
  const b = el("button", `${className} quiet small`, text);
  b.type = "button";
  if (label) b.setAttribute("aria-label", label);
  return b;
}

/** Shows a finished (or stored) message: its body, state, small print and buttons. */
export function fill(view, message, { last = false } = {}) {
  const body = view.querySelector(".body");
  const state = view.querySelector(".state");
  const meta = view.querySelector(".meta");
  const actions = view.querySelector(".actions");
  view.dataset.state = message.state || "done";
  view.removeAttribute("data-empty");
  if (message.model) view.dataset.model = message.model;
  state.textContent = "";
  meta.textContent = "";
  actions.replaceChildren();
  if (message.role === "user") {
    fillUser(view, body, actions, message);
    return;
  }
  body.replaceChildren(renderMarkdown(message.content));
  const empty = !message.content.trim();
  if (message.state === "stopped") {
    state.textContent = `stopped ${message.stopNote || ""}`.trim();
  } else if (message.state === "error") {
    state.textContent = `Error: ${message.error || "unknown error"}`;
  } else if (empty) {
    view.dataset.empty = "true";
    state.textContent = "Empty reply: the model ended without writing any text.";
  }
  const parts = [];
  if (message.mode) parts.push(`mode: ${message.mode}`);
  if (namingModels && message.model) parts.push(`model: ${message.model}`);
  if (message.finish) parts.push(message.finish);
  if (message.state === "stopped" && message.stoppedBy) parts.push(`stop tier: ${message.stoppedBy}`);
  const speed = statsLine(message.stats);
  if (speed) parts.push(speed);
  meta.textContent = parts.join(" · ");
  if (!empty) actions.append(button("copy-reply", "Copy", "Copy this reply"));
  if (last) actions.append(button("regenerate", "Regenerate", "Regenerate this reply"));
}

function fillUser(view, body, actions, message) {
  const text = renderPlain(message.content);
  text.id = `text-${view.dataset.index}-${Math.random().toString(36).slice(2, 8)}`;
  body.replaceChildren(text);
  const lines = message.content.split("\n").length;
  if (message.content.length > COLLAPSE_CHARS || lines > COLLAPSE_LINES) {
    view.classList.add("long", "collapsed");
    const toggle = button("show-all", "", "");
    toggle.setAttribute("aria-controls", text.id);
    setCollapsed(view, toggle, true, message.content.length);
    actions.append(toggle);
  }
  actions.append(button("edit", "Edit", "Edit this message and send it again"));
}

/** Collapses or expands a long user message. */
export function setCollapsed(view, toggle, collapsed, chars) {
  view.classList.toggle("collapsed", collapsed);
  toggle.setAttribute("aria-expanded", String(!collapsed));
  toggle.textContent = collapsed ? `Show all (${chars.toLocaleString("en")} characters)` : "Show less";
  toggle.removeAttribute("aria-label");
}

/** Turns a user message into an editor; `onSend(text)` / `onCancel()` end it. */
export function startEdit(view, message, onSend, onCancel) {
  const body = view.querySelector(".body");
  const actions = view.querySelector(".actions");
  view.classList.add("editing");
  view.classList.remove("collapsed");
  const box = el("textarea", "edit-box");
  box.value = message.content;
  box.rows = Math.min(12, Math.max(3, message.content.split("\n").length + 1));
  box.setAttribute("aria-label", "Edit your message: Enter sends, Shift+Enter adds a line, Esc cancels");
  const send = button("edit-send send", "Send", "Send the edited message; the replies after it are replaced");
  send.classList.remove("quiet");
  const cancel = button("edit-cancel", "Cancel");
  body.replaceChildren(box);
  actions.replaceChildren(cancel, send);
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      onSend(box.value);
    } else if (event.key === "Escape") {
      event.preventDefault();
      event.stopPropagation();
      onCancel();
    }
  });
  send.addEventListener("click", () => onSend(box.value));
  cancel.addEventListener("click", onCancel);
  box.focus();
  box.setSelectionRange(box.value.length, box.value.length);
}

/** Copies `text`: the async Clipboard API, or a hidden textarea where it is unavailable (plain http). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = el("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  if (!ok) throw new Error("the browser refused to copy");
}
