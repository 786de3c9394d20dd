// The conversation list: new, switch, rename, delete (with undo), search, export and import.
// It owns the list and which conversation is open; app.js owns what happens inside one.

import { el } from "./render.js";
import {
  StorageFull, loadCurrentId, loadIndex, messagesOf, migrateV1, newConversation, removeConversation,
  saveConversation, saveCurrentId, saveIndex,
} from "./store.js";
import { download, fileNameFor, parseImport, toJson, toMarkdown } from "./transfer.js";

const UNDO_MS = 10_000;
const SNIPPET_CHARS = 70;

const $ = (id) => document.getElementById(id);

export class Sidebar {
  /**
   * hooks: open(conversation) shows it; busyIn(conversation) says whether a reply is running
   * there; stopIn(conversation) stops it; notify(text, undo?, ms?) shows a message (with Undo).
   */
  constructor(hooks) {
    this.hooks = hooks;
    this.list = loadIndex();
    const migrated = migrateV1(this.list);
    const id = migrated ? migrated.id : loadCurrentId();
    this.current = this.list.find((c) => c.id === id) || this.latest() || newConversation();
    if (this.list.includes(this.current)) saveCurrentId(this.current.id);
    this.query = "";
    this.wire();
  }

  latest() {
    return [...this.list].sort((a, b) => b.updated - a.updated)[0] || null;
  }

  /** The open conversation, its messages loaded. */
  get conversation() {
    messagesOf(this.current);
    return this.current;
  }

  /** Saves `conversation` (adding it to the list on its first message); says so when storage is full. */
  save(conversation) {
    if (conversation.deleted) return; // a reply that ends after its conversation was deleted
    if (!this.list.includes(conversation)) this.list.unshift(conversation);
    if (conversation === this.current) saveCurrentId(conversation.id);
    try {
      saveConversation(conversation, this.list);
    } catch (err) {
      if (!(err instanceof StorageFull)) throw err;
      this.hooks.notify(`Not saved: ${err.message}. Export and delete old conversations to make room.`);
    }
    this.render();
  }

  select(conversation) {
    this.current = conversation;
    messagesOf(conversation);
    if (this.list.includes(conversation)) saveCurrentId(conversation.id);
    this.render();
    this.hooks.open(conversation);
    this.setOpen(false);
  }

  newChat() {
    if (this.current.messages?.length || this.list.includes(this.current)) this.select(newConversation());
    else this.setOpen(false); // already a fresh one
    $("input").focus();
  }

  rename(conversation, title) {
    const clean = title.trim().replace(/\s+/g, " ").slice(0, 200);
    if (!clean || clean === conversation.title) return;
    conversation.title = clean;
    conversation.renamed = true;
    saveIndex(this.list);
    this.render();
  }

  /** Remembers the model `conversation` talks to; it keeps its place in the list. */
  setModel(conversation, model) {
    if (conversation.model === model) return;
    conversation.model = model;
    if (this.list.includes(conversation)) saveIndex(this.list);
  }

  delete(conversation) {
    this.hooks.stopIn(conversation);
    const position = this.list.indexOf(conversation);
    messagesOf(conversation);
    this.list.splice(position, 1);
    conversation.deleted = true;
    removeConversation(conversation, this.list);
    const wasCurrent = conversation === this.current;
    if (wasCurrent) this.select(this.latest() || newConversation());
    else this.render();
    // The focused Delete button is gone: focus the list's first entry (or New chat).
    ($("conversations").querySelector(".conv-open") || $("new-chat")).focus();
    this.hooks.notify(`Deleted “${conversation.title}”.`, () => {
      conversation.deleted = false;
      this.list.splice(Math.min(position, this.list.length), 0, conversation);
      const keepTime = conversation.updated;
      this.save(conversation);
      conversation.updated = keepTime; // undo puts it back where it was, not on top
      saveIndex(this.list);
      if (wasCurrent) this.select(conversation);
      else this.render();
    }, UNDO_MS);
  }

  /** Conversations matching the search (title or any message), newest first, with a snippet. */
  matches() {
    const q = this.query.trim().toLowerCase();
    const sorted = [...this.list].sort((a, b) => b.updated - a.updated);
    if (!q) return sorted.map((c) => ({ conversation: c, snippet: "" }));
    const out = [];
    for (const c of sorted) {
      const hit = messagesOf(c).find((m) => m.content.toLowerCase().includes(q));
      if (c.title.toLowerCase().includes(q) || hit) out.push({ conversation: c, snippet: hit ? snippet(hit.content, q) : "" });
    }
    return out;
  }

