// saelab pages: thin shells filled from the JSON API. All text goes in through textContent (no innerHTML).
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "";
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e4 || a < 1e-3 ? x.toExponential(digits - 1) : x.toPrecision(digits);
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  if (opts.body !== undefined) {
    opts.headers = { "Content-Type": "application/json" };
    opts.body = JSON.stringify(opts.body);
  }
  const response = await fetch(path, opts);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    let detail = data && data.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => [(d.loc || []).slice(1).join("."), d.msg].filter((x) => x).join(": ")).join("; ");
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return data;
}

// A panel's own error box (the page-wide one stays for page-wide errors).
function panelError(id, message) {
  const box = document.getElementById(id);
  box.textContent = message || "";
  box.hidden = !message;
}

// Runs `work` with the button disabled and the spinner shown; errors go to the panel's box.
async function busy(buttonId, spinnerId, errorId, work) {
  const button = document.getElementById(buttonId), spinner = document.getElementById(spinnerId);
  button.disabled = true; spinner.hidden = false; panelError(errorId, "");
  try { await work(); } catch (e) { panelError(errorId, e.message); } finally { button.disabled = false; spinner.hidden = true; }
}

function featureLink(idx, label) {
  return el("a", { href: `/feature/${idx}`, class: "feature-link", "data-idx": String(idx), text: label || `#${idx}` });
}

// Token spans coloured by activation relative to `scale`; hover title shows the value.
function tokenSpan(text, value, scale, extraClass) {
  const v = value || 0;
  const alpha = scale > 0 ? Math.min(1, Math.max(0, v / scale)) : 0;
  const span = el("span", { class: "tok" + (extraClass ? " " + extraClass : ""), text: text.replace(/\n/g, "\u21b5") });
  if (alpha > 0) span.style.backgroundColor = `rgba(255, 110, 0, ${alpha.toFixed(3)})`;
  span.title = `${JSON.stringify(text)}: ${fmt(v, 4)}`;
  span.dataset.value = String(v);
  return span;
}

// Bar chart as inline SVG: bars = [{label, count}].
function barChart(container, bars, xLabelLeft, xLabelRight) {
  container.replaceChildren();
  if (!bars.length) { container.append(el("p", { class: "muted", text: "no data (dead latent)" })); return; }
  const w = 420, h = 140, pad = 18;
  const max = Math.max(...bars.map((b) => b.count), 1);
  const svg = svgEl("svg", { viewBox: `0 0 ${w} ${h + pad}`, width: "100%", role: "img" });
  const bw = w / bars.length;
  bars.forEach((b, i) => {
    const bh = (b.count / max) * h;
    const rect = svgEl("rect", { x: (i * bw).toFixed(2), y: (h - bh).toFixed(2), width: Math.max(bw - 1, 0.5).toFixed(2), height: bh.toFixed(2), class: "bar" });
    const t = svgEl("title", {}); t.textContent = `${b.label}: ${b.count}`; rect.append(t);
    svg.append(rect);
  });
  const left = svgEl("text", { x: 0, y: h + pad - 4, class: "axis" }); left.textContent = xLabelLeft;
  const right = svgEl("text", { x: w, y: h + pad - 4, class: "axis", "text-anchor": "end" }); right.textContent = xLabelRight;
  svg.append(left, right);
  container.append(svg);
}

// ---------------------------------------------------------------- meta line in the nav bar
async function loadMeta() {
  try {
    const m = await api("/api/meta");
    const model = (m.model && (m.model.hf_id || m.model.name)) || "?";
    document.getElementById("meta-summary").textContent =
      `${model} · ${m.hook_name} · ${m.n_features} latents (${m.n_dead} dead, ${m.n_dense} dense)` + (m.live ? " · live" : "");
    return m;
  } catch (e) { showError(e.message); return null; }
}

