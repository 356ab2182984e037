// The monitor page: polls /api/state and redraws; no libraries, so it works offline.
"use strict";

const REFRESH_MS = 2000;
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text = "") {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== "") node.textContent = text;
  return node;
}

const num = (v, digits = 4) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

function renderPeers(state) {
  const body = document.querySelector("#peers tbody");
  body.replaceChildren();
  for (const p of state.peers) {
    const boundary = p.last_fusion ? `${p.last_fusion}/${p.fusion_attempts} ${p.fusion_attempts === 1 ? "try" : "tries"}` : "-";
    const cells = [p.peer_id.slice(-8), p.dataset, p.iteration, p.phase, p.mode ?? "public", num(p.train_loss), num(p.dev_accuracy),
      num(p.examples_per_second, 1), p.last_group_size ?? "-", boundary, `${Math.max(0, state.now - p.last_seen).toFixed(0)} s ago`];
    const row = el("tr", { "data-dataset": p.dataset, "data-iteration": p.iteration, class: p.live ? "live" : "gone" });
    const names = ["peer", "dataset", "iteration", "phase", "mode", "loss", "dev", "speed", "group", "boundary", "seen"];
    cells.forEach((c, i) => row.appendChild(el("td", { class: names[i] + (names[i] === "boundary" && p.last_fusion ? " " + p.last_fusion : "") }, String(c))));
    body.appendChild(row);
  }
}

function renderBoundaries(state) {
  const body = document.querySelector("#boundaries tbody");
  body.replaceChildren();
  for (const b of [...state.boundaries].reverse()) {
    for (const [dataset, f] of Object.entries(b.peers)) {
      const group = f.members.length ? `${f.group_size ?? f.members.length}: ${f.members.join(", ")}` : "-";
      const row = el("tr", { "data-iteration": b.iteration });
      [b.iteration, dataset, f.status, group, f.attempts, f.seconds === null ? "-" : `${f.seconds.toFixed(1)} s`, f.error || ""]
        .forEach((c, i) => row.appendChild(el("td", i === 2 ? { class: f.status } : {}, String(c))));
      body.appendChild(row);
    }
  }
}

// A line chart: series = [{name, points: [[x, y], ...], dashed, step, marks}]
function chart(id, series, { xTime = false, integerX = false, integerY = false } = {}) {
  const box = document.getElementById(id);
  const shown = series.filter((s) => s.points.length);
  if (!shown.length) {
    box.replaceChildren(el("div", { class: "empty" }, "no data yet"));
    return;
  }
  const W = 560, H = 230, L = 52, R = 130, T = 10, B = 28;
  const xs = shown.flatMap((s) => s.points.map((p) => p[0]));
  const ys = shown.flatMap((s) => s.points.map((p) => p[1]));
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  const yticks = integerY ? Array.from({ length: Math.floor(y1) - Math.ceil(y0) + 1 }, (_, i) => Math.ceil(y0) + i)
    : [0, 1, 2, 3, 4].map((i) => y0 + ((y1 - y0) * i) / 4);
  for (const y of yticks) {
    svg.appendChild(el("svg:line", { x1: L, x2: W - R, y1: Y(y), y2: Y(y), class: "grid" }));
    svg.appendChild(el("svg:text", { x: L - 4, y: Y(y) + 3, "text-anchor": "end", class: "tick" }, integerY || Math.abs(y) >= 100 ? y.toFixed(0) : y.toFixed(2)));
  }
  const xticks = integerX ? Array.from({ length: x1 - x0 + 1 }, (_, i) => x0 + i).filter((_, i, a) => a.length <= 12 || i % Math.ceil(a.length / 12) === 0)
    : [0, 1, 2, 3].map((i) => x0 + ((x1 - x0) * i) / 3);
  for (const x of xticks) svg.appendChild(el("svg:text", { x: X(x), y: H - 10, "text-anchor": "middle", class: "tick" }, xTime ? clock(x) : String(x)));
  svg.appendChild(el("svg:line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
  svg.appendChild(el("svg:line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  shown.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    let d = "";
    s.points.forEach((p, j) => {
      if (j && s.step) d += ` H${X(p[0])}`;
      d += `${j ? " L" : "M"}${X(p[0])},${Y(p[1])}`;
    });
    svg.appendChild(el("svg:path", { d, fill: "none", stroke: color, "stroke-width": 2, "stroke-dasharray": s.dashed ? "5,4" : "none" }));
    if (s.marks) for (const p of s.points) {
      svg.appendChild(el("svg:circle", { cx: X(p[0]), cy: Y(p[1]), r: 3.5, fill: color, "data-series": s.name, "data-iteration": p[0], "data-value": p[1] }));
    }
    const ly = T + 12 + i * 15;
    svg.appendChild(el("svg:line", { x1: W - R + 8, x2: W - R + 24, y1: ly - 4, y2: ly - 4, stroke: color, "stroke-width": 2, "stroke-dasharray": s.dashed ? "4,3" : "none" }));
    svg.appendChild(el("svg:text", { x: W - R + 28, y: ly, class: "legend" }, s.name));
  });
  box.replaceChildren(svg);
}

function perPeer(state, field) {
  return Object.entries(state.series).map(([dataset, points]) => ({
    name: dataset,
    points: points.filter((p) => p[field] !== null && p[field] !== undefined).map((p) => [p.time, p[field]]),
  }));
}

function renderCharts(state) {
  chart("timeline", perPeer(state, "iteration").map((s) => ({ ...s, step: true })), { xTime: true, integerY: true });
  const curves = [];
  const names = { cold: "CoLD", frozen: "Frozen" };
  Object.entries(state.accuracy).forEach(([mode, curve], i) => {
    const color = COLORS[i];
    curves.push({ name: names[mode] || mode, points: curve.points, marks: true, color });
    if (curve.pretrained !== null && curve.points.length) {
      const last = curve.points[curve.points.length - 1][0];
      curves.push({ name: `${names[mode] || mode} at θ0`, points: [[0, curve.pretrained], [Math.max(1, last), curve.pretrained]], dashed: true, color });
    }
  });
  chart("accuracy", curves, { integerX: true });
  chart("loss", perPeer(state, "train_loss"), { xTime: true });
  chart("speed", perPeer(state, "examples_per_second"), { xTime: true });
}

async function refresh() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    const state = await response.json();
    document.getElementById("run").textContent = `· run ${state.run_id}`;
    const live = state.peers.filter((p) => p.live).length;
    const newest = Math.max(0, ...state.peers.map((p) => p.iteration));
    const evaluating = state.evaluating === null ? "" : ` · evaluating iteration ${state.evaluating}`;
    document.getElementById("summary").textContent =
      `${live} live of ${state.peers.length} peer(s) seen · newest iteration ${newest}${evaluating} · updated ${clock(state.now)}`;
    renderPeers(state);
    renderBoundaries(state);
    renderCharts(state);
  } catch (error) {
    document.getElementById("summary").textContent = `monitor not reachable (${error}); retrying`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
