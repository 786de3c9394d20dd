// The chat page: the open conversation, Send/Stop, regenerate and edit, the health line.
// It speaks the HTTP contract of docs/design.md: POST /chat/stream (SSE), POST /chat/cancel,
// GET /modes, GET /models (models.js), GET /health. Tested in a real browser by tests/test_browser*.py.
// With an API key on the server, auth.js asks for it on the first 401 and sends it from then on.

import { AuthError, authFetch, authHeaders, onNewKey } from "./auth.js";
import { ConnectionLost, HttpError, streamEvents } from "./sse.js";
import { el } from "./render.js";
import { copyText, fill, messageView, nameModels, setCollapsed, startEdit } from "./messages.js";
import { ModelPicker } from "./models.js";
import { PrefillProgress, measure, stopNote } from "./phases.js";
import { Sidebar } from "./sidebar.js";
import { historyForServer, loadMode, saveMode } from "./store.js";

const HEALTH_EVERY_MS = 4000;
/** After a stop or a finish the server settles within a few hundred ms: look again soon. */
const HEALTH_AFTER_TURN_MS = [0, 250, 700, 1500];
/** After Stop, how long the page waits for the server's own `done` (it says where it stopped). */
const STOP_GRACE_MS = 3000;
const PROGRESS_FRAME_MS = 100;

const $ = (id) => document.getElementById(id);
const log = $("log");
const input = $("input");
const sendButton = $("send");
const modeSelect = $("mode");

/** Whether the reader is at the end of the conversation; if so, new text keeps it there. */
let pinned = true;
/** The reply being streamed, or null when idle. One at a time, in any conversation. */
let turn = null;
/** GET /modes failed: tried again when a key is entered. */
let modesFailed = false;
let toastTimer = null;

const sidebar = new Sidebar({
  open: () => {
    picker.showConversation();
    renderConversation();
  },
  busyIn: (c) => Boolean(turn && turn.conversation === c),
  stopIn: (c) => { if (turn && turn.conversation === c) stop(true); },
  notify,
});

const picker = new ModelPicker($("model"), $("model-picker"), {
  conversation: () => sidebar.current,
  choose: (conversation, name) => sidebar.setModel(conversation, name),
  // Replies name their model only when there is a choice; a change shows (or hides) it at once.
  listed: (names) => { if (nameModels(names.length > 1)) renderConversation(); },
});

// Rendering.

function renderConversation() {
  const conversation = sidebar.conversation;
  log.querySelectorAll(".msg").forEach((m) => m.remove());
  $("empty").hidden = conversation.messages.length > 0;
  const lastReply = lastReplyIndex(conversation.messages);
  conversation.messages.forEach((message, i) => {
    if (turn && message === turn.reply) log.append(turn.view);
    else log.append(messageView(message, i, { last: i === lastReply }));
  });
  setBusy(Boolean(turn));
  scrollToEnd();
}

function lastReplyIndex(messages) {
  const i = messages.length - 1;
  return i >= 1 && messages[i].role === "assistant" && messages[i - 1].role === "user" ? i : -1;
}

/** Scrolls the conversation to its end, now and after the next layout. */
function scrollToEnd() {
  log.scrollTop = log.scrollHeight;
  requestAnimationFrame(() => { log.scrollTop = log.scrollHeight; });
}

function setBusy(busy) {
  sendButton.textContent = busy ? "Stop" : "Send";
  sendButton.dataset.action = busy ? "stop" : "send";
  sendButton.classList.toggle("stop", busy);
  sendButton.setAttribute("aria-label", busy ? "Stop the reply (Esc)" : "Send (Enter)");
  document.body.classList.toggle("streaming", busy);
  // Regenerate and edit wait for the running reply (its Stop is always one key away).
  for (const b of log.querySelectorAll(".regenerate, .edit")) b.disabled = busy;
}

