// What a reply went through, in words: prompt progress between the server's progress events,
// where a stop happened, and how fast the reply came.

/**
 * Prompt progress that moves smoothly between the server's `progress` events (one per prefill
 * chunk: 8 % steps every ~2 s on a 6,000-token prompt) without ever claiming more than the
 * server will say next. The estimate runs at the measured rate and is capped just below the
 * next chunk boundary (last done + last step), so the next real event never moves it back.
 */
export class PrefillProgress {
  constructor(startedAt) {
    this.startedAt = startedAt; // when the prompt started being read (or the request was sent)
    this.last = null; // {done, total, at} of the latest progress event
    this.step = 0; // tokens between the last two events (the chunk size)
    this.rate = 0; // tokens per ms
    this.shown = 0; // the largest fraction shown so far
  }

  /** A real progress event from the server. */
  update(done, total, at) {
    const prev = this.last;
    const since = prev ? prev.at : this.startedAt;
    const delta = done - (prev ? prev.done : 0);
    if (delta > 0 && at > since) this.rate = delta / (at - since);
    if (delta > 0) this.step = Math.max(this.step, delta);
    this.last = { done, total, at };
    this.shown = Math.max(this.shown, done / total);
  }

  /** The server's latest real value, 0..1. */
  get real() {
    return this.last ? this.last.done / this.last.total : 0;
  }

  /** The fraction to show at time `now`: monotonic, never at or past the next real value. */
  estimate(now) {
    if (!this.last) return 0;
    const { done, total, at } = this.last;
    const cap = Math.min(total, done + this.step) - 1; // the next event says done + step
    const guess = Math.min(done + this.rate * (now - at), Math.max(done, cap));
    this.shown = Math.max(this.shown, guess / total);
    return this.shown;
  }
}

const TIERS = {
  queued: "while waiting in the queue",
  chunk: "while reading the prompt",
  native: "inside the model",
  kill: "by restarting its worker",
};

/**
 * The words after "stopped": from the server's `stopped_by` tier when it sent one, and
 * otherwise from what the page saw (tokens received, last prompt progress, queue, a model
 * loading). The server says "queued" for a stop while its model loads too: `loading` (the
 * last wait the page saw was a load) tells the two apart.
 */
export function stopNote({ stoppedBy, tokens, prefill, queued, loading = false }) {
  if (stoppedBy === "completed") return tokens > 0 ? `after ${tokens} token${tokens === 1 ? "" : "s"} (it had just finished)` : "(it had just finished)";
  if (tokens > 0) {
    const after = `after ${tokens} token${tokens === 1 ? "" : "s"}`;
    return stoppedBy === "kill" ? `${after} (the worker did not answer in time and was restarted)` : after;
  }
  if (stoppedBy === "queued" || (!stoppedBy && (queued || loading) && !prefill)) {
    return loading ? "while the model was loading" : "while waiting in the queue";
  }
  if (prefill) {
    const pct = `${Math.floor(100 * prefill)} %`;
    return stoppedBy === "kill" ? `while reading the prompt (${pct}; the worker was restarted)` : `while reading the prompt (${pct})`;
  }
  if (stoppedBy === "native" || stoppedBy === "chunk") return "while reading the prompt";
  if (stoppedBy && TIERS[stoppedBy]) return TIERS[stoppedBy];
  return "before the first token";
}

/** Small-print speed: time to first token and tokens per second after it. */
export function statsLine(stats) {
  if (!stats) return "";
  const parts = [];
  if (stats.ttftMs !== null && stats.ttftMs !== undefined) parts.push(`first token ${(stats.ttftMs / 1000).toFixed(2)} s`);
  if (stats.perSecond) parts.push(`${stats.perSecond.toFixed(1)} tokens/s`);
  if (stats.tokens) parts.push(`${stats.tokens} token${stats.tokens === 1 ? "" : "s"}`);
  return parts.join(" · ");
}

/** Stats of a finished or stopped turn; tokens from the server's usage when it sent it. */
export function measure({ sentAt, firstAt, lastAt, tokens }) {
  if (!firstAt) return tokens ? { ttftMs: null, tokens, perSecond: null } : null;
  const streamMs = lastAt - firstAt;
  // Rate over the tokens after the first (the first one's time is the prefill's).
  const perSecond = tokens > 1 && streamMs > 0 ? ((tokens - 1) * 1000) / streamMs : null;
  return { ttftMs: Math.round(firstAt - sentAt), tokens, perSecond };
}