// ---------------------------------------------------------------- feature list
function initIndex() {
  const state = { offset: 0 };
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  if (params.get("sort")) $("sort-select").value = params.get("sort");
  if (params.get("order")) $("order-select").value = params.get("order");
  if (params.get("offset")) state.offset = Math.max(0, parseInt(params.get("offset"), 10) || 0);
  const tagSelect = $("tag-select");  // a crosscoder's store only
  if (tagSelect && params.get("tag")) tagSelect.value = params.get("tag");

  async function load() {
    const limit = parseInt($("page-size").value, 10);
    const q = new URLSearchParams({ sort: $("sort-select").value, order: $("order-select").value, offset: state.offset, limit });
    if ($("hide-dead").checked) q.set("include_dead", "false");
    if ($("hide-dense").checked) q.set("max_density", $("dense-threshold").value || "0.1");
    if ($("min-score").value !== "") q.set("min_score", $("min-score").value);
    if (tagSelect && tagSelect.value) q.set("tag", tagSelect.value);
    try {
      const data = await api(`/api/features?${q}`);
      showError("");
      const rows = data.items.map((f) => el("tr", { "data-idx": String(f.idx) },
        el("td", {}, featureLink(f.idx)),
        el("td", { text: fmt(f.density) }),
        el("td", { text: fmt(f.max_act) }),
        el("td", { text: fmt(f.mean_act) }),
        el("td", { text: String(f.n_active) }),
        ...(tagSelect ? [tagCell(f.tag), el("td", { class: "delta-norm", text: fmt(f.delta_norm) })] : []),
        bestCell(f),
        detectionCell(f.best && f.best.detection),
        el("td", { class: "preview", title: f.preview, text: f.preview })));
      $("feature-rows").replaceChildren(...rows);
      const end = state.offset + data.items.length;
      $("page-info").textContent = data.total ? `${state.offset + 1}–${end} of ${data.total}` : "no features";
      $("total-count").textContent = `${data.total} matching`;
      $("prev-page").disabled = state.offset === 0;
      $("next-page").disabled = end >= data.total;
      const tag = q.get("tag") ? `&tag=${encodeURIComponent(q.get("tag"))}` : "";
      history.replaceState(null, "", `?sort=${q.get("sort")}&order=${q.get("order")}&offset=${state.offset}${tag}`);
    } catch (e) { showError(e.message); }
  }
  const reset = () => { state.offset = 0; load(); };
  for (const id of ["sort-select", "order-select", "hide-dead", "hide-dense", "dense-threshold", "min-score", "page-size", "tag-select"]) {
    if ($(id)) $(id).addEventListener("change", reset);
  }
  $("prev-page").addEventListener("click", () => { state.offset = Math.max(0, state.offset - parseInt($("page-size").value, 10)); load(); });
  $("next-page").addEventListener("click", () => { state.offset += parseInt($("page-size").value, 10); load(); });
  $("list-controls").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const idx = $("goto-idx").value;
    if (idx !== "") location.href = `/feature/${parseInt(idx, 10)}`;
  });
  load();
}

// A crosscoder latent's model-diffing tag (shared, a_only, b_only, other).
function tagCell(tag) {
  const cell = el("td", { class: "tag-cell" });
  if (tag) cell.append(el("span", { class: `tag tag-${tag}`, text: tag }));
  return cell;
}

// A crosscoder latent's member models: tag, Δnorm, cosine and ν, then per member its decoder norm, share
// and logit effects (as macros.html renders it); the section stays hidden for other dictionaries.
function renderCrosscoder(container, f) {
  container.replaceChildren();
  container.hidden = !f.members;
  if (!f.members) return;
  const dash = (x) => (x === null || x === undefined ? "\u2013" : fmt(x));
  container.append(el("h2", { text: "Member models" }));
  if (f.diff) {
    const d = f.diff, tag = el("dd", {}, el("span", { class: `tag tag-${d.tag}`, text: d.tag }));
    const stats = [["\u0394norm", dash(d.delta_norm)], ["decoder cosine", dash(d.cosine)], ["\u03bd\u03b5", dash(d.nu_eps)], ["\u03bdr", dash(d.nu_r)]];
    container.append(el("dl", { class: "stats diff" }, el("dt", { text: "tag" }), tag,
      ...stats.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })])));
  }
  const tokens = (rows) => rows.map((r) => `${JSON.stringify(r.token)} ${r.value >= 0 ? "+" : ""}${fmt(r.value)}`).join(", ");
  const table = el("table", { class: "data members" },
    el("tr", {}, ...["Member model", "Decoder norm", "Share", "Top promoted tokens", "Top suppressed tokens"].map((h) => el("th", { text: h }))));
  for (const m of f.members) {
    table.append(el("tr", { "data-member": String(m.index) }, el("td", { title: m.name, text: m.label }),
      el("td", { text: fmt(m.decoder_norm) }), el("td", { text: `${Math.round(100 * m.share)}%` }),
      el("td", { text: tokens(m.logits_pos) }), el("td", { text: tokens(m.logits_neg) })));
  }
  container.append(table);
}