/** A short message at the bottom of the page, with an optional Undo. */
function notify(text, undo = null, ms = 6000) {
  const toast = $("toast");
  clearTimeout(toastTimer);
  $("toast-text").textContent = text;
  const undoButton = $("toast-undo");
  undoButton.hidden = !undo;
  undoButton.onclick = undo ? () => { hideToast(); undo(); } : null;
  toast.hidden = false;
  announce(undo ? `${text} Undo is in the message at the bottom of the page.` : text);
  toastTimer = setTimeout(hideToast, ms);
}

function hideToast() {
  clearTimeout(toastTimer);
  $("toast").hidden = true;
  $("toast-undo").onclick = null;
}

/** A polite announcement for screen readers (the status line itself is not live). */
function announce(text) {
  const region = $("announce");
  region.textContent = "";
  requestAnimationFrame(() => { region.textContent = text; });
}

// One turn: send, stream, stop.

function showPhase(text) {
  turn.view.querySelector(".state").textContent = text;
}

function onEvent(name, data) {
  const t = turn;
  const now = performance.now();
  if (name === "init") {
    t.requestId = data.request_id;
    console.log(`Streaming request started: ${data.request_id}`);
    t.view.dataset.requestId = data.request_id;
    if (data.model) t.reply.model = data.model; // the server's word for the model that answers
    refreshHealth();
  } else if (name === "queued") {
    t.queued = true;
    t.waitedOn = "queue";
    if (!t.tokens && !t.stopping) { t.view.dataset.state = "queued"; showPhase(`queued, position ${data.position}`); }
  } else if (name === "progress" && data.phase === "loading") {
    onLoading(t, data);
  } else if (name === "progress") {
    if (!t.tokens && data.total) {
      if (!t.prefill) t.prefill = new PrefillProgress(t.queued || t.loadingSeen ? t.lastEventAt : t.sentAt);
      t.prefill.update(data.done, data.total, now);
      t.view.dataset.prefill = `${data.done}/${data.total}`; // the server's own figure, beside the estimate
      if (!t.stopping) { t.view.dataset.state = "prefill"; drawPrefill(); }
    }
  } else if (name === "token") {
    if (!t.tokens) {
      if (t.loadingSeen) picker.refresh({ force: true }); // the model is loaded now
      t.firstAt = now;
      if (!t.stopping) showPhase("");
      t.view.dataset.state = "streaming";
      t.view.querySelector(".progress")?.remove();
    }
    t.tokens += 1;
    t.lastAt = now;
    t.reply.content += data.t;
    // A text node: model output is never parsed as HTML while it streams. Leading blanks are not shown.
    t.text.appendData(t.text.length ? data.t : data.t.trimStart());
    t.view.dataset.tokens = String(t.tokens);
    if (pinned && t.conversation === sidebar.current) log.scrollTop = log.scrollHeight;
  } else if (name === "done") {
    finishFromDone(t, data);
  }
  t.lastEventAt = now;
}

/** The model this request needs is loading: "loading model NAME… (N s)" until the prompt is read. */
function onLoading(t, data) {
  if (!t.loadingSeen) picker.refresh({ force: true }); // its state in the picker: loading
  t.loadingSeen = true;
  t.waitedOn = "loading";
  if (t.tokens || t.prefill || t.stopping) return;
  const name = data.model || t.reply.model || "";
  const seconds = Number.isFinite(data.elapsed_s) ? ` (${Math.floor(data.elapsed_s)} s)` : "";
  t.view.dataset.state = "loading";
  showPhase(`${name ? `loading model ${name}…` : "loading the model…"}${seconds}`);
}

