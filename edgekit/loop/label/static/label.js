// edgekit label: the page. Plain JavaScript, no build step; talks to edgekit/loop/label/server.py.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const kid of kids) e.append(kid);
  return e;
};
const SVG = "http://www.w3.org/2000/svg";
const RESERVED = new Set(["s", "z", "x", "g"]);
const TOKEN = new URLSearchParams(location.search).get("token");

const S = {
  cfg: null, user: "", cur: null, sel: null, trail: [], pos: -1, saves: [], busy: false,
  mode: "one", grid: [], rejected: new Set(), passed: new Set(), keys: {}, keysOf: {},
};

async function api(method, path, body) {
  const headers = { "X-Edgekit": "1" };
  if (TOKEN) headers["X-Edgekit-Token"] = TOKEN;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    return { ok: false, status: 0, data: { error: `the labeling server does not answer (${err.message}); is edgekit label still running?` } };
  }
  let data = {};
  try { data = await res.json(); } catch (_) { data = { error: `HTTP ${res.status}` }; }
  return { ok: res.ok, status: res.status, data };
}

function banner(text, kind = "error") {
  const b = $("#banner");
  if (!text) { b.hidden = true; b.textContent = ""; return; }
  b.hidden = false; b.className = kind === "info" ? "info" : ""; b.textContent = text;
}

function when(ts) {
  if (!ts) return "";
  const d = new Date(ts * 1000);
  return d.toLocaleDateString() === new Date().toLocaleDateString() ? d.toLocaleTimeString() : d.toLocaleString();
}

function labelName(label) { return label === S.cfg.invalid_label ? "none of these" : label; }

// -- keys: a class's own one-character name, else 1-9/0 by position, and first letters ----------------
function buildKeys(classes) {
  const map = {}, keysOf = {};
  const add = (k, c) => { if (!(k in map)) { map[k] = c; (keysOf[c] = keysOf[c] || []).push(k); } };
  classes.forEach((c) => { const k = c.toLowerCase(); if (k.length === 1 && /[0-9a-z]/.test(k) && !RESERVED.has(k)) add(k, c); });
  classes.forEach((c, i) => { if (i < 10) add(i < 9 ? String(i + 1) : "0", c); });
  classes.forEach((c) => { const f = (c[0] || "").toLowerCase(); if (/[a-z]/.test(f) && !RESERVED.has(f)) add(f, c); });
  S.keys = map; S.keysOf = keysOf;
}

function buildClassButtons() {
  const box = $("#classes");
  box.textContent = "";
  for (const c of S.cfg.classes) {
    const keys = (S.keysOf[c] || []).join(" ");
    const b = el("button", { type: "button", "data-label": c, title: `key ${keys}` }, el("span", {}, c), el("kbd", {}, keys));
    b.addEventListener("click", () => choose(c));
    box.append(b);
  }
  const inv = el("button", { type: "button", class: "invalid", "data-label": S.cfg.invalid_label, title: "key X" },
    el("span", {}, "none of these / not a valid input"), el("kbd", {}, "x"));
  inv.addEventListener("click", () => choose(S.cfg.invalid_label));
  box.append(inv);
  const sel = $("#grid-filter");
  for (const c of S.cfg.classes) sel.append(el("option", { value: c }, c));
}

function choices() { return [...S.cfg.classes, S.cfg.invalid_label]; }

function highlight() {
  for (const b of document.querySelectorAll("#classes button")) {
    b.classList.toggle("selected", b.dataset.label === S.sel);
    b.classList.toggle("current", !!S.cur && b.dataset.label === S.cur.label);
  }
}

// -- one sample --------------------------------------------------------------------------------
function drawImage(s) {
  const img = $("#sample-img");
  $("#plot").toggleAttribute("hidden", true);  // an SVG element has no .hidden property
  img.hidden = false;
  img.onload = () => {
    const frame = $("#frame");
    const box = Math.min(frame.clientWidth - 20, 420);
    const w = img.naturalWidth, h = img.naturalHeight;
    let scale = box / Math.max(w, h);
    if (scale >= 1) scale = Math.floor(scale);  // whole pixels: a tiny image stays crisp
    img.width = Math.round(w * scale); img.height = Math.round(h * scale);
    img.classList.toggle("pixelated", scale >= 2);
  };
  img.src = `/api/image?id=${encodeURIComponent(s.sample_id)}`;
}

