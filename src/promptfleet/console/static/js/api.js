// The API client: the key lives in sessionStorage only and travels as the Bearer token.
// Every non-2xx answer becomes an ApiError carrying the server's own message.
const KEY = "promptfleet.key";
const KIND = "promptfleet.kind";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || null;
  }
}

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  get kind() { return sessionStorage.getItem(KIND); },
  set(key, kind) { sessionStorage.setItem(KEY, key); sessionStorage.setItem(KIND, kind); },
  clear() { sessionStorage.removeItem(KEY); sessionStorage.removeItem(KIND); },
};

function headers(extra) {
  const h = new Headers(extra || {});
  if (session.key) h.set("Authorization", `Bearer ${session.key}`);
  return h;
}

// The message of an error answer: OpenAI's {"error": {"message"}} or FastAPI's {"detail"}.
async function errorOf(response) {
  let text = "";
  try { text = await response.text(); } catch (e) { /* body unreadable */ }
  let message = "", code = null;
  try {
    const body = JSON.parse(text);
    if (body && body.error) { message = body.error.message; code = body.error.code; }
    else if (body && body.detail) message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) { message = text.slice(0, 300); }
  return new ApiError(response.status, message || `HTTP ${response.status} ${response.statusText}`, code);
}

async function send(method, path, { json, form, signal } = {}) {
  const init = { method, headers: headers(), signal, cache: "no-store", credentials: "omit" };
  if (json !== undefined) { init.body = JSON.stringify(json); init.headers.set("Content-Type", "application/json"); }
  if (form !== undefined) init.body = form;
  let response;
  try { response = await fetch(path, init); }
  catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the server did not answer (${e.message})`, "network_error");
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function api(method, path, options) {
  const response = await send(method, path, options);
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response;
}

export const get = (path, options) => api("GET", path, options);
export const post = (path, json, options) => api("POST", path, { ...options, json });
export const patch = (path, json, options) => api("PATCH", path, { ...options, json });

// Every item of an OpenAI-style paged list (limit/after/has_more).
export async function getAll(path) {
  const items = [];
  let after = null;
  for (let page = 0; page < 100; page++) {
    const sep = path.includes("?") ? "&" : "?";
    const body = await get(`${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...body.data);
    if (!body.has_more || !body.last_id) break;
    after = body.last_id;
  }
  return items;
}

export async function download(path) {
  const response = await send("GET", path);
  const blob = await response.blob();
  const disposition = response.headers.get("Content-Disposition") || "";
  const match = /filename="([^"]+)"/.exec(disposition);
  return { blob, filename: match ? match[1] : "download" };
}

// POST /v1/completions with stream: true; onText(text) per SSE chunk; resolves to the finish reason.
export async function streamCompletion(body, onText, signal) {
  const response = await send("POST", "/v1/completions", { json: { ...body, stream: true }, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.status || 500, chunk.error.message, chunk.error.code);
        for (const choice of chunk.choices || []) {
          if (choice.text) onText(choice.text);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }
  throw new ApiError(0, "the stream ended before [DONE]", "stream_incomplete");
}
