// Admin: tenants (list, create with limits, change limits, rotate key). A new key is shown
// once, only in a read-only input (set as its value property, never as markup).
import { getAll, patch, post } from "./api.js";
import { $, busy, confirmAction, el, showError, showInfo, when } from "./ui.js";

function showKey(name, key) {
  $("#tenant-new-key-label").textContent = `New API key of ${name} (shown once: copy it now)`;
  $("#tenant-new-key").value = key;
  $("#tenant-key-box").hidden = false;
  $("#tenant-new-key").focus();
  $("#tenant-new-key").select();
}

function hideKey() {
  $("#tenant-new-key").value = "";
  $("#tenant-key-box").hidden = true;
}

// a form's number inputs as a JSON body; blank is null (the server's default) when ``blankIsNull``
function numbers(form, blankIsNull) {
  const data = {};
  for (const input of form.querySelectorAll("input")) {
    const v = input.value.trim();
    if (v === "") { if (blankIsNull) data[input.name] = null; continue; }
    data[input.name] = input.dataset.kind === "int" ? parseInt(v, 10) : input.dataset.kind === "float" ? parseFloat(v) : v;
  }
  return data;
}

export function adminView() {
  const form = $("#tenant-form");
  const body = $("#tenant-table tbody");
  const limitsForm = $("#limits-form");
  let editing = null;

  function editLimits(t) {
    editing = t;
    $("#limits-h").textContent = `Limits of ${t.name} (blank: the server's default)`;
    for (const name of ["max_concurrent", "rate_per_s", "rate_burst"]) {
      $(`#limits-${name}`).value = t[name] === null || t[name] === undefined ? "" : String(t[name]);
    }
    limitsForm.hidden = false;
    $("#limits-max_concurrent").focus();
  }

  limitsForm.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!editing) return;
    busy(limitsForm, async () => {
      try {
        const t = await patch(`/admin/tenants/${encodeURIComponent(editing.id)}`, numbers(limitsForm, true));
        showInfo(`Saved the limits of ${t.name}.`);
        limitsForm.hidden = true;
        editing = null;
        await refresh();
      } catch (err) { showError(err, "limits refused"); }
    });
  });
  $("#limits-cancel").addEventListener("click", () => { limitsForm.hidden = true; editing = null; });

  async function rotate(t) {
    if (!(await confirmAction(`Rotate the API key of ${t.name}? Its current key stops working at once.`))) return;
    try {
      const r = await post(`/admin/tenants/${encodeURIComponent(t.id)}/rotate-key`);
      showKey(r.name, r.api_key);
      showInfo(`Rotated the key of ${r.name}.`);
    } catch (err) { showError(err, "rotate refused"); }
  }

  async function refresh() {
    try {
      const tenants = await getAll("/admin/tenants");
      const limit = (v) => (v === null || v === undefined ? "default" : v);
      body.replaceChildren(...tenants.map((t) => el("tr", { "data-name": t.name },
        el("td", { text: t.name }), el("td", { text: t.id }), el("td", { text: limit(t.max_concurrent) }),
        el("td", { text: limit(t.rate_per_s) }), el("td", { text: limit(t.rate_burst) }), el("td", { text: when(t.created_at) }),
        el("td", {}, el("button", { type: "button", text: "Rotate key", "aria-label": `Rotate key of ${t.name}`,
          onclick: () => rotate(t) }), " ", el("button", { type: "button", text: "Edit limits",
          "aria-label": `Edit limits of ${t.name}`, onclick: () => editLimits(t) })))));
      if (!tenants.length) body.append(el("tr", {}, el("td", { colSpan: 7, text: "No tenants yet." })));
    } catch (err) { showError(err, "could not list tenants"); }
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(form, async () => {
      const data = numbers(form, false);
      try {
        const t = await post("/admin/tenants", data);
        showKey(t.name, t.api_key);
        showInfo(`Created tenant ${t.name}.`);
        form.reset();
        await refresh();
      } catch (err) { showError(err, "tenant refused"); }
    });
  });
  $("#tenant-key-copy").addEventListener("click", async () => {
    try { await navigator.clipboard.writeText($("#tenant-new-key").value); showInfo("Copied."); }
    catch (err) { $("#tenant-new-key").select(); showError(err, "copy failed (select the key and copy it)"); }
  });
  $("#tenant-key-hide").addEventListener("click", hideKey);
  return { refresh, hideKey };
}