// The list's best-explanation cell: its kind and text (or the human label when nothing is scored).
function bestCell(f) {
  const cell = el("td", { class: "expl" });
  if (f.best) cell.append(el("span", { class: `kind kind-${f.best.kind}`, text: f.best.kind }), " " + f.best.text);
  else cell.textContent = f.explanation || "";
  return cell;
}

// A detection score with both controls; flagged when it does not beat the shuffled-label control.
function detectionCell(d) {
  const cell = el("td", { class: "score" });
  if (!d) { cell.append(el("span", { class: "muted", text: "–" })); return cell; }
  cell.append(el("span", { class: "score-value", text: fmt(d.score) }),
    el("span", { class: "muted", text: ` (chance ${fmt(d.chance)}, shuffled ${fmt(d.shuffled)})` }));
  if (d.flagged) cell.append(" ", el("span", { class: "flag", title: "does not beat a shuffled label", text: "\u26a0 not above shuffled" }));
  return cell;
}

// Every explanation, best first, with its scores beside both controls (as macros.html renders it).
function renderExplanations(container, explanations) {
  container.replaceChildren();
  if (!explanations.length) { container.append(el("p", { class: "muted", text: "no explanations" })); return; }
  for (const e of explanations) {
    const entry = el("div", { class: "expl-entry", "data-id": String(e.id), "data-kind": e.kind },
      el("p", {}, el("span", { class: `kind kind-${e.kind}`, text: e.kind }), " ", el("span", { class: "expl-text", text: e.text })));
    const names = Object.keys(e.scores);
    if (names.length) {
      const table = el("table", { class: "data scores" }, el("tr", {}, ...["Scorer", "Score", "Chance", "Shuffled label", "CI", "n", ""].map((h) => el("th", { text: h }))));
      for (const name of names) {
        const sc = e.scores[name];
        const flag = el("td", {});
        if (sc.flagged) flag.append(el("span", { class: "flag", title: "this score does not beat the same scorer on a shuffled (another latent's) label", text: "\u26a0 no better than a shuffled label" }));
        const row = el("tr", { "data-scorer": name },
          el("td", { text: name }), el("td", { text: fmt(sc.score) }), el("td", { text: fmt(sc.chance) }), el("td", { text: fmt(sc.shuffled) }),
          el("td", { text: sc.ci_low === null ? "" : `${fmt(sc.ci_low)}–${fmt(sc.ci_high)}` }), el("td", { text: sc.n === null ? "" : String(sc.n) }), flag);
        if (sc.flagged) row.className = "flagged";
        table.append(row);
      }
      entry.append(table);
    } else entry.append(el("p", { class: "muted", text: "not scored" }));
    if (Object.keys(e.source || {}).length) entry.append(el("details", { class: "source" }, el("summary", { text: "source" }), el("code", { text: JSON.stringify(e.source) })));
    container.append(entry);
  }
}