function finishFromDone(t, data) {
  const reply = t.reply;
  reply.mode = data.mode_used || reply.mode;
  if (data.ok) {
    reply.content = data.response ?? reply.content;
    reply.state = "done";
    reply.finish = data.finish_reason === "length" ? "cut at the length limit" : "";
    if (Number.isFinite(data.usage?.completion_tokens)) t.tokens = data.usage.completion_tokens;
  } else if (data.stopped) {
    reply.content = data.response ?? reply.content;
    reply.state = "stopped";
    // The model's own count when the server sends it (a token event can carry several tokens).
    if (Number.isFinite(data.usage?.completion_tokens)) t.tokens = data.usage.completion_tokens;
    t.stoppedBy = typeof data.stopped_by === "string" ? data.stopped_by : "";
    console.log(`Request ${t.requestId} stopped, said the server (stopped_by: ${t.stoppedBy || "not sent"})`);
  } else {
    reply.state = "error";
    reply.error = data.error || "the server reported a failure without a reason";
  }
}

/** Prompt progress: the state line and a bar, advanced between events by the estimate. */
function drawPrefill() {
  const t = turn;
  if (!t?.prefill || t.tokens || t.stopping) return;
  const fraction = t.prefill.estimate(performance.now());
  showPhase(`reading prompt ${Math.floor(100 * fraction)} %`);
  let bar = t.view.querySelector(".progress");
  if (!bar) {
    bar = el("div", "progress");
    bar.setAttribute("aria-hidden", "true"); // the state line says it in words
    bar.append(el("span"));
    t.view.querySelector(".state").after(bar);
  }
  bar.firstChild.style.width = `${(100 * fraction).toFixed(1)}%`;
  if (!t.frame) t.frame = setInterval(drawPrefill, PROGRESS_FRAME_MS);
}

/** Sends `text` after `history` in `conversation` and streams the reply into it. */
async function runTurn(conversation, text, history) {
  const mode = modeSelect.disabled ? undefined : modeSelect.value;
  const model = picker.value; // "" against a server without model choice: it uses its own
  const reply = { role: "assistant", content: "", state: "streaming", mode: mode || "", model, error: "", stopNote: "" };
  if (model) sidebar.setModel(conversation, model); // the conversation keeps talking to it
  conversation.messages.push(reply);
  sidebar.save(conversation);
  const view = messageView(reply, conversation.messages.length - 1);
  view.dataset.state = "waiting";
  view.dataset.tokens = "0";
  view.setAttribute("aria-busy", "true"); // screen readers announce the reply once, when it ends
  const live = document.createTextNode("");
  view.querySelector(".body").replaceChildren(el("p", "live"));
  view.querySelector(".live").append(live);
  const sentAt = performance.now();
  turn = {
    conversation, reply, view, text: live, tokens: 0, requestId: null, controller: new AbortController(),
    stopping: false, stoppedBy: "", queued: false, loadingSeen: false, waitedOn: "", prefill: null, frame: null, graceTimer: null,
    sentAt, firstAt: 0, lastAt: 0, lastEventAt: sentAt,
  };
  renderConversation();
  showPhase("waiting for the server…");
  sidebar.render();

  const t = turn;
  try {
    const payload = { message: text, history };
    if (mode) payload.mode = mode;
    if (model) payload.model = model;
    await streamEvents("/chat/stream", payload, t.controller.signal, onEvent);
  } catch (err) {
    failTurn(t, err);
  } finally {
    endTurn(t);
  }
}

function failTurn(t, err) {
  const reply = t.reply;
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
}

function endTurn(t) {
  const reply = t.reply;
  clearInterval(t.frame);
  clearTimeout(t.graceTimer);
  if (reply.state === "streaming") reply.state = "error"; // cannot happen: streamEvents ends with done or throws
  if (reply.state === "error") console.error(`Request ${t.requestId ?? "(no id)"} failed: ${reply.error}`);
  if (reply.state === "stopped") {
    reply.stopNote = stopNote({
      stoppedBy: t.stoppedBy, tokens: t.tokens, prefill: t.prefill?.real ?? 0, queued: t.queued, loading: t.waitedOn === "loading",
    });
    reply.stoppedBy = t.stoppedBy; // the server's cancellation tier, when its `done` said it
  }
  reply.stats = measure({ sentAt: t.sentAt, firstAt: t.firstAt, lastAt: t.lastAt || performance.now(), tokens: t.tokens });
  turn = null;
  if (t.conversation.messages.includes(reply)) sidebar.save(t.conversation);
  const last = t.conversation.messages[t.conversation.messages.length - 1] === reply;
  fill(t.view, reply, { last });
  t.view.querySelector(".progress")?.remove(); // the state line says where a prefill stopped
  t.view.removeAttribute("aria-busy");
  t.view.dataset.tokens = String(t.tokens);
  setBusy(false);
  sidebar.render();
  if (pinned && t.conversation === sidebar.current) scrollToEnd();
  for (const ms of HEALTH_AFTER_TURN_MS) setTimeout(refreshHealth, ms);
  picker.refresh({ force: true }); // loaded, or unloaded again (keep_alive)
  if (!document.activeElement || document.activeElement === document.body || document.activeElement === sendButton) input.focus();
}