function drawSeries(s) {
  const svg = $("#plot");
  $("#sample-img").hidden = true;
  svg.toggleAttribute("hidden", false);
  svg.textContent = "";
  const chans = s.series.channels;
  const all = chans.flat();
  const lo = Math.min(...all), hi = Math.max(...all);
  const n = Math.max(...chans.map((c) => c.length));
  const W = 1000, H = 400;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const colours = ["#1f6feb", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a"];
  const zero = document.createElementNS(SVG, "line");
  const y0 = hi > lo ? H - ((0 - lo) / (hi - lo)) * H : H / 2;
  Object.entries({ x1: 0, x2: W, y1: y0, y2: y0, class: "axis" }).forEach(([k, v]) => zero.setAttribute(k, v));
  svg.append(zero);
  chans.forEach((c, i) => {
    const pts = c.map((v, j) => `${(j / Math.max(1, n - 1)) * W},${hi > lo ? H - ((v - lo) / (hi - lo)) * H : H / 2}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("stroke", colours[i % colours.length]);
    svg.append(line);
  });
}

function show(s, { push = true } = {}) {
  S.cur = s;
  banner("");
  if (push) { S.trail = S.trail.slice(0, S.pos + 1); S.trail.push(s.sample_id); S.pos = S.trail.length - 1; }
  document.body.dataset.sample = s.sample_id;
  document.body.dataset.version = String(s.label_version);
  if (s.kind === "series") drawSeries(s); else drawImage(s);
  $("#predicted").textContent = s.predicted;
  $("#why").textContent = `confidence ${(100 * s.confidence).toFixed(1)}%, margin ${s.margin.toFixed(3)} · flagged: ` +
    `${s.reasons.join(", ").replaceAll("_", " ") || "?"}`;
  const topk = $("#topk");
  topk.textContent = "";
  for (const t of s.top_k) {
    const bar = el("div", { class: "score" });
    bar.style.width = `${Math.round(100 * (t.score || 0))}%`;
    topk.append(el("li", {}, el("span", {}, String(t.label)), el("div", {}, bar), el("span", {}, `${(100 * (t.score || 0)).toFixed(1)}%`)));
  }
  $("#sample-meta").textContent = `${s.fleet}/${s.device} · model ${s.model.name} ${s.model.version} · ` +
    `${s.dtype} ${JSON.stringify(s.shape)} · received ${when(s.received_at)} · ${s.sample_id}`;
  const state = $("#state");
  state.className = "";
  if (s.label !== null) {
    state.textContent = `labelled ${labelName(s.label)} by ${s.labeled_by} at ${when(s.labeled_at)}` +
      (s.history.length > 1 ? ` (was ${labelName(s.history[0].previous_label) || "unlabelled"})` : "") +
      " — choose again to change it";
    state.className = "labelled";
  } else if (s.held_by) {
    state.textContent = `${s.held_by} has this sample open; a label you give now may be refused`;
    state.className = "held";
  } else state.textContent = "";
  S.sel = s.label !== null ? s.label : (S.cfg.classes.includes(s.predicted) ? s.predicted : S.cfg.classes[0]);
  highlight();
}

function showDone(progress) {
  S.cur = null;
  document.body.dataset.sample = "";
  $("#sample-img").hidden = true; $("#plot").toggleAttribute("hidden", true);
  $("#predicted").textContent = ""; $("#why").textContent = ""; $("#topk").textContent = "";
  $("#sample-meta").textContent = "";
  const state = $("#state");
  state.className = "done";
  state.textContent = progress && progress.left ? `nothing free right now: ${progress.left} left, open for someone else` : "all labelled. Thank you!";
}

async function loadNext() {
  const r = await api("POST", "/api/next", { user: S.user });
  if (!r.ok) { banner(r.data.error); return; }
  renderProgress(r.data.progress);
  if (r.data.sample) show(r.data.sample); else showDone(r.data.progress);
}

async function openSample(id, opts) {
  const r = await api("GET", `/api/sample?id=${encodeURIComponent(id)}&user=${encodeURIComponent(S.user)}`);
  if (!r.ok) { banner(r.data.error); return false; }
  show(r.data.sample, opts);
  return true;
}

async function choose(label) {
  if (S.busy || !S.cur || S.mode !== "one") return;
  S.busy = true;
  S.sel = label; highlight();
  try {
    const cur = S.cur;
    const r = await api("POST", "/api/label", { user: S.user, sample_id: cur.sample_id, label, label_version: cur.label_version });
    if (r.status === 409) {  // someone changed it meanwhile: show it as it is now, say so, save nothing
      await openSample(cur.sample_id, { push: false });
      banner(r.data.error);
      return;
    }
    if (!r.ok) { banner(r.data.error); return; }
    S.saves.push({ sample_id: cur.sample_id, label_version: r.data.saved.label_version });
    renderProgress(r.data.progress);
    refreshHistory();
    if (S.pos < S.trail.length - 1) await openSample(S.trail[S.pos + 1], { push: false }).then(() => { S.pos += 1; });
    else await loadNext();
  } finally { S.busy = false; }
}

async function skip() {
  if (S.busy || !S.cur) return;
  S.busy = true;
  try {
    await api("POST", "/api/skip", { user: S.user, sample_id: S.cur.sample_id });
    await loadNext();
  } finally { S.busy = false; }
}

async function undo() {
  if (S.busy) return;
  const last = S.saves.pop();
  if (!last) { banner("nothing to undo", "info"); return; }
  S.busy = true;
  try {
    const r = await api("POST", "/api/undo", { user: S.user, ...last });
    if (!r.ok) { banner(r.data.error); return; }
    renderProgress(r.data.progress);
    refreshHistory();
    show(r.data.sample);
    banner(`undone: ${last.sample_id} is ${r.data.sample.label === null ? "unlabelled again" : "back to " + labelName(r.data.sample.label)}`, "info");
  } finally { S.busy = false; }
}

async function move(step) {
  if (S.busy) return;
  const to = S.pos + step;
  if (step > 0 && to >= S.trail.length) { await skip(); return; }
  if (to < 0) return;
  S.busy = true;
  try { if (await openSample(S.trail[to], { push: false })) S.pos = to; } finally { S.busy = false; }
}

function moveSelection(step) {
  const all = choices();
  const i = Math.max(0, all.indexOf(S.sel));
  S.sel = all[(i + step + all.length) % all.length];
  highlight();
}

// -- the grid: accept many correct predictions at once --------------------------------------------
async function loadGrid() {
  const r = await api("POST", "/api/grid", { user: S.user, n: 36, predicted: $("#grid-filter").value,
    exclude: [...S.rejected, ...S.passed].slice(-1000) });
  if (!r.ok) { banner(r.data.error); return; }
  S.grid = r.data.samples;
  const box = $("#grid");
  box.textContent = "";
  for (const s of S.grid) {
    const img = el("img", { alt: s.sample_id, src: `/api/image?id=${encodeURIComponent(s.sample_id)}` });
    if (s.shape.length && Math.max(...s.shape.slice(0, 2)) < 64) img.classList.add("pixelated");
    const tile = el("div", { class: "tile", "data-sample": s.sample_id }, img,
      el("div", { class: "tag" }, `${s.predicted} · ${(100 * s.confidence).toFixed(0)}%`));
    tile.addEventListener("click", () => {
      if (S.rejected.has(s.sample_id)) S.rejected.delete(s.sample_id); else S.rejected.add(s.sample_id);
      tile.classList.toggle("rejected", S.rejected.has(s.sample_id));
    });
    box.append(tile);
  }
  $("#grid-status").textContent = S.grid.length ? `${S.grid.length} shown` : "nothing left to show here";
}

async function acceptGrid() {
  if (S.busy) return;
  const items = S.grid.filter((s) => !S.rejected.has(s.sample_id))
    .map((s) => ({ sample_id: s.sample_id, label: s.predicted, label_version: s.label_version }));
  if (!items.length) { banner("every tile is marked wrong; label those one by one (G)", "info"); return; }
  S.busy = true;
  try {
    const r = await api("POST", "/api/accept", { user: S.user, items });
    if (!r.ok) { banner(r.data.error); return; }
    for (const s of r.data.saved) S.saves.push({ sample_id: s.sample_id, label_version: s.label_version });
    renderProgress(r.data.progress);
    refreshHistory();
    banner(`${r.data.saved.length} accepted as predicted` + (r.data.conflicts.length ?
      `; ${r.data.conflicts.length} were changed by someone else meanwhile and kept their label: ` +
      r.data.conflicts.map((c) => c.error).join(" ") : ""), r.data.conflicts.length ? "error" : "info");
    await loadGrid();
  } finally { S.busy = false; }
}

async function toggleMode() {
  S.mode = S.mode === "one" ? "grid" : "one";
  $("#one").hidden = S.mode !== "one";
  $("#gridview").hidden = S.mode !== "grid";
  $("#mode").textContent = S.mode === "one" ? "grid view (G)" : "one at a time (G)";
  banner("");
  S.grid = []; S.passed.clear();
  if (S.mode === "grid") await loadGrid(); else await loadNext();
}

// -- progress and history ----------------------------------------------------------------------
function renderProgress(p) {
  if (!p) return;
  const total = p.labeled + p.left;
  $("#progress-fill").style.width = total ? `${(100 * p.labeled / total).toFixed(1)}%` : "0";
  $("#progress-text").textContent = `${p.labeled} labelled · ${p.left} left`;
  const box = $("#by-class");
  box.textContent = "";
  const max = Math.max(1, ...Object.values(p.by_class));
  for (const c of choices()) {
    const n = p.by_class[c] || 0;
    const fill = el("div", { class: "fill" });
    fill.style.width = `${(100 * n / max).toFixed(0)}%`;
    box.append(el("div", { class: "row", "data-label": c }, el("span", {}, labelName(c)), el("div", {}, fill), el("span", {}, String(n))));
  }
}

async function refreshHistory() {
  const r = await api("GET", "/api/history?limit=12");
  if (!r.ok) return;
  const body = $("#history tbody");
  body.textContent = "";
  for (const e of r.data.events) {
    body.append(el("tr", {}, el("td", {}, when(e.labeled_at)), el("td", {}, e.labeled_by || ""),
      el("td", { class: "id" }, e.sample_id.slice(0, 8)), el("td", {}, e.label === null ? "(none)" : labelName(e.label)),
      el("td", {}, e.previous_label === null ? "" : labelName(e.previous_label)), el("td", { class: "muted" }, e.action)));
  }
}

function renew() {
  const ids = S.mode === "grid" ? S.grid.map((s) => s.sample_id) : (S.cur && S.cur.label === null ? [S.cur.sample_id] : []);
  if (ids.length) api("POST", "/api/renew", { user: S.user, sample_ids: ids });
}

// -- keyboard ----------------------------------------------------------------------------------
function onKey(ev) {
  if (ev.target instanceof HTMLInputElement || ev.target instanceof HTMLSelectElement) return;
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
  if (k === "g") { ev.preventDefault(); toggleMode(); return; }
  if (S.mode === "grid") {
    if (k === "Enter") { ev.preventDefault(); acceptGrid(); }
    return;
  }
  let handled = true;
  if (k === "Enter") choose(S.sel);
  else if (k === "s") skip();
  else if (k === "z") undo();
  else if (k === "x") choose(S.cfg.invalid_label);
  else if (k === "ArrowLeft") move(-1);
  else if (k === "ArrowRight") move(1);
  else if (k === "ArrowUp") moveSelection(-1);
  else if (k === "ArrowDown") moveSelection(1);
  else if (k in S.keys) choose(S.keys[k]);
  else handled = false;
  if (handled) ev.preventDefault();
}

async function main() {
  const r = await api("GET", "/api/config");
  if (!r.ok) { banner(r.data.error); return; }
  S.cfg = r.data;
  S.user = localStorage.getItem("edgekit-label-user") || S.cfg.user || "someone";
  const user = $("#user");
  user.value = S.user;
  user.addEventListener("change", () => {
    const v = user.value.trim();
    if (v) { S.user = v; localStorage.setItem("edgekit-label-user", v); loadNext(); }
  });
  const f = S.cfg.filters;
  $("#source").textContent = `${S.cfg.store}` + (Object.keys(f).length ? ` · ${Object.entries(f).map(([k, v]) => `${k}=${v}`).join(" ")}` : "") +
    ` · ${S.cfg.order} order`;
  buildKeys(S.cfg.classes);
  buildClassButtons();
  $("#mode").addEventListener("click", toggleMode);
  $("#grid-accept").addEventListener("click", acceptGrid);
  $("#grid-more").addEventListener("click", () => { S.grid.forEach((s) => S.passed.add(s.sample_id)); loadGrid(); });
  $("#grid-filter").addEventListener("change", () => loadGrid());
  document.addEventListener("keydown", onKey);
  setInterval(renew, Math.max(5, S.cfg.lease_seconds / 3) * 1000);
  api("GET", "/api/progress").then((p) => p.ok && renderProgress(p.data));
  const wanted = new URLSearchParams(location.hash.slice(1)).get("sample");  // a link to one sample: #sample=ID
  if (!(wanted && await openSample(wanted))) await loadNext();
  refreshHistory();
  document.body.dataset.ready = "1";
}

main();