// Dreamed prompts, each with its activation as a share of the dataset maximum (as macros.html renders it).
function renderDreams(container, dreams) {
  container.replaceChildren();
  if (!dreams.length) {
    container.append(el("p", { class: "muted" }, "no dreamed prompts (", el("code", { text: "saelab explain --method dream" }), ")"));
    return;
  }
  const table = el("table", { class: "data dreams-table" },
    el("tr", {}, ...["Dreamed prompt", "Activation", "Of dataset max", "Cross-entropy", "\u03bb"].map((h) => el("th", { text: h }))));
  for (const d of dreams) {
    const text = el("td", { class: "dream-text" }, ...d.tokens.map((t) => el("span", { class: "tok", text: t.replace(/\n/g, "\u21b5") })));
    const share = el("td", {});
    if (d.of_max !== null) {
      const bar = el("span", { class: "of-max", text: `${Math.round(100 * d.of_max)}%` });
      bar.style.setProperty("--share", String(Math.max(0, Math.min(1, d.of_max))));
      share.append(bar);
    }
    table.append(el("tr", { class: "dream", "data-id": String(d.id) }, text, el("td", { text: fmt(d.activation) }), share,
      el("td", { text: fmt(d.cross_entropy) }), el("td", { text: d.lam === null ? "" : fmt(d.lam) })));
  }
  container.append(table);
}

// ---------------------------------------------------------------- one feature
function renderExamples(container, items, kind) {
  container.replaceChildren();
  if (!items.length) { container.append(el("p", { class: "muted", text: "no examples" })); return; }
  let lastQ = null;
  for (const ex of items) {
    if (kind === "quantile" && ex.quantile !== lastQ) {
      container.append(el("h3", { class: "quantile", text: `Quantile ${ex.quantile}` }));
      lastQ = ex.quantile;
    }
    const scale = Math.max(...ex.tokens.map((t) => t.value), ex.value, 1e-9);
    const row = el("div", { class: "example", "data-value": String(ex.value) },
      el("span", { class: "ex-value", text: fmt(ex.value) }));
    if (ex.members) {  // a crosscoder latent: the activation as written into each member model
      row.append(el("span", { class: "ex-members" }, ...ex.members.map((m, i) => el("span",
        { class: "ex-member", "data-member": String(i), title: `activation \u00d7 decoder norm in ${m.member}`, text: `${m.label} ${fmt(m.value)}` }))));
    }
    ex.tokens.forEach((t, i) => row.append(tokenSpan(t.text, t.value, scale, i === ex.center ? "center" : "")));
    container.append(row);
  }
}

function renderLogitTable(table, rows) {
  table.replaceChildren(el("tr", {}, el("th", { text: "Token" }), el("th", { text: "Effect" })),
    ...rows.map((r) => el("tr", {}, el("td", {}, el("code", { text: JSON.stringify(r.token) })), el("td", { text: fmt(r.value) }))));
}

function renderLinks(list, rows, label) {
  list.replaceChildren(...rows.map((r) => el("li", {}, featureLink(r.idx), el("span", { class: "muted", text: " " + label(r) }))));
  if (!rows.length) list.append(el("li", { class: "muted", text: "none" }));
}

