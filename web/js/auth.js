// The optional API key (edison/auth.py). Once the user has given it, every request the page
// makes but GET /health carries "Authorization: Bearer <key>"; the key is never put in a URL.
// It is kept in localStorage. A 401 asks for it in the page's <dialog id="key-dialog">, then
// the request is sent again: on the first 401, and once more if the server refuses the key.

const KEY = "edison.apiKey";
/** Dialogs one request may open: the first 401, then once more if that key is refused. */
const MAX_ASKS = 2;

let memoryKey = ""; // used when localStorage is unavailable (it then lasts until a reload)
let asking = null; // the open dialog's promise: requests refused meanwhile share it
const listeners = [];

/** No key was given, or the server refused the one given: the request was not made. */
export class AuthError extends Error {
  constructor(message) {
    super(message);
    this.name = "AuthError";
  }
}

export function storedKey() {
  try {
    return localStorage.getItem(KEY) || "";
  } catch {
    return memoryKey;
  }
}

function storeKey(key) {
  memoryKey = key;
  try {
    if (key) localStorage.setItem(KEY, key);
    else localStorage.removeItem(KEY);
  } catch {
    // memoryKey serves until the page is left
  }
}

/** `headers` plus the Authorization header when a key is stored. */
export function authHeaders(headers = {}) {
  const key = storedKey();
  return key ? { ...headers, Authorization: `Bearer ${key}` } : { ...headers };
}

/** Calls `callback()` each time the user enters a key. */
export function onNewKey(callback) {
  listeners.push(callback);
}

/**
 * fetch() with the key. A 401 asks for the key and sends the request again; it rejects with
 * AuthError if the user cancels the dialog or the server refuses the keys given.
 */
export async function authFetch(url, init = {}) {
  let asks = 0;
  for (;;) {
    const used = storedKey();
    const response = await fetch(url, { ...init, headers: authHeaders(init.headers) });
    if (response.status !== 401) return response;
    const reason = await response.json().then((b) => b?.error, () => null);
    console.warn(`${init.method || "GET"} ${url}: 401 ${typeof reason === "string" ? reason : ""}`);
    const current = storedKey();
    if (current && current !== used) continue; // a key was entered meanwhile: use it
    if (used) storeKey(""); // refused: the key changed on the server, or was mistyped
    if (asks === MAX_ASKS) throw new AuthError("the server refused the API key");
    asks += 1;
    const key = await askForKey(
      !used ? "This Edison server needs an API key."
        : asks === 1 ? "The server refused the stored API key; it may have changed. Enter the current one."
          : "The server refused that key. Check it and enter it again.",
    );
    init.signal?.throwIfAborted();
    if (!key) {
      throw new AuthError(used ? "the server refused the API key, and no other was entered"
        : "this server needs an API key, and none was entered");
    }
  }
}

function askForKey(reason) {
  if (!asking) asking = showDialog(reason).finally(() => { asking = null; });
  return asking;
}

let wired = false;

/** Opens the key dialog; resolves to the key entered (now stored), or "" if cancelled. */
function showDialog(reason) {
  const dialog = document.getElementById("key-dialog");
  if (!dialog?.showModal) return Promise.resolve(accept((window.prompt(reason) || "").trim()));
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  if (!wired) {
    wired = true;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      dialog.close("ok");
    });
    document.getElementById("key-cancel").addEventListener("click", () => dialog.close("cancel"));
  }
  document.getElementById("key-reason").textContent = reason;
  input.value = "";
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = dialog.returnValue === "ok" ? input.value.trim() : "";
      input.value = "";
      resolve(accept(key));
    }, { once: true });
    dialog.showModal(); // Escape closes it as a cancel
    input.focus();
  });
}

function accept(key) {
  if (!key) {
    console.warn("No API key was entered");
    return "";
  }
  storeKey(key);
  console.log("API key stored");
  for (const callback of listeners) callback();
  return key;
}
