// Loss and accuracy curves drawn with uPlot (vendored in static/vendor). Each chart keeps
// its point count in data-points so a test can follow it.
const HEIGHT = 220;
const WHOLE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];  // steps and epochs are integers

function widthOf(target) { return Math.max(240, Math.floor(target.clientWidth || 320)); }

function makeChart(target, series, scales, axes, data) {
  const chart = new window.uPlot({ width: widthOf(target), height: HEIGHT, series, scales, axes,
    legend: { live: false }, cursor: { drag: { x: false, y: false } } }, data, target);
  new ResizeObserver(() => chart.setSize({ width: widthOf(target), height: HEIGHT })).observe(target);
  return chart;
}

// Per-step training loss. metrics.loss holds one value per step, or interval means once a
// run has more steps than the server keeps: x is the step each point ends at.
export function lossSeries(job) {
  const loss = (job.metrics && job.metrics.loss) || [];
  const steps = Math.max(job.step || 0, loss.length);
  const xs = loss.map((_, i) => Math.round(((i + 1) * steps) / loss.length));
  return [xs, loss];
}

// Epoch 0 is the zero-shot evaluation (no train loss), then one point per epoch.
export function epochSeries(job) {
  const m = job.metrics || {};
  const rows = [];
  if (m.zero_shot) rows.push({ epoch: 0, ...m.zero_shot });
  for (const e of m.epochs || []) rows.push(e);
  const pick = (k) => rows.map((r) => (typeof r[k] === "number" ? r[k] : null));
  return { rows, data: [rows.map((r) => r.epoch), pick("train_loss"), pick("val_loss"), pick("val_accuracy")] };
}

export class JobCharts {
  constructor(lossTarget, epochTarget) {
    this.lossTarget = lossTarget;
    this.epochTarget = epochTarget;
    this.loss = null;
    this.epochs = null;
  }

  update(job) {
    const loss = lossSeries(job);
    const { data } = epochSeries(job);
    if (!this.loss) {
      this.lossTarget.replaceChildren();
      this.loss = makeChart(this.lossTarget,
        [{ label: "step" }, { label: "train loss", stroke: "#0b5cad", width: 2 }],
        { x: { time: false } }, [{ label: "step", incrs: WHOLE }, { label: "loss" }], loss);
    } else this.loss.setData(loss);
    if (!this.epochs) {
      this.epochTarget.replaceChildren();
      this.epochs = makeChart(this.epochTarget, [
        { label: "epoch" },
        { label: "train loss", stroke: "#0b5cad", width: 2, spanGaps: true },
        { label: "validation loss", stroke: "#b42318", width: 2, dash: [6, 4] },
        { label: "validation accuracy", stroke: "#1a7f37", width: 2, scale: "acc" },
      ], { x: { time: false }, acc: { range: [0, 1] } },
      [{ label: "epoch", incrs: WHOLE }, { label: "loss" }, { label: "accuracy", scale: "acc", side: 1, grid: { show: false } }], data);
    } else this.epochs.setData(data);
    this.lossTarget.dataset.points = String(loss[0].length);
    this.epochTarget.dataset.points = String(data[0].length);
  }

  destroy() {
    for (const c of [this.loss, this.epochs]) if (c) c.destroy();
    this.loss = this.epochs = null;
    this.lossTarget.dataset.points = this.epochTarget.dataset.points = "0";
  }
}