async function initFeature() {
  const idx = parseInt(document.body.dataset.feature, 10);
  const $ = (id) => document.getElementById(id);
  let f;
  try { f = await api(`/api/features/${idx}`); } catch (e) { showError(e.message); return; }
  const stats = [["density", fmt(f.density, 4)], ["max activation", fmt(f.max_act)], ["mean activation", fmt(f.mean_act)], ["active tokens", String(f.n_active)]];
  $("feature-stats").replaceChildren(...stats.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  const showExplanation = (text) => {
    $("explanation").textContent = text || "none";
    $("explanation").className = text ? "" : "muted";
    $("explanation-input").value = text || "";
  };
  showExplanation(f.explanation);
  renderCrosscoder($("crosscoder"), f);
  renderExplanations($("explanations"), f.explanations);
  renderDreams($("dreams"), f.dreams);
  barChart($("act-hist"), f.hist.bins.map((b) => ({ label: `${fmt(b.lo)}–${b.hi === null ? "∞" : fmt(b.hi)}`, count: b.count })),
    f.hist.bins.length ? fmt(f.hist.bins[0].lo) : "", f.hist.bins.length ? (f.hist.bins[f.hist.bins.length - 1].hi === null ? "∞" : fmt(f.hist.bins[f.hist.bins.length - 1].hi)) : "");
  if (f.logit_hist) {
    const lh = f.logit_hist, n = lh.counts.length, step = (lh.max - lh.min) / n;
    barChart($("logit-hist"), lh.counts.map((c, i) => ({ label: `${fmt(lh.min + i * step)}–${fmt(lh.min + (i + 1) * step)}`, count: c })), fmt(lh.min), fmt(lh.max));
  }
  renderLogitTable($("logits-pos"), f.logits_pos);
  renderLogitTable($("logits-neg"), f.logits_neg);
  renderLinks($("neighbours"), f.neighbours, (r) => `cos ${fmt(r.cosine)}`);
  renderLinks($("coactivation"), f.coactivation, (r) => `${r.count} tokens`);

  $("explanation-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const r = await api(`/api/features/${idx}/explanation`, { method: "PUT", body: { text: $("explanation-input").value } });
      showExplanation(r.explanation); showError("");
      renderExplanations($("explanations"), (await api(`/api/features/${idx}`)).explanations);
    } catch (e) { showError(e.message); }
  });

  $("test-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("test-token-features").replaceChildren();
    try {
      const r = await api("/api/activations", { method: "POST", body: { text: $("test-text").value, feature: idx } });
      showError("");
      const scale = Math.max(r.max_value, f.max_act, 1e-9);
      $("test-tokens").replaceChildren(...r.tokens.map((t, i) => {
        const span = tokenSpan(t.text, t.value, scale, t.excluded ? "excluded" : "");
        span.dataset.index = String(i);
        span.addEventListener("click", () => {
          for (const s of $("test-tokens").querySelectorAll(".selected")) s.classList.remove("selected");
          span.classList.add("selected");
          const box = $("test-token-features");
          box.replaceChildren(el("h3", { text: `Top features at ${JSON.stringify(t.text)}` }));
          const list = el("ul", { class: "links", id: "token-feature-list" });
          renderLinks(list, t.top, (x) => fmt(x.value));
          box.append(list);
        });
        return span;
      }));
    } catch (e) { showError(e.message); }
  });
  $("explain-now-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy("explain-now", "explain-now-spinner", "explain-now-error", async () => {
      const r = await api(`/api/features/${idx}/explain`, { method: "POST", body: { method: $("explain-now-method").value } });
      const g = await api(`/api/features/${idx}`);
      showExplanation(g.explanation);
      renderExplanations($("explanations"), g.explanations);
      if (r.failures.length) panelError("explain-now-error", r.failures.map((x) => `${x.stage}: ${x.error}`).join("; "));
    });
  });
  if (document.body.dataset.live !== "true") {
    $("explain-now").disabled = true;
    $("explain-now").title = "explaining runs the server's model; this server runs without one";
    $("test-run").disabled = true;
    $("test-text").placeholder = "live encoding is off: the server runs without a model";
  }
  initSteer(idx, f);

  for (const kind of ["top", "quantile"]) {
    try {
      const r = await api(`/api/features/${idx}/examples?kind=${kind}`);
      renderExamples($(`${kind}-examples`), r.items, kind);
    } catch (e) { showError(e.message); }
  }
}

// ---------------------------------------------------------------- steering panel (feature page)
function initSteer(idx, f) {
  const $ = (id) => document.getElementById(id);
  const limit = parseFloat(document.body.dataset.maxStrength) || 1000;
  // Strength is in activation units (a decoder row times its activation is the latent's write), so the
  // slider spans 10x the largest activation seen (at least 10), and starts at that largest activation.
  // The number box takes any value up to the server's limit.
  const span = Math.min(limit, Math.max(10, Math.ceil(10 * (f.max_act || 0))));
  const slider = $("steer-strength"), box = $("steer-strength-value");
  slider.min = String(-span); slider.max = String(span); slider.step = String(span / 200);
  const start = f.max_act > 0 ? Number(f.max_act.toPrecision(2)) : 1;
  slider.value = String(start); box.value = String(start);
  slider.addEventListener("input", () => { box.value = slider.value; });
  box.addEventListener("input", () => { if (box.value !== "") slider.value = box.value; });

  $("steer-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy("steer-run", "steer-spinner", "steer-error", async () => {
      const prompt = $("steer-prompt").value;
      if (!prompt.trim()) throw new Error("write a prompt to complete first");
      const strength = parseFloat(box.value);
      if (!Number.isFinite(strength)) throw new Error("strength must be a number");
      const body = {
        feature: idx, strength, prompt, mode: $("steer-mode").value, scope: $("steer-scope").value,
        max_new_tokens: parseInt($("steer-tokens").value, 10), seed: parseInt($("steer-seed").value, 10) || 0,
      };
      const r = await api("/api/steer", { method: "POST", body });
      const show = (id, text) => {
        $(id).textContent = text || "(no text: the model ended at once)";
        $(id).classList.toggle("muted", !text);
      };
      show("steer-unsteered", r.unsteered);
      show("steer-steered", r.steered);
      $("steer-steered-title").textContent = `Steered (${r.mode} ${fmt(r.strength)})`;
      $("steer-results").hidden = false;
    });
  });
  if (document.body.dataset.live !== "true") {
    $("steer-run").disabled = true;
    $("steer-prompt").placeholder = "steering is off: the server runs without a model";
  }
}

