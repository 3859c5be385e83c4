// Live charts of /dashboard/data, refreshed every second. The same-origin requests carry
// the dashboard cookie when the server has an API key (see brownout/api/dashboard.py).
"use strict";

const REFRESH_MS = 1000;
const CHART_HEIGHT = 170;
const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const SLO_COLOUR = "#d62728";

// Each chart: its title, y-axis label, series [column, label], and an SLO key to draw.
const CHARTS = [
  {id: "ttft", title: "TTFT P90 (s)", series: [["ttft_p90", "TTFT P90"]], slo: "ttft_s"},
  {id: "tpot", title: "TPOT P90 (s)", series: [["tpot_p90", "TPOT P90"]], slo: "tpot_s"},
  {id: "rungs", title: "controller rungs per phase", series: null},
  {id: "queue", title: "requests", series: [["running", "running batch"], ["waiting", "queue"]]},
  {id: "kv", title: "KV cache usage (1 = full)", series: [["kv_usage", "KV usage"]], range: [0, 1.05]},
  {id: "refused", title: "refusals (429) per second",
   series: [["refused_slo", "TTFT admission"], ["refused_full", "queue full"]]},
];

// window.dashboard: what the page shows, for people and for the browser test.
const state = window.dashboard = {updates: 0, points: 0, lastT: null, charts: {}, error: null};

function chartWidth() {
  const el = document.getElementById("charts");
  const cols = Math.max(1, Math.floor(el.clientWidth / 560));
  return Math.max(300, Math.floor(el.clientWidth / cols) - 20);
}

function seriesOf(spec, payload) {
  if (spec.series) return spec.series;
  return payload.rungs.map(k => [k, k]);
}

function makeChart(spec, series, sloValue) {
  const opts = {
    title: spec.title, width: chartWidth(), height: CHART_HEIGHT,
    // y from 0 to a tenth above the highest value, SLO line included (or a fixed range)
    scales: {x: {time: true}, y: {range: spec.range || ((u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1])}},
    series: [{}].concat(series.map(([, label], i) => ({
      label: label, stroke: COLOURS[i % COLOURS.length], width: 1.5, spanGaps: false}))),
  };
  if (sloValue != null) {
    opts.series.push({label: "SLO " + sloValue + " s", stroke: SLO_COLOUR, dash: [6, 4], width: 1,
                      points: {show: false}});
  }
  let box = document.getElementById("chart-" + spec.id);
  if (!box) {
    box = document.createElement("div");
    box.className = "chart";
    box.id = "chart-" + spec.id;
    document.getElementById("charts").appendChild(box);
  }
  box.innerHTML = "";
  return new uPlot(opts, null, box);
}

function render(payload) {
  const cols = payload.columns;
  const t = cols.t;
  for (const spec of CHARTS) {
    const series = seriesOf(spec, payload);
    const sloValue = spec.slo ? payload.slo[spec.slo] : null;
    const shape = series.map(s => s[0]).join(",") + "|" + sloValue;
    let entry = state.charts[spec.id];
    if (!entry || entry.shape !== shape) {
      if (entry) entry.plot.destroy();
      entry = state.charts[spec.id] = {shape: shape, plot: makeChart(spec, series, sloValue)};
    }
    const data = [t].concat(series.map(([key]) => cols[key] || t.map(() => null)));
    if (sloValue != null) data.push(t.map(() => sloValue));
    entry.plot.setData(data);
  }
  state.points = t.length;
  state.lastT = t.length ? t[t.length - 1] : null;
  state.updates += 1;
  document.getElementById("model").textContent = payload.model || "";
  document.getElementById("policy").textContent = "policy: " + (payload.slo.policy || "-");
  document.getElementById("window").textContent = payload.latency_window_s;
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("/dashboard/data", {cache: "no-store", credentials: "same-origin"});
    if (!r.ok) throw new Error("HTTP " + r.status + (r.status === 401 ? ": open /dashboard?key=<API key>" : ""));
    render(await r.json());
    state.error = null;
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "";
  } catch (err) {
    state.error = String(err);
    status.textContent = "no data: " + err.message;
    status.className = "error";
  }
}

window.addEventListener("resize", () => {
  for (const entry of Object.values(state.charts)) entry.plot.setSize({width: chartWidth(), height: CHART_HEIGHT});
});
refresh();
setInterval(refresh, REFRESH_MS);
