// Playground: one prompt, up to three models answering side by side, each streamed token
// by token over SSE from /v1/completions; with "own defaults", the sampling fields are left
// out so each adapter answers with its decoding defaults.
import { get, streamCompletion } from "./api.js";
import { $, el, showError } from "./ui.js";

const NONE = "";

function params() {
  if ($("#play-own-defaults").checked) return { prompt: $("#play-prompt").value };  // the server applies the defaults
  const number = (id, parse) => { const v = $(id).value.trim(); return v === "" ? null : parse(v); };
  const body = {
    prompt: $("#play-prompt").value,
    max_tokens: number("#play-max_tokens", (v) => parseInt(v, 10)),
    temperature: number("#play-temperature", parseFloat),
    top_p: number("#play-top_p", parseFloat),
    top_k: number("#play-top_k", (v) => parseInt(v, 10)),
    repetition_penalty: number("#play-repetition_penalty", parseFloat),
    seed: number("#play-seed", (v) => parseInt(v, 10)),
    stop: $("#play-stop").value || null,
  };
  for (const k of Object.keys(body)) if (body[k] === null) delete body[k];
  if (body.top_k === 0) delete body.top_k;
  return body;
}

export function playgroundView() {
  const form = $("#play-form");
  const selects = [0, 1, 2].map((i) => $(`#play-model-${i}`));
  const stopButton = $("#play-stop-btn");
  let controller = null;

  async function refresh() {
    try {
      const models = (await get("/v1/models")).data.map((m) => m.id);
      selects.forEach((select, i) => {
        const current = select.value;
        const options = i === 0 ? models : [NONE, ...models];
        select.replaceChildren(...options.map((id) => el("option", { value: id, text: id === NONE ? "(none)" : id })));
        if (options.includes(current)) select.value = current;
        else select.value = i === 0 ? models[0] : NONE;
      });
    } catch (err) { showError(err, "could not list models"); }
  }

  async function runOne(model, body, column, signal) {
    const out = column.querySelector("pre");
    const meta = column.querySelector(".meta");
    let pieces = 0;
    const started = performance.now();
    try {
      const finish = await streamCompletion({ ...body, model }, (text) => {
        out.textContent += text;
        pieces += 1;
        column.dataset.chunks = String(pieces);
        meta.textContent = `streaming… ${pieces} chunks`;
      }, signal);
      const seconds = ((performance.now() - started) / 1000).toFixed(2);
      meta.textContent = `done: ${pieces} chunk${pieces === 1 ? "" : "s"} in ${seconds} s, finish reason ${finish}`;
      column.dataset.state = "done";
    } catch (err) {
      column.dataset.state = err.name === "AbortError" ? "stopped" : "error";
      meta.textContent = err.name === "AbortError" ? "stopped" : `error: ${err.message}`;
      showError(err, `${model} failed`);
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const models = selects.map((s) => s.value).filter((m) => m !== NONE);
    const body = params();
    controller = new AbortController();
    stopButton.disabled = false;
    form.querySelector("button[type=submit]").disabled = true;
    const columns = models.map((model, i) => el("article", { class: "output", "data-model": model, "data-state": "streaming",
      "aria-label": `Answer of ${model}` }, el("h3", { text: `${i + 1}. ${model}` }),
      el("pre", { "aria-live": "polite" }), el("p", { class: "meta", text: "waiting…" })));
    $("#play-outputs").replaceChildren(...columns);
    await Promise.all(models.map((m, i) => runOne(m, body, columns[i], controller.signal)));
    stopButton.disabled = true;
    form.querySelector("button[type=submit]").disabled = false;
  });
  stopButton.addEventListener("click", () => { if (controller) controller.abort(); });
  return { refresh };
}
