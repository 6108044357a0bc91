// Adapters: upload (file picker or drop), list, versions, download, delete.
import { api, download, get, getAll } from "./api.js";
import { $, busy, bytes, confirmAction, el, showError, showInfo, when } from "./ui.js";

async function showVersions(adapter) {
  const box = $("#adapter-versions");
  const rows = [];
  for (let v = adapter.version; v >= 1; v--) {
    try { rows.push(await get(`/v1/adapters/${encodeURIComponent(`${adapter.name}@${v}`)}`)); }
    catch (err) { if (err.status !== 404) throw err; }
  }
  box.replaceChildren(el("div", { class: "table-wrap" }, el("table", { id: "version-table" },
    el("caption", { text: `Versions of ${adapter.name}` }),
    el("thead", {}, el("tr", {}, ["Version", "Type", "Virtual tokens", "sha256", "Created", "Download"].map(
      (h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows.map((r) => el("tr", {},
      el("td", { text: `${r.name}@${r.version}` }), el("td", { text: r.peft_type }),
      el("td", { text: r.num_virtual_tokens }), el("td", { class: "wrap", text: r.sha256.slice(0, 16) + "…" }),
      el("td", { text: when(r.created_at) }),
      el("td", {}, el("button", { type: "button", text: "Download", "aria-label": `Download ${r.name}@${r.version}`,
        onclick: () => save(`${r.name}@${r.version}`) }))))))));
}

async function save(ref) {
  try {
    const { blob, filename } = await download(`/v1/adapters/${encodeURIComponent(ref)}/download`);
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: filename, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (err) { showError(err, `download of ${ref} failed`); }
}

async function remove(name, refresh) {
  if (!(await confirmAction(`Delete adapter "${name}" and all its versions? This cannot be undone.`))) return;
  try {
    await api("DELETE", `/v1/adapters/${encodeURIComponent(name)}`);
    showInfo(`Deleted adapter ${name}.`);
    $("#adapter-versions").replaceChildren();
    await refresh();
  } catch (err) { showError(err, `delete of ${name} failed`); }
}

export function adaptersView() {
  const form = $("#adapter-form");
  const body = $("#adapter-table tbody");
  const fileInput = $("#adapter-file");
  const drop = $("#adapter-drop");

  async function refresh() {
    try {
      const items = await getAll("/v1/adapters");
      body.replaceChildren(...items.map((a) => el("tr", { "data-name": a.name },
        el("td", { text: a.name }), el("td", { text: a.version }), el("td", { text: a.peft_type }),
        el("td", { text: a.num_virtual_tokens }), el("td", { text: bytes(a.size_bytes) }),
        el("td", { text: when(a.created_at) }),
        el("td", {}, el("div", { class: "buttons" },
          el("button", { type: "button", text: "Versions", "aria-label": `Versions of ${a.name}`,
            onclick: () => showVersions(a).catch((err) => showError(err, "versions")) }),
          el("button", { type: "button", text: "Download", "aria-label": `Download ${a.name}`, onclick: () => save(a.name) }),
          el("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${a.name}`,
            onclick: () => remove(a.name, refresh) }))))));
      if (!items.length) body.append(el("tr", {}, el("td", { colSpan: 7, text: "No adapters yet." })));
    } catch (err) { showError(err, "could not list adapters"); }
  }

  for (const type of ["dragenter", "dragover"]) drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) fileInput.files = e.dataTransfer.files;
  });

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(form, async () => {
      const file = fileInput.files[0];
      const name = $("#adapter-name").value.trim();
      const data = new FormData();
      data.append("name", name);
      data.append("file", file, file.name);
      try {
        const a = await api("POST", "/v1/adapters", { form: data });
        showInfo(`Uploaded ${a.name} version ${a.version} (${a.peft_type}, ${a.num_virtual_tokens} virtual tokens).`);
        form.reset();
        await refresh();
      } catch (err) { showError(err, "adapter upload failed"); }
    });
  });
  return { refresh };
}