function send() {
  const text = input.value;
  if (turn || !text.trim()) return;
  const conversation = sidebar.conversation;
  const history = historyForServer(conversation.messages);
  conversation.messages.push({ role: "user", content: text, state: "done" });
  input.value = "";
  runTurn(conversation, text, history);
}

/** The last reply again: it is replaced by a new one for the same user message. */
function regenerate() {
  const conversation = sidebar.conversation;
  const i = lastReplyIndex(conversation.messages);
  if (turn || i < 0) return;
  conversation.messages.splice(i, 1);
  const user = conversation.messages[i - 1];
  runTurn(conversation, user.content, historyForServer(conversation.messages.slice(0, i - 1)));
}

/** An earlier user message, edited: everything after it is replaced by the new reply. */
function editAndSend(index, text) {
  const conversation = sidebar.conversation;
  if (turn || !text.trim()) return;
  conversation.messages.splice(index);
  const history = historyForServer(conversation.messages);
  conversation.messages.push({ role: "user", content: text, state: "done" });
  runTurn(conversation, text, history);
}

/**
 * Stop: tell the server to cancel this request id; its `done` then says where the model
 * stopped (stopped_by). The fetch is aborted too (a dropped connection is a cancel as well)
 * when the cancel cannot be sent, when no `done` comes within STOP_GRACE_MS, at once when the
 * request id is not known yet, or when `now` is set (a second Stop, leaving the page).
 */
function stop(now = false) {
  const t = turn;
  if (!t) return;
  if (t.stopping && !now) now = true; // Stop twice: do not wait for the server
  t.stopping = true;
  clearInterval(t.frame);
  showPhase("stopping…");
  if (t.requestId && !t.cancelSent) {
    t.cancelSent = true;
    cancelOnServer(t.requestId).then((ok) => { if (!ok) t.controller.abort(); });
  } else if (!t.requestId) {
    console.log("Stop before the server named the request; aborting the connection cancels it");
    now = true;
  }
  if (now) t.controller.abort();
  else t.graceTimer = setTimeout(() => t.controller.abort(), STOP_GRACE_MS);
}

