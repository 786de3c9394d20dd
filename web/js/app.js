// The chat page: conversation view, mode selector, Send/Stop, health line.
// It speaks the HTTP contract of docs/design.md: POST /chat/stream (SSE), POST /chat/cancel,
// GET /modes, GET /health. Tested in a real browser by tests/test_browser.py.
// With an API key on the server, auth.js asks for it on the first 401 and sends it from then on.

import { AuthError, authFetch, authHeaders, onNewKey } from "./auth.js";
import { ConnectionLost, HttpError, streamEvents } from "./sse.js";
import { el, renderMarkdown } from "./render.js";
import { historyForServer, loadConversation, loadMode, saveConversation, saveMode } from "./store.js";

const HEALTH_EVERY_MS = 4000;

const $ = (id) => document.getElementById(id);
const log = $("log");
const input = $("input");
const sendButton = $("send");
const modeSelect = $("mode");

let conversation = loadConversation();
/** Whether the reader is at the end of the conversation; if so, new text keeps it there. */
let pinned = true;
/** The reply being streamed, or null when idle. */
let turn = null;
/** GET /modes failed: tried again when a key is entered. */
let modesFailed = false;

// Rendering.

function messageView(message) {
  const view = el("article", `msg ${message.role}`);
  view.dataset.role = message.role;
  view.dataset.state = message.state || "done";
  view.append(el("h2", "who", message.role === "user" ? "You" : "Edison"));
  const body = el("div", "body");
  view.append(body, el("p", "state"), el("p", "meta"));
  view.setAttribute("aria-label", message.role === "user" ? "Your message" : "Edison's reply");
  fill(view, message);
  return view;
}

/** Shows a finished (or stored) message: Markdown body, then its state and error. */
function fill(view, message) {
  const body = view.querySelector(".body");
  body.replaceChildren(renderMarkdown(message.content));
  view.dataset.state = message.state || "done";
  const state = view.querySelector(".state");
  const meta = view.querySelector(".meta");
  state.textContent = "";
  meta.textContent = "";
  if (message.role !== "assistant") return;
  if (message.state === "stopped") state.textContent = "stopped";
  if (message.state === "error") state.textContent = `Error: ${message.error || "unknown error"}`;
  const parts = [];
  if (message.mode) parts.push(`mode: ${message.mode}`);
  if (message.finish) parts.push(message.finish);
  meta.textContent = parts.join(" · ");
}

/** Scrolls the conversation to its end, now and after the next layout. */
function scrollToEnd() {
  log.scrollTop = log.scrollHeight;
  requestAnimationFrame(() => { log.scrollTop = log.scrollHeight; });
}

function append(view) {
  $("empty").hidden = true;
  log.append(view);
  scrollToEnd();
}

function renderConversation() {
  log.querySelectorAll(".msg").forEach((m) => m.remove());
  $("empty").hidden = conversation.length > 0;
  for (const message of conversation) log.append(messageView(message));
  scrollToEnd();
}

// One turn: send, stream, stop.

function setBusy(busy) {
  sendButton.textContent = busy ? "Stop" : "Send";
  sendButton.dataset.action = busy ? "stop" : "send";
  sendButton.classList.toggle("stop", busy);
  sendButton.setAttribute("aria-label", busy ? "Stop the reply (Esc)" : "Send (Enter)");
  document.body.classList.toggle("streaming", busy);
}

function showPhase(text) {
  turn.view.querySelector(".state").textContent = text;
}

