// The model picker (issue #23): the models of GET /models with their states, and which one the
// open conversation talks to. A conversation keeps its own model (store.js); one that has not
// chosen shows the model picked last, else the server's default. Against a server without
// GET /models (404: older than the feature) the picker stays hidden and requests name no
// model, so the server uses its own.

import { authHeaders } from "./auth.js";
import { el } from "./render.js";
import { loadModel, saveModel } from "./store.js";

/** A model's state in GET /models, in the words beside its name. */
const STATE_WORDS = { ready: "loaded", loading: "loading…", unloading: "unloading…", unloaded: "not loaded" };
/** Focus, a press on the picker and each reply's end all ask for the states: at most this often. */
const REFRESH_MIN_MS = 1000;

export class ModelPicker {
  /**
   * hooks: conversation() is the open conversation; choose(conversation, name) remembers a
   * choice made in the picker; listed(names) is told the model names after each look.
   */
  constructor(select, wrapper, hooks) {
    this.select = select;
    this.wrapper = wrapper;
    this.hooks = hooks;
    this.names = [];
    this.fallback = ""; // the server's default model
    /** "unknown" (not asked yet, or no answer), "absent" (404: an older server), "locked" (401:
     * asked again when a key is entered), "ok". */
    this.status = "unknown";
    this.lastLook = 0;
    this.looking = null;
    select.addEventListener("change", () => {
      saveModel(select.value);
      hooks.choose(hooks.conversation(), select.value);
    });
    // Opening the list shows fresh states: a look on focus and on a press (a focused picker
    // can be opened again without a new focus).
    select.addEventListener("focus", () => this.refresh());
    select.addEventListener("pointerdown", () => this.refresh());
  }

  /** The model a request should name: "" when the server has no model picker (send none). */
  get value() {
    return this.status === "ok" && this.select.value ? this.select.value : "";
  }

  /** GET /models, then the picker shows its answer (or hides when there is none). */
  async load() {
    if (this.looking) return this.looking;
    this.looking = this.look().finally(() => { this.looking = null; });
    return this.looking;
  }

  /** A cheap look at the states, skipped when one was taken within REFRESH_MIN_MS. */
  refresh({ force = false } = {}) {
    if (this.status === "absent" || this.status === "locked") return;
    if (!force && performance.now() - this.lastLook < REFRESH_MIN_MS) return;
    this.load();
  }

  async look() {
    this.lastLook = performance.now();
    let data;
    try {
      // Never asks for the API key itself: GET /modes does, and a new key loads the models too.
      const response = await fetch("/models", { cache: "no-store", headers: authHeaders() });
      if (response.status === 404) {
        if (this.status !== "absent") console.log("GET /models: 404, a server without model choice; the picker stays hidden");
        this.status = "absent";
        this.wrapper.hidden = true;
        return;
      }
      if (response.status === 401 && this.status !== "ok") {
        this.status = "locked";
        return;
      }
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      data = await response.json();
      if (!Array.isArray(data?.models) || !data.models.length) throw new Error("no models in the answer");
    } catch (err) {
      // Kept as it was if it was shown (a passing failure); looked at again when the server is back.
      if (this.status !== "ok") this.status = "unknown";
      console.warn(`GET /models failed: ${err.message}`);
      return;
    }
    this.show(data);
  }

  show(data) {
    const names = data.models.map((m) => String(m.name));
    const current = this.select.value;
    if (names.join("\n") !== this.names.join("\n")) {
      this.select.replaceChildren(...names.map((name) => {
        const option = el("option", "", name);
        option.value = name;
        return option;
      }));
    }
    this.names = names;
    this.fallback = names.includes(data.default) ? data.default : names[0];
    data.models.forEach((m, i) => {
      const option = this.select.options[i];
      const state = String(m.state || (m.loaded ? "ready" : "unloaded"));
      option.textContent = `${m.name} (${STATE_WORDS[state] || state})`;
      option.dataset.state = state;
      // The file and its size estimate on hover (what GET /models says beyond the state).
      const about = Number.isFinite(m.estimate_mib) && m.estimate_mib > 0 ? `about ${m.estimate_mib} MiB` : "";
      option.title = [m.file, about, m.name === this.fallback ? "the server's default" : ""].filter(Boolean).join(", ");
    });
    const first = this.status !== "ok";
    this.status = "ok";
    this.wrapper.hidden = false;
    this.select.disabled = false;
    if (first || !names.includes(current)) this.showConversation();
    else this.select.value = current;
    this.hooks.listed(names);
  }

  /** Sets the picker to the open conversation's model, else the last picked, else the default. */
  showConversation() {
    if (this.status !== "ok") return;
    const own = this.hooks.conversation().model || "";
    const last = loadModel();
    if (own && !this.names.includes(own)) console.warn(`This conversation's model ${own} is not on the server any more`);
    this.select.value = this.names.includes(own) ? own : this.names.includes(last) ? last : this.fallback;
  }
}
