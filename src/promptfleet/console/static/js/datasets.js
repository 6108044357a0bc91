// Datasets: a preview of the chosen file's first rows, upload, and the list.
import { api, getAll } from "./api.js";
import { $, busy, bytes, el, showError, showInfo, when } from "./ui.js";

const PREVIEW_ROWS = 5;

// The first lines of a JSONL file as table rows; a line that is not an object shows its raw text.
async function preview(file) {
  const box = $("#dataset-preview");
  if (!file) { box.replaceChildren(); return; }
  const head = await file.slice(0, 64 * 1024).text();
  const lines = head.split("\n").filter((l) => l.trim()).slice(0, PREVIEW_ROWS);
  const rows = lines.map((line, i) => {
    let prompt = line, completion = "(not a JSON object)";
    try {
      const v = JSON.parse(line);
      if (v && typeof v === "object") { prompt = String(v.prompt ?? "(missing)"); completion = String(v.completion ?? "(missing)"); }
    } catch (e) { completion = "(not JSON)"; }
    return el("tr", {}, el("td", { text: i + 1 }), el("td", { class: "wrap", text: prompt }),
      el("td", { class: "wrap", text: completion }));
  });
  box.replaceChildren(el("table", { id: "preview-table" },
    el("caption", { text: `Preview of ${file.name}: first ${rows.length} rows (${bytes(file.size)})` }),
    el("thead", {}, el("tr", {}, ["Line", "Prompt", "Completion"].map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows)));
}

export function datasetsView(onChange) {
  const form = $("#dataset-form");
  const input = $("#dataset-file");
  const body = $("#dataset-table tbody");

  async function refresh() {
    try {
      const items = await getAll("/v1/datasets");
      body.replaceChildren(...items.map((d) => el("tr", { "data-id": d.id },
        el("td", { text: d.id }), el("td", { text: d.num_examples }), el("td", { text: d.num_tokens ?? "-" }),
        el("td", { text: bytes(d.size_bytes) }), el("td", { text: when(d.created_at) }))));
      if (!items.length) body.append(el("tr", {}, el("td", { colSpan: 5, text: "No datasets yet." })));
      return items;
    } catch (err) { showError(err, "could not list datasets"); return []; }
  }

  input.addEventListener("change", () => preview(input.files[0]).catch((err) => showError(err, "preview failed")));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(form, async () => {
      const data = new FormData();
      data.append("file", input.files[0], input.files[0].name);
      try {
        const d = await api("POST", "/v1/datasets", { form: data });
        showInfo(`Uploaded dataset ${d.id}: ${d.num_examples} examples.`);
        form.reset();
        await refresh();
        if (onChange) await onChange();
      } catch (err) { showError(err, "dataset upload failed"); }
    });
  });
  return { refresh };
}
