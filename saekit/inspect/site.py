"""The static dashboard: index.html and latent.html with inline CSS and vanilla JS, data in data/*.js.

Data files are JavaScript that assigns to a global (not JSON read with fetch()), because browsers refuse fetch() of
file:// URLs: the site opens from disk with no server, no network and nothing from a CDN. Per-latent records live
in chunk files of CHUNK consecutive ids (`data/latents_<chunk>.js`), which latent.html loads for the id in its
`#<id>` hash, so a 131,072-latent SAE makes a few hundred files, not one page per latent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


CHUNK = 256
"""Latent ids per data chunk file."""


def chunk_name(latent: int) -> str:
    return f"latents_{latent // CHUNK:05d}.js"


def _js_assign(name: str, value) -> str:
    return f"window.{name} = {json.dumps(value, separators=(',', ':'), allow_nan=False)};\n"


def write_site(run_dir: Path, index: dict, records: Iterable[dict]) -> Path:
    """index.html, latent.html, data/index.js and data/latents_*.js in run_dir; returns index.html's path.

    records: full per-latent records in increasing id order, written one chunk at a time (bounded memory).
    """
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "index.js").write_text(_js_assign("SAEKIT_INDEX", index), encoding="utf-8")
    chunk: dict[str, dict] = {}
    current = None
    for record in records:
        name = chunk_name(record["index"])
        if current is not None and name != current:
            _write_chunk(data / current, chunk)
            chunk = {}
        current = name
        chunk[str(record["index"])] = record
    if current is not None:
        _write_chunk(data / current, chunk)
    (run_dir / "latent.html").write_text(_page("latent", LATENT_BODY, LATENT_JS), encoding="utf-8")
    (run_dir / "index.html").write_text(_page("index", INDEX_BODY, INDEX_JS), encoding="utf-8")
    return run_dir / "index.html"


def _write_chunk(path: Path, records: dict) -> None:
    body = json.dumps(records, separators=(",", ":"), allow_nan=False)
    path.write_text(f"window.SAEKIT_LATENTS = window.SAEKIT_LATENTS || {{}};\n"
                    f"Object.assign(window.SAEKIT_LATENTS, {body});\n", encoding="utf-8")


def _page(kind: str, body: str, script: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>saekit inspect</title>\n<style>{CSS}</style>\n"
            f"<script src=\"data/index.js\"></script>\n</head>\n<body class=\"{kind}\">\n{body}\n"
            f"<script>\n{COMMON_JS}\n{script}\n</script>\n</body></html>\n")


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.2em 2em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; } h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
.meta { color: #555; margin-bottom: .8em; }
table { border-collapse: collapse; }
th, td { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { cursor: pointer; user-select: none; background: #f6f6f6; position: sticky; top: 0; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
td.tokens, th.tokens { text-align: left; font-family: ui-monospace, monospace; }
tr.dead td { color: #aaa; } .deadmark { color: #b00; font-weight: 600; }
#controls { margin: .6em 0; } #search { width: 22em; padding: 3px 6px; }
.ctx { font-family: ui-monospace, monospace; white-space: pre; margin: 2px 0; padding: 2px 4px;
       border-left: 3px solid #ddd; overflow-x: auto; }
.tok { border-radius: 2px; }
.tok.focus { outline: 1.5px solid #c60; }
.ctxval { display: inline-block; width: 5.5em; color: #666; font-size: .85em; }
.cols { display: flex; gap: 2.5em; flex-wrap: wrap; }
.logits td { font-family: ui-monospace, monospace; }
svg .bar { fill: #4a7ab8; } svg .deadbar { fill: #b00; }
a { color: #2456a4; text-decoration: none; } a:hover { text-decoration: underline; }
.binhead { color: #555; margin: .6em 0 .2em; }
"""

COMMON_JS = r"""
"use strict";
const INDEX = window.SAEKIT_INDEX;
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}
function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}
function fmt(x, digits) { return x === null || x === undefined ? "" : Number(x).toPrecision(digits || 3); }
function bars(counts, width, height, cls, title) {
  const svg = svgEl("svg", {width: width, height: height, viewBox: `0 0 ${width} ${height}`});
  const top = Math.max(1, ...counts);
  const w = width / Math.max(1, counts.length);
  counts.forEach((c, i) => {
    const h = c > 0 ? Math.max(1, height * c / top) : 0;
    const r = svgEl("rect", {x: i * w, y: height - h, width: Math.max(0.5, w - 0.5), height: h, class: cls || "bar"});
    if (title) { const t = svgEl("title", {}); t.textContent = title(i, c); r.append(t); }
    svg.append(r);
  });
  return svg;
}
function latentHref(id) { return `latent.html#${id}`; }
"""