  render() {
    const ul = $("conversations");
    const found = this.matches();
    ul.replaceChildren(...found.map(({ conversation, snippet: text }) => this.item(conversation, text)));
    const note = $("search-count");
    if (this.query.trim()) note.textContent = `${found.length} of ${this.list.length} conversation${this.list.length === 1 ? "" : "s"} match`;
    else note.textContent = this.list.length ? "" : "No saved conversations yet.";
    $("chat-title").textContent = this.current.title;
    document.title = this.current.messages?.length ? `${this.current.title} · Edison` : "Edison";
  }

  item(conversation, snippetText) {
    const li = el("li", "conv");
    li.dataset.id = conversation.id;
    if (conversation === this.current) li.setAttribute("aria-current", "true");
    if (this.hooks.busyIn(conversation)) li.classList.add("busy");
    const open = el("button", "conv-open");
    open.type = "button";
    open.append(el("span", "conv-title", conversation.title));
    if (snippetText) open.append(el("span", "conv-snippet", snippetText));
    if (conversation === this.current) open.setAttribute("aria-current", "true"); // read out on the focusable part
    open.addEventListener("click", () => this.select(conversation));
    const rename = el("button", "conv-rename quiet small", "Rename");
    rename.type = "button";
    rename.setAttribute("aria-label", `Rename “${conversation.title}”`);
    rename.addEventListener("click", () => this.startRename(li, conversation));
    const del = el("button", "conv-delete quiet small", "Delete");
    del.type = "button";
    del.setAttribute("aria-label", `Delete “${conversation.title}”`);
    del.addEventListener("click", () => this.delete(conversation));
    li.append(open, el("div", "conv-actions"));
    li.lastChild.append(rename, del);
    return li;
  }

  startRename(li, conversation) {
    const input = el("input", "rename-input");
    input.value = conversation.title;
    input.setAttribute("aria-label", "New name: Enter saves, Esc cancels");
    let done = false;
    const finish = (keep) => {
      if (done) return;
      done = true;
      if (keep) this.rename(conversation, input.value);
      this.render();
      this.list.includes(conversation) && $("conversations").querySelector(`[data-id="${conversation.id}"] .conv-open`)?.focus();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); finish(true); }
      if (event.key === "Escape") { event.preventDefault(); event.stopPropagation(); finish(false); }
    });
    input.addEventListener("blur", () => finish(true));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }

  exportCurrent(kind) {
    const c = this.conversation;
    if (!c.messages.length) {
      this.hooks.notify("Nothing to export: this conversation is empty.");
      return;
    }
    if (kind === "md") download(fileNameFor(c.title, "md"), toMarkdown(c), "text/markdown");
    else download(fileNameFor(c.title, "json"), toJson([c]), "application/json");
  }

  exportAll() {
    if (!this.list.length) {
      this.hooks.notify("Nothing to export yet.");
      return;
    }
    this.list.forEach(messagesOf);
    download("edison-conversations.json", toJson(this.list), "application/json");
  }

  async importFile(file) {
    try {
      const imported = parseImport(await file.text(), file.name);
      for (const c of imported) this.save(c);
      this.select(imported[0]);
      this.hooks.notify(`Imported ${imported.length} conversation${imported.length === 1 ? "" : "s"} from ${file.name}.`);
    } catch (err) {
      this.hooks.notify(`Could not import ${file.name}: ${err.message}`);
    }
  }

  /** The list as an overlay on a narrow screen. */
  setOpen(open) {
    document.body.classList.toggle("sidebar-open", open);
    $("sidebar-toggle").setAttribute("aria-expanded", String(open));
  }

  wire() {
    $("new-chat").addEventListener("click", () => this.newChat());
    $("search").addEventListener("input", (event) => { this.query = event.target.value; this.render(); });
    $("export-md").addEventListener("click", () => this.exportCurrent("md"));
    $("export-json").addEventListener("click", () => this.exportCurrent("json"));
    $("export-all").addEventListener("click", () => this.exportAll());
    $("import").addEventListener("click", () => $("import-file").click());
    $("import-file").addEventListener("change", (event) => {
      const [file] = event.target.files;
      event.target.value = "";
      if (file) this.importFile(file);
    });
    $("sidebar-toggle").addEventListener("click", () => {
      const open = !document.body.classList.contains("sidebar-open");
      this.setOpen(open);
      if (open) $("new-chat").focus();
    });
    $("sidebar").addEventListener("keydown", (event) => {
      if (event.key === "Escape" && document.body.classList.contains("sidebar-open")) {
        this.setOpen(false);
        $("sidebar-toggle").focus();
      }
    });
  }
}

function snippet(text, q) {
  const flat = text.replace(/\s+/g, " ");
  const at = flat.toLowerCase().indexOf(q);
  const start = Math.max(0, at - 20);
  const cut = flat.slice(start, start + SNIPPET_CHARS);
  return `${start > 0 ? "…" : ""}${cut}${start + SNIPPET_CHARS < flat.length ? "…" : ""}`;
}
