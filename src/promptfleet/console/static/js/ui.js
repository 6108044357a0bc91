// DOM helpers: element builder, messages (every API error is shown, never swallowed),
// a confirmation dialog, and formatting.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else if (k in node && k !== "list") node[k] = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

export const $ = (sel) => document.querySelector(sel);

function message(kind, text, where) {
  const box = where || $("#flash");
  const node = el("div", { class: `msg ${kind}`, role: kind === "error" ? "alert" : "status" },
    el("p", { text }),
    el("button", { type: "button", "aria-label": "Dismiss message", text: "×", onclick: () => node.remove() }));
  box.prepend(node);
  while (box.children.length > 4) box.lastElementChild.remove();
  if (kind === "info") setTimeout(() => node.remove(), 8000);
  return node;
}

// err: an ApiError or any Error; context: what was being done ("upload refused").
export function showError(err, context) {
  if (err && err.name === "AbortError") return null;
  const status = err && err.status ? ` (HTTP ${err.status})` : "";
  const text = `${context ? context + ": " : ""}${err && err.message ? err.message : String(err)}${status}`;
  return message("error", text);
}

export const showInfo = (text) => message("info", text);
export const clearMessages = () => { $("#flash").replaceChildren(); };

export function confirmAction(text) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

export function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "-");
export const num = (x, digits = 4) => (typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "-");
export const pct = (x) => (typeof x === "number" && isFinite(x) ? `${(x * 100).toFixed(1)} %` : "-");

// Busy state for a form: disables its submit button while the promise runs.
export async function busy(form, work) {
  const button = form.querySelector("button[type=submit]");
  if (button) button.disabled = true;
  try { return await work(); } finally { if (button) button.disabled = false; }
}