INDEX_BODY = """
<h1>saekit inspect</h1>
<div class="meta" id="meta"></div>
<h2>Feature density (log10 firing rate)</h2>
<div id="density"></div>
<div id="controls"><input id="search" type="search" placeholder="search: latent id or token text">
  <span id="count"></span> <button id="prev">&larr;</button> <button id="next">&rarr;</button></div>
<table id="latents"><thead><tr>
  <th data-key="id">latent</th><th data-key="log10_density">log10 density</th><th data-key="mean">mean act</th>
  <th data-key="max">max act</th><th class="tokens" data-key="tokens">top tokens</th><th>activations</th>
</tr></thead><tbody></tbody></table>
"""

INDEX_JS = r"""
const PAGE = INDEX.page_size;
const cols = INDEX.columns;
const rows = cols.id.map((id, r) => ({id: id, log10_density: cols.log10_density[r], mean: cols.mean[r],
  max: cols.max[r], tokens: cols.top_tokens[r], spark: cols.spark[r], dead: cols.dead[r], page: cols.page[r]}));
let shown = rows, sortKey = "id", sortDir = 1, offset = 0;
function renderMeta() {
  const m = INDEX.meta;
  document.getElementById("meta").textContent =
    `${m.model} · ${m.hook}${m.hook_out ? " → " + m.hook_out : ""} · ${m.activation} · n=${m.n} · ` +
    `${m.n_tokens.toLocaleString()} tokens inspected (${m.data}) · ${m.dead} dead latents · ${m.ckpt}`;
  const h = INDEX.density_hist;
  const box = document.getElementById("density");
  box.append(bars(h.counts, 480, 90, "bar", (i, c) => `log10 density ${fmt(h.edges[i])}..${fmt(h.edges[i + 1])}: ${c}`));
  box.append(el("div", {class: "meta", text: `log10 density from ${fmt(h.edges[0])} to ${fmt(h.edges[h.edges.length - 1])}; ${h.dead} dead latents (never fired) not shown`}));
}
function compare(a, b) {
  const x = a[sortKey], y = b[sortKey];
  if (x === y) return a.id - b.id;
  if (x === null) return 1; if (y === null) return -1;   // dead latents (no density) sort last either way
  return (x < y ? -1 : 1) * sortDir;
}
function applyFilter() {
  const q = document.getElementById("search").value.trim().toLowerCase();
  shown = q === "" ? rows.slice() : rows.filter(r => String(r.id) === q || r.tokens.toLowerCase().includes(q));
  shown.sort(compare);
  offset = 0;
  renderRows();
}
function renderRows() {
  const body = document.querySelector("#latents tbody");
  body.replaceChildren();
  for (const r of shown.slice(offset, offset + PAGE)) {
    const id = r.page ? el("a", {href: latentHref(r.id), text: String(r.id)}) : String(r.id);
    const tr = el("tr", {"data-id": r.id, class: r.dead ? "dead" : ""},
      el("td", {}, id),
      el("td", {}, r.dead ? el("span", {class: "deadmark", text: "dead"}) : fmt(r.log10_density)),
      el("td", {text: fmt(r.mean)}), el("td", {text: fmt(r.max)}),
      el("td", {class: "tokens", text: r.tokens}), el("td", {}, bars(r.spark, 60, 14)));
    body.append(tr);
  }
  const end = Math.min(shown.length, offset + PAGE);
  document.getElementById("count").textContent = `${shown.length ? offset + 1 : 0}–${end} of ${shown.length} latents`;
  document.querySelectorAll("#latents th").forEach(th => {
    th.classList.toggle("sorted-asc", th.dataset.key === sortKey && sortDir === 1);
    th.classList.toggle("sorted-desc", th.dataset.key === sortKey && sortDir === -1);
  });
}
document.querySelectorAll("#latents th[data-key]").forEach(th => th.addEventListener("click", () => {
  sortDir = th.dataset.key === sortKey ? -sortDir : (th.dataset.key === "id" || th.dataset.key === "tokens" ? 1 : -1);
  sortKey = th.dataset.key;
  shown.sort(compare);
  offset = 0;
  renderRows();
}));
document.getElementById("search").addEventListener("input", applyFilter);
document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); renderRows(); });
document.getElementById("next").addEventListener("click", () => {
  if (offset + PAGE < shown.length) { offset += PAGE; renderRows(); } });
renderMeta();
applyFilter();
"""

LATENT_BODY = """
<div><a href="index.html">&larr; all latents</a> · <a id="prevlat">prev</a> · <a id="nextlat">next</a></div>
<h1 id="title"></h1>
<div class="meta" id="stats"></div>
<div id="content"></div>
"""