function onEvent(name, data) {
  const t = turn;
  if (name === "init") {
    t.requestId = data.request_id;
    console.log(`Streaming request started: ${data.request_id}`);
    t.view.dataset.requestId = data.request_id;
    refreshHealth();
  } else if (name === "queued") {
    if (!t.tokens) { t.view.dataset.state = "queued"; showPhase(`queued, position ${data.position}`); }
  } else if (name === "progress") {
    if (!t.tokens && data.total) {
      t.view.dataset.state = "prefill";
      showPhase(`reading prompt ${Math.floor((100 * data.done) / data.total)} %`);
    }
  } else if (name === "token") {
    if (!t.tokens) { showPhase(""); t.view.dataset.state = "streaming"; }
    t.tokens += 1;
    t.reply.content += data.t;
    // A text node: model output is never parsed as HTML. Leading blanks are not shown.
    t.text.appendData(t.text.length ? data.t : data.t.trimStart());
    t.view.dataset.tokens = String(t.tokens);
    if (pinned) log.scrollTop = log.scrollHeight;
  } else if (name === "done") {
    t.reply.mode = data.mode_used || t.reply.mode;
    if (data.ok) {
      t.reply.content = data.response ?? t.reply.content;
      t.reply.state = "done";
      t.reply.finish = data.finish_reason === "length" ? "cut at the length limit" : "";
    } else if (data.stopped) {
      t.reply.content = data.response ?? t.reply.content;
      t.reply.state = "stopped";
    } else {
      t.reply.state = "error";
      t.reply.error = data.error || "the server reported a failure without a reason";
    }
  }
}

async function send() {
  const text = input.value;
  if (turn || !text.trim()) return;
  const mode = modeSelect.disabled ? undefined : modeSelect.value;
  const history = historyForServer(conversation);
  const user = { role: "user", content: text, state: "done" };
  conversation.push(user);
  saveConversation(conversation);
  append(messageView(user));
  input.value = "";

  const reply = { role: "assistant", content: "", state: "streaming", mode: mode || "", error: "" };
  const view = messageView(reply);
  view.dataset.state = "waiting";
  view.dataset.tokens = "0";
  view.setAttribute("aria-busy", "true"); // screen readers announce the reply once, when it ends
  const live = document.createTextNode("");
  const body = view.querySelector(".body");
  body.replaceChildren(el("p", "live"));
  body.firstChild.append(live);
  append(view);
  turn = { reply, view, text: live, tokens: 0, requestId: null, controller: new AbortController(), stopping: false, saved: false };
  showPhase("waiting for the server…");
  setBusy(true);

  const t = turn;
  try {
    const payload = { message: text, history };
    if (mode) payload.mode = mode;
    await streamEvents("/chat/stream", payload, t.controller.signal, onEvent);
  } catch (err) {
    if (t.stopping && err.name === "AbortError") {
      reply.state = "stopped";
    } else if (err instanceof AuthError) {
      reply.state = "error";
      reply.error = `${err.message}. Send again to enter the key.`;
    } else if (err instanceof HttpError) {
      reply.state = "error";
      reply.error = `the server answered ${err.status}: ${err.message}`;
    } else if (err instanceof ConnectionLost) {
      reply.state = "error";
      reply.error = err.message;
    } else {
      reply.state = "error";
      reply.error = `${err.name}: ${err.message}`;
      console.error("Unexpected failure while streaming", err);
    }
  } finally {
    if (reply.state === "error") console.error(`Request ${t.requestId ?? "(no id)"} failed: ${reply.error}`);
    if (!t.saved) conversation.push(reply);
    saveConversation(conversation);
    fill(view, reply);
    view.removeAttribute("aria-busy");
    view.dataset.tokens = String(t.tokens);
    if (pinned) scrollToEnd();
    turn = null;
    setBusy(false);
    refreshHealth();
    setTimeout(refreshHealth, 1000); // the server's bookkeeping settles just after the reply
    input.focus();
  }
}

/**
 * Stop: (1) tell the server to cancel this request id, (2) abort the fetch. Either alone
 * stops the model (a dropped connection is a cancel too); both make it certain.
 */
function stop() {
  const t = turn;
  if (!t || t.stopping) return;
  t.stopping = true;
  showPhase("stopping…");
  if (t.requestId) cancelOnServer(t.requestId);
  else console.log("Stop before the server named the request; aborting the connection cancels it");
  t.controller.abort();
}

