// Conversations kept in this browser, in localStorage.
//
// Why localStorage and not IndexedDB: it is synchronous, so the page can save a reply that is
// cut short in `pagehide` (an IndexedDB transaction started there is not guaranteed to commit),
// and every read is one call with no open/upgrade/version dance. Chat text is small: a
// 27,000-character prompt is ~54 KB of the origin's ~5 MB; when the quota is reached the page
// says so (StorageFull) and the user can export and delete old conversations.
//
// Layout: an index (KEY_INDEX: [{id, title, renamed, created, updated, model}]) and one key per
// conversation's messages (KEY_PREFIX + id), so saving a reply rewrites only its conversation.
// `model` is the model the conversation talks to ("" = not chosen: the last model picked, else
// the server's default); entries saved before it existed have none and mean the same.
// Anything read back is checked: a hand-edited or old entry is dropped, never trusted.

const KEY_INDEX = "edison.conversations.v2";
const KEY_PREFIX = "edison.conversation.v2.";
const KEY_CURRENT = "edison.current.v2";
/** The single conversation of earlier versions of the page; migrated into the list on load. */
export const KEY_V1 = "edison.conversation.v1";
const MODE_KEY = "edison.mode";
/** The model picked last, for conversations that have not chosen one. */
const MODEL_KEY = "edison.model";
const STATES = new Set(["done", "stopped", "error"]);
const TITLE_CHARS = 60;

/** Saving failed because the browser's storage for this site is full. */
export class StorageFull extends Error {}

function read(key) {
  try {
    return localStorage.getItem(key);
  } catch (err) {
    console.warn("localStorage unavailable; conversations will not survive a reload", err);
    return null;
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch (err) {
    if (err?.name === "QuotaExceededError") throw new StorageFull("this browser's storage for the page is full");
    console.warn(`Could not save ${key}`, err);
  }
}

function parseJson(raw, what) {
  if (!raw) return null;
  try {
    return JSON.parse(raw);
  } catch (err) {
    console.warn(`Stored ${what} unreadable; ignored`, err);
    return null;
  }
}

/** A checked copy of a stored or imported message, or null. */
export function cleanMessage(m) {
  if (!m || typeof m !== "object" || (m.role !== "user" && m.role !== "assistant") || typeof m.content !== "string") {
    return null;
  }
  const str = (v) => (typeof v === "string" ? v : "");
  const out = {
    role: m.role,
    content: m.content,
    // "streaming" was saved while a reply was running: the page was closed mid-reply.
    state: STATES.has(m.state) ? m.state : m.state === "streaming" ? "stopped" : "done",
    mode: str(m.mode),
    model: str(m.model),
    error: str(m.error),
    finish: str(m.finish),
    stopNote: str(m.stopNote),
    stoppedBy: str(m.stoppedBy),
  };
  if (m.stats && typeof m.stats === "object") {
    const n = (v) => (Number.isFinite(v) ? v : null);
    out.stats = { ttftMs: n(m.stats.ttftMs), tokens: n(m.stats.tokens), perSecond: n(m.stats.perSecond) };
  }
  return out;
}

export function cleanMessages(list) {
  return Array.isArray(list) ? list.map(cleanMessage).filter(Boolean) : [];
}

/** A title from the first user message: one line, at most TITLE_CHARS characters. */
export function titleFrom(messages) {
  const first = messages.find((m) => m.role === "user" && m.content.trim());
  if (!first) return "New chat";
  const line = first.content.trim().replace(/\s+/g, " ");
  return line.length > TITLE_CHARS ? `${line.slice(0, TITLE_CHARS - 1)}…` : line;
}

function newId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

/** A conversation: metadata plus its messages (loaded on demand). */
export function newConversation(messages = [], title = "", model = "") {
  const now = Date.now();
  return { id: newId(), title: title || titleFrom(messages), renamed: Boolean(title), created: now, updated: now, model, messages };
}

export function loadIndex() {
  const parsed = parseJson(read(KEY_INDEX), "conversation list");
  if (!Array.isArray(parsed)) return [];
  return parsed
    .filter((c) => c && typeof c.id === "string" && typeof c.title === "string")
    .map((c) => ({
      id: c.id, title: c.title, renamed: Boolean(c.renamed),
      created: Number(c.created) || 0, updated: Number(c.updated) || 0,
      model: typeof c.model === "string" ? c.model : "", messages: null,
    }));
}

export function saveIndex(conversations) {
  write(KEY_INDEX, JSON.stringify(conversations.map(({ id, title, renamed, created, updated, model }) => ({
    id, title, renamed, created, updated, model: model || "",
  }))));
}

/** The conversation's messages, read from storage the first time they are needed. */
export function messagesOf(conversation) {
  if (!conversation.messages) conversation.messages = cleanMessages(parseJson(read(KEY_PREFIX + conversation.id), "conversation"));
  return conversation.messages;
}

/** Saves one conversation's messages and the index (its title and time may have changed). */
export function saveConversation(conversation, conversations) {
  if (!conversation.renamed) conversation.title = titleFrom(conversation.messages || []);
  conversation.updated = Date.now();
  write(KEY_PREFIX + conversation.id, JSON.stringify(conversation.messages || []));
  saveIndex(conversations);
}

export function removeConversation(conversation, conversations) {
  try {
    localStorage.removeItem(KEY_PREFIX + conversation.id);
  } catch {
    // nothing stored to remove
  }
  saveIndex(conversations);
}

export function loadCurrentId() {
  return read(KEY_CURRENT) || "";
}

export function saveCurrentId(id) {
  try {
    write(KEY_CURRENT, id);
  } catch {
    // only the selection is lost
  }
}

/**
 * The single conversation of the previous page (KEY_V1) becomes a conversation in the list,
 * then the old key is removed. Returns the new conversation, or null when there was none.
 */
export function migrateV1(conversations) {
  const raw = read(KEY_V1);
  if (raw === null) return null;
  const messages = cleanMessages(parseJson(raw, "old conversation"));
  let migrated = null;
  if (messages.length) {
    migrated = newConversation(messages);
    conversations.unshift(migrated);
    saveConversation(migrated, conversations);
    console.log(`Migrated the old conversation (${messages.length} messages) into the list`);
  }
  try {
    localStorage.removeItem(KEY_V1);
  } catch {
    // read-only storage: it will be migrated again next time, harmlessly
  }
  return migrated;
}

/**
 * The `history` the server gets: user/assistant turns with text. A user message whose
 * reply failed with no text is left out, so the model never sees two user turns in a row.
 */
export function historyForServer(messages) {
  const turns = [];
  for (let i = 0; i < messages.length; i++) {
    const m = messages[i];
    if (m.role === "user") {
      const reply = messages[i + 1];
      if (reply && reply.role === "assistant" && reply.content) turns.push({ role: "user", content: m.content });
    } else if (m.content && turns.length && turns[turns.length - 1].role === "user") {
      turns.push({ role: "assistant", content: m.content });
    }
  }
  return turns;
}

export function loadMode() {
  return read(MODE_KEY) || "";
}

export function saveMode(mode) {
  try {
    write(MODE_KEY, mode);
  } catch {
    // the choice just will not survive a reload
  }
}

export function loadModel() {
  return read(MODEL_KEY) || "";
}

export function saveModel(model) {
  try {
    write(MODEL_KEY, model);
  } catch {
    // the choice just will not survive a reload
  }
}
