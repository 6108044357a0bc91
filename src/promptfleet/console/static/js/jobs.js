// Training jobs: the form (defaults from the server's own OpenAPI schema), the list, and
// one followed job with its progress, curves and evaluations, polled until it ends.
import { get, getAll, post } from "./api.js";
import { JobCharts, epochSeries } from "./charts.js";
import { $, busy, el, num, pct, showError, showInfo, when } from "./ui.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 500;
// What the server does when a field with a null default is left out (JobRequest's docstring).
const NULL_DEFAULTS = { learning_rate: "default: the method's", max_steps: "default: all epochs",
  validation_fraction: "default: 0.1 from 20 examples", early_stopping_patience: "default: off",
  init: "default: text if init text given" };

// Placeholders and the method list from JobRequest in /openapi.json.
async function loadDefaults() {
  const schema = await get("/openapi.json");
  const job = schema.components.schemas.JobRequest;
  for (const [name, prop] of Object.entries(job.properties)) {
    const input = document.getElementById(`job-${name}`);
    if (!input) continue;
    const choices = Array.isArray(prop.enum) ? prop.enum
      : (prop.anyOf || []).map((a) => a.enum).find(Array.isArray);
    if (input.tagName === "SELECT" && choices) {
      // a nullable choice gets an empty first option: the server decides (NULL_DEFAULTS says how)
      const options = choices.map((m) => el("option", { value: m, text: m, selected: m === prop.default }));
      if (prop.default === null || prop.default === undefined) {
        options.unshift(el("option", { value: "", text: NULL_DEFAULTS[name] || "default", selected: true }));
      }
      input.replaceChildren(...options);
    } else if (input.tagName === "INPUT" && !(job.required || []).includes(name)) {
      if (prop.default !== undefined && prop.default !== null) input.placeholder = `default: ${prop.default}`;
      else input.placeholder = NULL_DEFAULTS[name] || "optional";
      if (typeof prop.maximum === "number") input.max = prop.maximum;
    }
  }
}

// The request body: empty fields are left out so the server applies its own defaults.
function jobBody(form) {
  const body = {};
  for (const input of form.querySelectorAll("input, select")) {
    const value = input.value.trim();
    if (!input.name || value === "") continue;
    body[input.name] = input.dataset.kind === "int" ? parseInt(value, 10)
      : input.dataset.kind === "float" ? parseFloat(value) : value;
  }
  return body;
}

export function jobsView() {
  const form = $("#job-form");
  const body = $("#job-table tbody");
  const charts = new JobCharts($("#chart-loss"), $("#chart-epochs"));
  let followed = null, timer = null, defaultsLoaded = false;

  function render(job) {
    $("#job-detail").hidden = false;
    $("#job-detail-h").textContent = `Job ${job.id}: ${job.adapter_name} (${job.method})`;
    const status = $("#job-status");
    status.textContent = job.status + (job.adapter ? ` — adapter ${job.adapter}` : "");
    status.className = `status ${job.status}`;
    $("#job-progress").value = job.progress || 0;
    $("#job-steps").textContent = `step ${job.step} of ${job.total_steps ?? "?"} (${Math.round((job.progress || 0) * 100)} %)`;
    const error = $("#job-error");
    error.hidden = !job.error;
    error.textContent = job.error ? `Job failed: ${job.error}` : "";
    $("#job-cancel").disabled = FINAL.has(job.status);
    charts.update(job);
    $("#epoch-table tbody").replaceChildren(...epochSeries(job).rows.map((r) => el("tr", {},
      el("td", { text: r.epoch === 0 ? "0 (zero-shot)" : r.epoch }), el("td", { text: num(r.train_loss) }),
      el("td", { text: num(r.val_loss) }), el("td", { text: pct(r.val_accuracy) }))));
  }

  async function poll() {
    timer = null;
    if (!followed) return;
    const id = followed;
    try {
      const job = await get(`/v1/jobs/${encodeURIComponent(id)}`);
      if (followed !== id) return;
      render(job);
      if (!FINAL.has(job.status)) timer = setTimeout(poll, POLL_MS);
      else await refresh();
    } catch (err) {
      showError(err, "could not read the job");
      timer = setTimeout(poll, POLL_MS * 4);
    }
  }

  function follow(id) {
    if (timer) clearTimeout(timer);
    if (followed !== id) charts.destroy();
    followed = id;
    poll();
  }

  async function refresh() {
    try {
      const jobs = await getAll("/v1/jobs");
      body.replaceChildren(...jobs.map((j) => el("tr", { "data-id": j.id },
        el("td", { text: j.adapter || j.adapter_name }), el("td", { class: `status ${j.status}`, text: j.status }),
        el("td", {}, el("progress", { max: 1, value: j.progress || 0, "aria-label": `Progress of ${j.adapter_name}` })),
        el("td", { text: when(j.created_at) }),
        el("td", {}, el("button", { type: "button", text: "Follow", "aria-label": `Follow job ${j.id}`,
          onclick: () => follow(j.id) })))));
      if (!jobs.length) body.append(el("tr", {}, el("td", { colSpan: 5, text: "No jobs yet." })));
    } catch (err) { showError(err, "could not list jobs"); }
  }

  async function refreshDatasets() {
    const train = $("#job-dataset_id"), validation = $("#job-validation_dataset_id");
    try {
      const items = await getAll("/v1/datasets");
      const options = (current) => items.map((d) => el("option", { value: d.id,
        text: `${d.id.slice(0, 8)}… (${d.num_examples} examples, ${when(d.created_at)})`, selected: d.id === current }));
      const [t, v] = [train.value, validation.value];
      train.replaceChildren(...options(t));
      validation.replaceChildren(el("option", { value: "", text: "none (or a fraction of the training set)" }), ...options(v));
    } catch (err) { showError(err, "could not list datasets"); }
  }

  $("#job-cancel").addEventListener("click", async () => {
    if (!followed) return;
    try {
      const job = await post(`/v1/jobs/${encodeURIComponent(followed)}/cancel`);
      showInfo(`Cancel requested for job ${job.id}.`);
      follow(followed);
    } catch (err) { showError(err, "cancel refused"); }
  });

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(form, async () => {
      try {
        const job = await post("/v1/jobs", jobBody(form));
        showInfo(`Job ${job.id} ${job.status}.`);
        await refresh();
        follow(job.id);
      } catch (err) { showError(err, "job refused"); }
    });
  });

  return {
    async refresh() {
      if (!defaultsLoaded) {
        try { await loadDefaults(); defaultsLoaded = true; } catch (err) { showError(err, "could not read the job defaults"); }
      }
      await Promise.all([refresh(), refreshDatasets()]);
      if (followed && !timer) follow(followed);
    },
    refreshDatasets,
    stop() { if (timer) clearTimeout(timer); timer = null; },
  };
}
