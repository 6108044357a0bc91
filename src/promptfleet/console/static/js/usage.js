// Usage per model (base and adapters) from the server's counters: /console/api/usage.
import { get } from "./api.js";
import { $, el, showError } from "./ui.js";

const ms = (s) => (typeof s === "number" ? `${(s * 1000).toFixed(0)} ms` : "-");

export function usageView() {
  const body = $("#usage-table tbody");
  async function refresh() {
    try {
      const usage = await get("/console/api/usage");
      body.replaceChildren(...usage.data.map((u) => el("tr", { "data-model": u.model },
        el("td", { text: u.model }), el("td", { text: u.requests }), el("td", { text: u.errors }),
        el("td", { text: u.prompt_tokens }), el("td", { text: u.completion_tokens }),
        el("td", { text: ms(u.latency_p50_s) }), el("td", { text: ms(u.latency_p90_s) }), el("td", { text: ms(u.latency_p99_s) }))));
      if (!usage.data.length) body.append(el("tr", {}, el("td", { colSpan: 8, text: "No completions yet." })));
    } catch (err) { showError(err, "could not read usage"); }
  }
  $("#usage-refresh").addEventListener("click", refresh);
  return { refresh };
}
