// The conversation, kept in localStorage so a reload keeps it. Anything read back is
// checked: a hand-edited or old entry is dropped, never trusted.

const KEY = "edison.conversation.v1";
const MODE_KEY = "edison.mode";
const STATES = new Set(["done", "stopped", "error"]);

function valid(m) {
  return (
    m && typeof m === "object" &&
    (m.role === "user" || m.role === "assistant") &&
    typeof m.content === "string"
  );
}

export function loadConversation() {
  let raw;
  try {
    raw = localStorage.getItem(KEY);
  } catch (err) {
    console.warn("localStorage unavailable; history will not survive a reload", err);
    return [];
  }
  if (!raw) return [];
  try {
    const parsed = JSON.parse(raw);
    if (!Array.isArray(parsed)) throw new Error("not a list");
    return parsed.filter(valid).map((m) => ({
      role: m.role,
      content: m.content,
      state: STATES.has(m.state) ? m.state : "done",
      mode: typeof m.mode === "string" ? m.mode : "",
      error: typeof m.error === "string" ? m.error : "",
      finish: typeof m.finish === "string" ? m.finish : "",
    }));
  } catch (err) {
    console.warn("Stored conversation unreadable; starting a new one", err);
    return [];
  }
}

export function saveConversation(messages) {
  try {
    localStorage.setItem(KEY, JSON.stringify(messages));
  } catch (err) {
    console.warn("Could not save the conversation", err);
  }
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
  try {
    return localStorage.getItem(MODE_KEY) || "";
  } catch {
    return "";
  }
}

export function saveMode(mode) {
  try {
    localStorage.setItem(MODE_KEY, mode);
  } catch {
    // the choice just will not survive a reload
  }
}