/** POST /chat/cancel; false when it could not be delivered (the caller then drops the stream). */
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
    // "not_found" means the request had already ended (its `done` is on its way or read).
    console.log(`Cancelled request ${requestId} on server (${answer.status})`);
    return answer.status === "cancelled";
  } catch (err) {
    console.error(`Cancel of request ${requestId} failed: ${err.message}`);
    return false;
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

/** The models part of the status line: the one model's file, or which of several are loaded. */
function modelsLine(h) {
  const models = h.models && typeof h.models === "object" ? Object.entries(h.models) : [];
  if (models.length > 1) {
    const named = (state) => models.filter(([, m]) => m?.state === state).map(([name]) => name);
    const loading = named("loading");
    return ` · loaded: ${named("ready").join(", ") || "none"}${loading.length ? ` (loading ${loading.join(", ")})` : ""}`;
  }
  return h.model?.file ? ` · model ${h.model.file.replace(/\.gguf$/i, "")}` : "";
}

let healthSeq = 0;
let lastServerState = "";

/** The status line. Not a live region: only a change between up and down is announced. */
async function refreshHealth() {
  const seq = ++healthSeq;
  const status = $("status");
  const text = $("status-text");
  let state;
  let line;
  try {
    const response = await fetch("/health", { cache: "no-store" });
    const h = await response.json();
    const w = h.workers || {};
    // Slots (sequences a worker decodes together) when the server batches; older servers have none.
    const slots = h.slots?.total ? ` · slots ${h.slots.busy ?? 0}/${h.slots.total} in use` : "";
    // The model file the workers serve (older servers do not say); with several, the loaded ones.
    const model = modelsLine(h);
    const counts = `workers ${w.ready ?? "?"}/${w.total ?? "?"} ready, ${w.busy ?? 0} busy${slots} · queue ${h.queue ?? 0} · active ${h.active_requests ?? 0}${model}`;
    state = response.ok ? "ok" : "down";
    line = response.ok ? `ready · ${counts}` : `no worker ready (${response.status}) · ${counts}`;
  } catch (err) {
    state = "down";
    line = `server unreachable (${err.message})`;
  }
  if (seq !== healthSeq) return; // a later look already answered
  status.dataset.state = state;
  text.textContent = line;
  if (lastServerState && state !== lastServerState) announce(state === "ok" ? "The server is back." : `Server problem: ${line}`);
  lastServerState = state;
  if (state === "ok" && picker.status === "unknown") picker.refresh(); // GET /models had no answer yet
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

log.addEventListener("click", async (event) => {
  const target = event.target.closest("button");
  const view = target?.closest(".msg");
  if (!target || !view) return;
  const index = Number(view.dataset.index);
  const message = sidebar.conversation.messages[index];
  if (target.classList.contains("copy-code")) {
    await copied(target, target.closest(".codeblock").querySelector("pre").textContent.replace(/\n$/, ""));
  } else if (target.classList.contains("copy-reply") && message) {
    await copied(target, message.content);
  } else if (target.classList.contains("regenerate")) {
    regenerate();
  } else if (target.classList.contains("show-all")) {
    setCollapsed(view, target, !view.classList.contains("collapsed"), message.content.length);
  } else if (target.classList.contains("edit") && message && !turn) {
    renderConversation(); // one editor at a time
    const fresh = log.querySelector(`.msg[data-index="${index}"]`);
    startEdit(fresh, message, (text) => editAndSend(index, text), () => {
      renderConversation();
      log.querySelector(`.msg[data-index="${index}"] .edit`)?.focus();
    });
  }
});

async function copied(button, text) {
  const label = button.textContent;
  try {
    await copyText(text);
    button.textContent = "Copied";
    announce("Copied to the clipboard");
  } catch (err) {
    button.textContent = "Copy failed";
    console.error("Copy failed", err);
  }
  setTimeout(() => { button.textContent = label; }, 1500);
}

log.addEventListener("scroll", () => {
  pinned = log.scrollTop + log.clientHeight >= log.scrollHeight - 40;
});
// The log shrinks when the header grows (mode description) or the keyboard opens on a phone.
new ResizeObserver(() => { if (pinned) log.scrollTop = log.scrollHeight; }).observe(log);

modeSelect.addEventListener("change", () => {
  saveMode(modeSelect.value);
  describeMode();
});

// Leaving mid-reply: the server is told (keepalive), and the text so far is kept as stopped.
window.addEventListener("pagehide", () => {
  if (!turn) return;
  turn.reply.state = "stopped";
  turn.reply.stopNote = turn.tokens ? `after ${turn.tokens} tokens (the page was closed)` : "when the page was closed";
  sidebar.save(turn.conversation);
  stop(true);
});

onNewKey(() => {
  if (modesFailed) loadModes();
  if (picker.status !== "ok") picker.load();
});

sidebar.render();
renderConversation();
loadModes();
picker.load();
refreshHealth();
setInterval(refreshHealth, HEALTH_EVERY_MS);
input.focus();
