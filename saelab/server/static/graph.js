// The graph page: an attribution graph or circuit from /api/graphs/{name} drawn as SVG (no build step).
// Uses el, svgEl, fmt, api and showError from app.js (loaded first). Text goes in through textContent.
"use strict";

const GRAPH = { minColWidth: 90, maxColWidth: 400, rowHeight: 70, left: 90, top: 20, bottom: 40, radius: 6 };
const SIGN_COLOURS = { positive: "#2563eb", negative: "#dc2626" };

// Pixel positions: x by context position (nodes sharing a cell spread across it), y by row (row 0 at the bottom).
// Columns widen with their most crowded cell, up to maxColWidth.
function layoutNodes(view) {
  const cells = new Map();
  for (const n of view.nodes) {
    const key = `${n.pos}/${n.row}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const nPos = view.nodes.reduce((m, n) => Math.max(m, n.pos + 1), Math.max(view.tokens.length, 1));
  // Rows shrink so that a deep model (30 layers) fits about one screen; a shallow one keeps full rows.
  const rowHeight = Math.min(GRAPH.rowHeight, Math.max(22, 620 / Math.max(view.rows.length - 1, 1)));
  const height = GRAPH.top + GRAPH.bottom + Math.max(view.rows.length - 1, 0) * rowHeight;
  const crowded = [...cells.values()].reduce((m, g) => Math.max(m, g.length), 1);
  const colWidth = Math.min(GRAPH.maxColWidth, Math.max(GRAPH.minColWidth, crowded * 16 + 20));
  const where = new Map();
  for (const group of cells.values()) {
    group.sort((a, b) => (a.feature ?? 0) - (b.feature ?? 0));
    const step = Math.min(16, (colWidth - 20) / Math.max(group.length, 1));
    group.forEach((n, i) => where.set(n.id, {
      x: GRAPH.left + (n.pos + 0.5) * colWidth + (i - (group.length - 1) / 2) * step,
      y: height - GRAPH.bottom - n.row * rowHeight,
    }));
  }
  return { where, width: GRAPH.left + nPos * colWidth + 10, height, colWidth, rowHeight };
}

// One node's shape by kind: feature circle, error square, embedding rounded box, logit diamond.
function nodeShape(n, p) {
  const r = GRAPH.radius;
  let shape;
  if (n.kind === "feature") shape = svgEl("circle", { cx: p.x, cy: p.y, r });
  else if (n.kind === "error") shape = svgEl("rect", { x: p.x - r, y: p.y - r, width: 2 * r, height: 2 * r });
  else if (n.kind === "embedding") shape = svgEl("rect", { x: p.x - r - 2, y: p.y - r, width: 2 * r + 4, height: 2 * r, rx: 3 });
  else shape = svgEl("polygon", { points: `${p.x},${p.y - r - 2} ${p.x + r + 2},${p.y} ${p.x},${p.y + r + 2} ${p.x - r - 2},${p.y}` });
  shape.setAttribute("class", `node kind-${n.kind}`);
  shape.dataset.id = n.id;
  const title = svgEl("title");
  title.textContent = n.label || n.id;
  shape.append(title);
  return shape;
}

function drawAxes(svg, view, layout) {
  view.tokens.forEach((t, pos) => {
    const label = svgEl("text", { x: GRAPH.left + (pos + 0.5) * layout.colWidth, y: layout.height - 12, class: "axis token-label", "text-anchor": "middle" });
    label.textContent = t.length > 12 ? t.slice(0, 11) + "\u2026" : t;
    svg.append(label);
  });
  view.rows.forEach((name, row) => {
    const label = svgEl("text", { x: 4, y: layout.height - GRAPH.bottom - row * layout.rowHeight + 4, class: "axis row-label" });
    const short = name.replace(/^blocks\./, "").replace("hook_", "");  // circuits: one row per hook
    label.textContent = short.length > 14 ? "\u2026" + short.slice(-13) : short;
    const title = svgEl("title");
    title.textContent = name;
    label.append(title);
    svg.append(label);
  });
}

function drawGraph(view, state) {
  const layout = layoutNodes(view);
  const svg = svgEl("svg", { id: "graph-svg", width: layout.width, height: layout.height, viewBox: `0 0 ${layout.width} ${layout.height}` });
  drawAxes(svg, view, layout);
  const maxWeight = view.edges.reduce((m, e) => Math.max(m, Math.abs(e.weight)), 0);
  const edgeLayer = svgEl("g", { class: "edges" }), nodeLayer = svgEl("g", { class: "nodes" });
  for (const e of view.edges) {
    const a = layout.where.get(e.source), b = layout.where.get(e.target);
    const width = maxWeight > 0 ? 0.5 + 4.5 * Math.abs(e.weight) / maxWeight : 1;
    const line = svgEl("line", {
      x1: a.x, y1: a.y, x2: b.x, y2: b.y, class: "edge", "stroke-width": width.toFixed(2),
      stroke: e.weight >= 0 ? SIGN_COLOURS.positive : SIGN_COLOURS.negative,
    });
    line.dataset.weight = String(Math.abs(e.weight));
    const title = svgEl("title");
    title.textContent = `${e.source} \u2192 ${e.target}: ${fmt(e.weight)}`;
    line.append(title);
    state.edgeEls.push({ edge: e, line });
    edgeLayer.append(line);
  }
  for (const n of view.nodes) {
    const shape = nodeShape(n, layout.where.get(n.id));
    shape.addEventListener("click", (ev) => (ev.shiftKey ? togglePin(state, n.id) : select(state, n.id)));
    state.nodeEls.set(n.id, shape);
    nodeLayer.append(shape);
  }
  svg.append(edgeLayer, nodeLayer);
  const box = document.getElementById("graph-view");
  box.replaceChildren(svg);
  const prune = document.getElementById("prune");
  prune.max = String(maxWeight || 1);
  prune.step = String((maxWeight || 1) / 100);
}

// Hide edges below the threshold, then (above 0) nodes left without a visible edge, unless pinned.
function applyPrune(state) {
  const threshold = Number(document.getElementById("prune").value);
  const linked = new Set();
  let shown = 0;
  for (const { edge, line } of state.edgeEls) {
    const on = Math.abs(edge.weight) >= threshold;
    line.classList.toggle("off", !on);
    if (on) { linked.add(edge.source); linked.add(edge.target); shown += 1; }
  }
  let nodes = 0;
  for (const [id, shape] of state.nodeEls) {
    const on = threshold <= 0 || linked.has(id) || state.pinned.has(id);
    shape.classList.toggle("off", !on);
    if (on) nodes += 1;
  }
  document.getElementById("prune-value").textContent = fmt(threshold);
  document.getElementById("graph-counts").textContent = `${nodes} nodes, ${shown} edges shown`;
}

function select(state, id) {
  state.selected = id;
  for (const [nid, shape] of state.nodeEls) shape.classList.toggle("selected", nid === id);
  const n = state.byId.get(id);
  document.getElementById("node-empty").hidden = true;
  document.getElementById("node-info").hidden = false;
  document.getElementById("node-label").textContent = n.label || n.id;
  const stats = document.getElementById("node-stats");
  stats.replaceChildren();
  const rows = [["id", n.id], ["kind", n.kind], ["layer", n.layer], ["position", `${n.pos} ${JSON.stringify(state.view.tokens[n.pos] ?? "")}`],
    ["activation", fmt(n.activation)], ["influence", fmt(n.influence)], ["effect", fmt(n.effect)]];
  for (const [k, v] of rows) if (v !== "" && v !== null && v !== undefined) stats.append(el("dt", { text: k }), el("dd", { text: String(v) }));
  const link = document.getElementById("node-link");
  link.hidden = !n.link;
  if (n.link) link.href = n.link;
  document.getElementById("node-nolink").hidden = Boolean(n.link) || n.kind !== "feature";
  document.getElementById("pin-toggle").textContent = state.pinned.has(id) ? "Unpin" : "Pin";
}

function togglePin(state, id) {
  if (state.pinned.has(id)) state.pinned.delete(id); else state.pinned.add(id);
  renderPins(state);
  applyPrune(state);
  if (state.selected === id) select(state, id);
}

// Pinned nodes: a ring on the node, a list beside the graph, and ?pinned=... in the URL to share the view.
function renderPins(state) {
  for (const [id, shape] of state.nodeEls) shape.classList.toggle("pinned", state.pinned.has(id));
  const list = document.getElementById("pinned-list");
  list.replaceChildren(...[...state.pinned].map((id) => el("li", {},
    el("a", { href: "#", class: "pinned-node", text: state.byId.get(id).label || id, onclick: (ev) => { ev.preventDefault(); select(state, id); } }))));
  const url = new URL(window.location.href);
  if (state.pinned.size) url.searchParams.set("pinned", [...state.pinned].join(","));
  else url.searchParams.delete("pinned");
  history.replaceState(null, "", url);
}

// Faithfulness F(C) and completeness F(M \ C) against circuit size (log x), as in faithfulness.png.
function drawCurve(points) {
  const pts = points.filter((p) => p.n_nodes !== null).map((p) => ({ ...p, n: Math.max(p.n_nodes, 1) })).sort((a, b) => a.n - b.n);
  if (!pts.length) return;
  const W = 460, H = 275, L = 45, R = 10, T = 25, B = 35;
  const ys = pts.flatMap((p) => [p.faithfulness, p.completeness]).filter((y) => y !== null);
  const yMin = Math.min(0, ...ys), yMax = Math.max(1, ...ys);
  const xMax = Math.max(Math.log10(pts[pts.length - 1].n), 1);
  const sx = (n) => L + (Math.log10(n) / xMax) * (W - L - R);
  const sy = (y) => H - B - ((y - yMin) / (yMax - yMin)) * (H - T - B);
  const svg = svgEl("svg", { id: "curve-svg", width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  svg.append(svgEl("line", { x1: L, x2: W - R, y1: sy(0.8), y2: sy(0.8), class: "reference", stroke: "#999", "stroke-dasharray": "4 3" }));
  for (let e = 0; e <= Math.floor(xMax); e++) {
    const t = svgEl("text", { x: sx(10 ** e), y: H - B + 15, class: "axis", "text-anchor": "middle" });
    t.textContent = String(10 ** e);
    svg.append(t);
  }
  for (const y of [yMin, 0.8, yMax]) {
    const t = svgEl("text", { x: L - 5, y: sy(y) + 4, class: "axis", "text-anchor": "end" });
    t.textContent = fmt(y, 2);
    svg.append(t);
  }
  const caption = svgEl("text", { x: (L + W) / 2, y: H - 4, class: "axis", "text-anchor": "middle" });
  caption.textContent = "nodes in the circuit (log)";
  svg.append(caption);
  const series = [["faithfulness", "#2563eb", "F(C)"], ["completeness", "#e07b24", "F(M \\ C)"]];
  series.forEach(([key, colour, name], i) => {
    const xy = pts.filter((p) => p[key] !== null).map((p) => [sx(p.n), sy(p[key])]);
    svg.append(svgEl("polyline", { points: xy.map((q) => q.join(",")).join(" "), fill: "none", stroke: colour, "stroke-width": 2, class: `curve-${key}` }));
    for (const [x, y] of xy) svg.append(svgEl("circle", { cx: x, cy: y, r: 3, fill: colour }));
    const legend = svgEl("text", { x: L + 90 * i, y: 14, fill: colour, "font-size": 12 });
    legend.textContent = name;
    svg.append(legend);
  });
  document.getElementById("curve").replaceChildren(svg);
  document.getElementById("curve-panel").hidden = false;
}

async function initGraph() {
  const name = document.body.dataset.graph;
  try {
    const view = await api(`/api/graphs/${encodeURIComponent(name)}`);
    const state = { view, byId: new Map(view.nodes.map((n) => [n.id, n])), nodeEls: new Map(), edgeEls: [], pinned: new Set(), selected: null };
    const wanted = new URL(window.location.href).searchParams.get("pinned");
    for (const id of (wanted ? wanted.split(",") : [])) if (state.byId.has(id)) state.pinned.add(id);
    document.getElementById("graph-subtitle").textContent = `${view.kind}: ${view.title}`;
    drawGraph(view, state);
    renderPins(state);
    applyPrune(state);
    document.getElementById("prune").addEventListener("input", () => applyPrune(state));
    document.getElementById("pin-toggle").addEventListener("click", () => state.selected && togglePin(state, state.selected));
    if (view.kind === "circuit") drawCurve(view.curve);
  } catch (e) {
    showError(e.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "graph") initGraph();
});
