// Server-sent events over fetch: EventSource cannot POST, so /chat/stream is read from a
// ReadableStream and cut into events here (framing per the HTML "event stream" grammar).

import { AuthError, authFetch } from "./auth.js";

/** Incremental parser: feed() text chunks, get back complete {event, data} records. */
export class SSEParser {
  constructor() {
    this.buffer = "";
    this.event = "";
    this.data = [];
  }

  feed(chunk) {
    this.buffer += chunk;
    const out = [];
    // A line ends at \n, \r\n or \r; a trailing \r may be half of a \r\n still in flight.
    let match;
    const eol = /\r\n|\n|\r(?!$)/g;
    let start = 0;
    while ((match = eol.exec(this.buffer)) !== null) {
      this.line(this.buffer.slice(start, match.index), out);
      start = eol.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
    return out;
  }

  line(line, out) {
    if (line === "") {
      if (this.data.length) out.push({ event: this.event || "message", data: this.data.join("\n") });
      this.event = "";
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.event = value;
    else if (field === "data") this.data.push(value);
  }
}

/** An HTTP answer other than 200: the server's {"error"} text and its status. */
export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "HttpError";
    this.status = status;
  }
}

/** The stream ended, or could not be read, before its `done` event. */
export class ConnectionLost extends Error {
  constructor(message) {
    super(message);
    this.name = "ConnectionLost";
  }
}

/**
 * POSTs `body` to `url` and calls onEvent(name, data) for each event until `done`.
 * Sends the API key if one is stored, and asks for it on a 401 (auth.js).
 * Rejects with HttpError (non-200), AuthError (no key, or refused), ConnectionLost (dropped,
 * or no `done`), or the signal's AbortError when the caller aborts.
 */
export async function streamEvents(url, body, signal, onEvent) {
  let response;
  try {
    response = await authFetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (err) {
    if (signal.aborted || err instanceof AuthError) throw err;
    throw new ConnectionLost(`could not reach the server (${err.message})`);
  }
  if (!response.ok) throw new HttpError(response.status, await errorText(response));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const parser = new SSEParser();
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (signal.aborted) throw err;
      throw new ConnectionLost(`the connection dropped mid-reply (${err.message})`);
    }
    const text = chunk.done ? decoder.decode() + "\n\n" : decoder.decode(chunk.value, { stream: true });
    for (const { event, data } of parser.feed(text)) {
      let payload;
      try {
        payload = JSON.parse(data);
      } catch {
        throw new ConnectionLost(`the server sent an unreadable ${event} event`);
      }
      onEvent(event, payload);
      if (event === "done") {
        drain(reader); // the server closes right after `done`; cancelling would log an abort
        return payload;
      }
    }
    if (chunk.done) throw new ConnectionLost("the connection dropped before the reply ended");
  }
}

async function drain(reader) {
  try {
    while (!(await reader.read()).done);
  } catch {
    // already over
  }
}

async function errorText(response) {
  const raw = await response.text().catch(() => "");
  try {
    const parsed = JSON.parse(raw);
    if (parsed && typeof parsed.error === "string") return parsed.error;
  } catch {
    // not JSON: fall through to the raw text
  }
  return raw.trim().slice(0, 300) || response.statusText || "no details";
}