LATENT_JS = r"""
const CHUNK = INDEX.chunk;
const loaded = new Set();
function currentId() { const id = parseInt(location.hash.slice(1), 10); return Number.isFinite(id) ? id : INDEX.columns.id[0]; }
function chunkFile(id) { return `data/latents_${String(Math.floor(id / CHUNK)).padStart(5, "0")}.js`; }
function show() {
  const id = currentId();
  const row = INDEX.columns.id.indexOf(id);
  document.getElementById("title").textContent = `Latent ${id}`;
  if (row < 0 || !INDEX.columns.page[row]) {
    document.getElementById("stats").textContent = row < 0 ? "no such latent" : "this latent has no page (inspect.latents)";
    document.getElementById("content").replaceChildren();
    return;
  }
  const file = chunkFile(id);
  if (!loaded.has(file)) {
    const s = document.createElement("script");
    s.src = file;
    s.onload = () => { loaded.add(file); show(); };
    document.head.append(s);
    return;
  }
  render(window.SAEKIT_LATENTS[String(id)]);
}
function context(c, top) {
  const line = el("div", {class: "ctx", "data-window": c.window, "data-position": c.position});
  line.append(el("span", {class: "ctxval", text: fmt(c.max_value)}));
  c.tokens.forEach((t, i) => {
    const v = c.values[i];
    const a = top > 0 ? Math.max(0, Math.min(1, v / top)) : 0;
    const span = el("span", {class: "tok" + (i === c.qualifying_token_index ? " focus" : ""), "data-value": v,
                             title: `${JSON.stringify(t)}: ${fmt(v)}`, text: t});
    if (v > 0) span.style.background = `rgba(230, 110, 0, ${0.12 + 0.78 * a})`;
    line.append(span);
  });
  return line;
}
function logitsTable(title, strs, vals) {
  const t = el("table", {class: "logits"}, el("tr", {}, el("th", {text: title}), el("th", {text: "effect"})));
  strs.forEach((s, i) => t.append(el("tr", {}, el("td", {text: JSON.stringify(s)}), el("td", {text: fmt(vals[i])}))));
  return t;
}
function render(f) {
  const top = f.max_value;
  const stats = f.dead ? "dead: never fired on the inspected tokens" :
    `log10 density ${fmt(f.log10_density)} (fires on ${f.fires.toLocaleString()} tokens) · mean act ${fmt(f.mean_value)} · max act ${fmt(f.max_value)}`;
  document.getElementById("stats").textContent = stats;
  const content = document.getElementById("content");
  content.replaceChildren();
  const hist = el("div", {id: "hist"}, el("h2", {text: "Activation histogram"}));
  if (f.freq_hist_data_bar_heights.length) {
    const v = f.freq_hist_data_bar_values;
    hist.append(bars(f.freq_hist_data_bar_heights, 360, 80, "bar", (i, c) => `≈${fmt(v[i])}: ${c}`));
    hist.append(el("div", {class: "meta", text: `activation ≈${fmt(v[0])} … ≈${fmt(v[v.length - 1])} (log scale)`}));
  }
  const logits = el("div", {id: "logits"}, el("h2", {text: "Logit effects (direct, see docs)"}));
  if (f.pos_str.length) {
    logits.append(el("div", {class: "cols"}, logitsTable("promotes", f.pos_str, f.pos_values),
                     logitsTable("suppresses", f.neg_str, f.neg_values)));
  } else logits.append(el("div", {class: "meta", text: "not available for this SAE's output (see docs/inspect.md)"}));
  const near = el("div", {id: "neighbours"}, el("h2", {text: "Nearest latents (decoder cosine)"}));
  const list = el("table", {});
  f.topk_cos_sim_indices.forEach((j, i) => {
    const r = INDEX.columns.id.indexOf(j);
    const toks = r >= 0 ? INDEX.columns.top_tokens[r] : "";
    list.append(el("tr", {}, el("td", {}, el("a", {href: latentHref(j), class: "neighbour", text: `latent ${j}`})),
                   el("td", {text: fmt(f.topk_cos_sim_values[i])}), el("td", {class: "tokens", text: toks})));
  });
  near.append(list);
  content.append(el("div", {class: "cols"}, hist, logits, near));
  const tops = el("div", {id: "top"}, el("h2", {text: "Top activating contexts"}));
  const quant = el("div", {id: "quantiles"}, el("h2", {text: "Contexts by activation quantile (uniform sample of firing windows)"}));
  let lastBin = null;
  for (const c of f.activations) {
    if (c.bin === "top") { tops.append(context(c, top)); continue; }
    if (c.bin !== lastBin) {
      quant.append(el("div", {class: "binhead", text: `${c.bin}: max activation ${fmt(c.bin_min)} – ${fmt(c.bin_max)} (${fmt(100 * c.bin_contains, 2)}% of sampled windows)`}));
      lastBin = c.bin;
    }
    quant.append(context(c, top));
  }
  content.append(tops, quant);
  const row = INDEX.columns.id.indexOf(f.index);
  const prev = INDEX.columns.id[row - 1], next = INDEX.columns.id[row + 1];
  document.getElementById("prevlat").href = prev === undefined ? "#" + f.index : latentHref(prev);
  document.getElementById("nextlat").href = next === undefined ? "#" + f.index : latentHref(next);
  document.title = `latent ${f.index} · saekit inspect`;
}
window.addEventListener("hashchange", show);
show();
"""