// ---------------------------------------------------------------- build a vector
function initVector() {
  const $ = (id) => document.getElementById(id);
  const lines = (id) => $(id).value.split("\n").map((l) => l.trim()).filter((l) => l);
  $("vector-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy("vector-run", "vector-spinner", "vector-error", async () => {
      const positive = lines("vector-positive"), negative = lines("vector-negative");
      if (!positive.length || !negative.length) throw new Error("give at least one positive and one negative prompt");
      const body = { positive, negative, n_features: parseInt($("vector-n").value, 10) || 10, chat: $("vector-chat").checked };
      const r = await api("/api/vector", { method: "POST", body });
      $("vector-summary").textContent =
        `${r.n_positive} positive − ${r.n_negative} negative prompts at ${r.hook}: |vector| ${fmt(r.vector_norm)}; ` +
        `${r.features.length} features reconstruct it with cosine ${fmt(r.cosine)} (residual ${fmt(r.relative_residual)} of its norm).`;
      $("vector-rows").replaceChildren(...r.features.map((x) => el("tr", { "data-idx": String(x.idx) },
        el("td", {}, featureLink(x.idx)),
        el("td", { text: fmt(x.coefficient) }),
        el("td", { text: fmt(x.cosine) }),
        el("td", { text: fmt(x.share) }),
        el("td", { text: fmt(x.density) }),
        el("td", { text: fmt(x.max_act) }),
        el("td", { class: "expl", text: x.explanation || "" }))));
      $("vector-table").hidden = false;
    });
  });
  if (document.body.dataset.live !== "true") {
    $("vector-run").disabled = true;
    panelError("vector-error", "building vectors is off: the server runs without a model (restart without --no-live)");
  }
}

// ---------------------------------------------------------------- search
function initSearch() {
  const $ = (id) => document.getElementById(id);
  const bind = (formId, inputId, listId, run) => $(formId).addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const value = $(inputId).value.trim();
    if (!value) return;
    try { showError(""); await run(value, $(listId)); } catch (e) { showError(e.message); }
  });
  bind("token-form", "token-query", "token-results", async (q, list) => {
    const r = await api(`/api/search?${new URLSearchParams({ q, kind: "token" })}`);
    renderLinks(list, r.items, (x) => `${x.matches} top examples`);
  });
  bind("expl-form", "expl-query", "expl-results", async (q, list) => {
    const r = await api(`/api/search?${new URLSearchParams({ q, kind: "explanation" })}`);
    renderLinks(list, r.items, (x) => x.explanation);
  });
  bind("text-form", "text-query", "text-results", async (text, list) => {
    const r = await api("/api/search/text", { method: "POST", body: { text } });
    renderLinks(list, r.items, (x) => `max ${fmt(x.max_value)} at ${JSON.stringify(x.token)}`);
  });
  if (document.body.dataset.live !== "true") {
    $("text-search").disabled = true;
    $("text-query").placeholder = "live encoding is off: the server runs without a model";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadMeta();
  const page = document.body.dataset.page;
  if (page === "index") initIndex();
  else if (page === "feature") initFeature();
  else if (page === "search") initSearch();
  else if (page === "vector") initVector();
});