async function cancelOnServer(requestId) {
  try {
    const response = await fetch("/chat/cancel", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }), // never asks: Stop must not wait
      body: JSON.stringify({ request_id: requestId }),
      keepalive: true, // still sent if the page is closing
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    // "not_found" means the request had already ended (our own disconnect may cancel it first).
    console.log(`Cancelled request ${requestId} on server (${answer.status})`);
  } catch (err) {
    console.error(`Cancel of request ${requestId} failed: ${err.message}`);
  }
}

// Modes and health.

async function loadModes() {
  modesFailed = false;
  try {
    const response = await authFetch("/modes", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const data = await response.json();
    const saved = loadMode();
    const names = data.modes.map((m) => m.name);
    modeSelect.replaceChildren(...data.modes.map((m) => {
      const option = el("option", "", m.name);
      option.value = m.name;
      option.title = m.description || "";
      option.dataset.description = m.description || "";
      return option;
    }));
    modeSelect.value = names.includes(saved) ? saved : data.default;
    modeSelect.disabled = false;
    describeMode();
  } catch (err) {
    modesFailed = true;
    modeSelect.replaceChildren(el("option", "", "server default"));
    $("mode-description").textContent = err instanceof AuthError
      ? `Could not load the modes: ${err.message}. Sending a message asks for the key again.`
      : `Could not load the modes (${err.message}); replies use the server's default mode.`;
    $("mode-description").classList.add("error");
    console.error("GET /modes failed", err);
  }
}

function describeMode() {
  const option = modeSelect.selectedOptions[0];
  $("mode-description").textContent = option?.dataset.description || "";
  $("mode-description").classList.remove("error");
}

async function refreshHealth() {
  const status = $("status");
  const text = $("status-text");
  try {
    const response = await fetch("/health", { cache: "no-store" });
    const h = await response.json();
    const w = h.workers || {};
    const counts = `workers ${w.ready ?? "?"}/${w.total ?? "?"} ready, ${w.busy ?? 0} busy · queue ${h.queue ?? 0} · active ${h.active_requests ?? 0}`;
    if (response.ok) {
      status.dataset.state = "ok";
      text.textContent = `ready · ${counts}`;
    } else {
      status.dataset.state = "down";
      text.textContent = `no worker ready (${response.status}) · ${counts}`;
    }
  } catch (err) {
    status.dataset.state = "down";
    text.textContent = `server unreachable (${err.message})`;
  }
}

// Wiring.

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  if (turn) stop();
  else send();
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    if (!turn) send();
  }
});

document.addEventListener("keydown", (event) => {
  // Escape in the key dialog cancels the dialog, not the reply.
  if (event.key === "Escape" && turn && !event.target.closest?.("dialog")) {
    event.preventDefault();
    stop();
  }
});

log.addEventListener("scroll", () => {
  pinned = log.scrollTop + log.clientHeight >= log.scrollHeight - 40;
});
// The log shrinks when the header grows (mode description) or the keyboard opens on a phone.
new ResizeObserver(() => { if (pinned) log.scrollTop = log.scrollHeight; }).observe(log);

modeSelect.addEventListener("change", () => {
  saveMode(modeSelect.value);
  describeMode();
});

$("clear").addEventListener("click", () => {
  if (turn) {
    turn.saved = true; // forgotten with the rest, not re-added when it ends
    stop();
  }
  conversation = [];
  saveConversation(conversation);
  renderConversation();
  input.focus();
});

// Leaving mid-reply: the server is told (keepalive), and the text so far is kept as stopped.
window.addEventListener("pagehide", () => {
  if (!turn) return;
  turn.reply.state = "stopped";
  conversation.push(turn.reply);
  turn.saved = true;
  saveConversation(conversation);
  stop();
});

onNewKey(() => { if (modesFailed) loadModes(); });

renderConversation();
setBusy(false);
loadModes();
refreshHealth();
setInterval(refreshHealth, HEALTH_EVERY_MS);
input.focus();
