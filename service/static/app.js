// The search page: queries POST /v1/search; the panel shows GET /v1/indexes. No framework, no build.
"use strict";

const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const token = $("token").value || localStorage.getItem("ragpipe-token");
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// The hit's text with the spans the service marked (characters matching the query's terms) in <mark>.
function highlighted(text, spans) {
  const out = el("div", { class: "text" });
  let at = 0;
  for (const [start, end] of spans) {
    if (start < at) continue;
    out.append(document.createTextNode(text.slice(at, start)));
    out.append(el("mark", {}, text.slice(start, end)));
    at = end;
  }
  out.append(document.createTextNode(text.slice(at)));
  return out;
}

function fmt(x) { return x === null || x === undefined ? "–" : (typeof x === "number" ? x.toFixed(4) : String(x)); }

function scoreTable(hit) {
  const table = el("table", { class: "scores" });
  table.append(el("tr", {}, el("th", {}, "stage"), el("th", {}, "score"), el("th", {}, "rank")));
  for (const stage of ["bm25", "vector", "fused", "rerank"]) {
    table.append(el("tr", { "data-stage": stage }, el("td", {}, stage), el("td", {}, fmt(hit[stage].score)),
                    el("td", {}, hit[stage].rank ?? "–")));
  }
  return table;
}

function renderHit(hit) {
  const heading = hit.heading_path.length ? hit.heading_path.join(" › ") : "(no heading)";
  return el("li", { class: "hit", "data-chunk-id": hit.chunk_id },
    el("div", { class: "heading" }, heading),
    el("div", { class: "where" }, `${hit.source_uri} · ${hit.doc_id} · characters ${hit.char_start}–${hit.char_end}`),
    highlighted(hit.text, hit.highlights || []),
    scoreTable(hit),
    el("div", { class: "where" }, "score ", fmt(hit.score), " · served by ",
       el("span", { class: "version" }, hit.index_version)));
}

async function search(event) {
  event.preventDefault();
  const body = { query: $("query").value, k: Number($("k").value) || 10 };
  if ($("index").value) body.index = $("index").value;
  $("status").textContent = "Searching…";
  $("status").className = "";
  $("hits").replaceChildren();
  const started = performance.now();
  const response = await fetch("/v1/search", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await response.json();
  if (!response.ok) {
    const detail = Array.isArray(data.detail) ? data.detail.map((d) => d.msg).join("; ") : JSON.stringify(data.detail);
    $("status").textContent = `Error ${response.status}: ${detail}`;
    $("status").className = "error";
    return;
  }
  const ms = (performance.now() - started).toFixed(0);
  $("status").replaceChildren(`${data.hits.length} hits from index ${data.index}, version `,
    el("span", { class: "version", id: "served-version" }, data.version), ` (${ms} ms)`);
  $("hits").replaceChildren(...data.hits.map(renderHit));
}

function renderIndexes(data) {
  const box = $("indexes");
  box.replaceChildren();
  const select = $("index");
  const chosen = select.value;
  select.replaceChildren(...data.indexes.map((x) => el("option", { value: x.alias }, x.alias)));
  if (chosen) select.value = chosen;
  for (const x of data.indexes) {
    const section = el("section", { class: "alias", "data-alias": x.alias });
    section.append(el("h3", {}, x.alias, " → ", el("span", { class: "version" }, x.serving || "not loaded")));
    if (x.degraded) section.append(el("p", { class: "degraded" }, `registry names ${x.named}, which was refused`));
    if (x.shadow_version) section.append(el("p", {}, "shadow: ", el("span", { class: "version" }, x.shadow_version)));
    const versions = el("table", { class: "versions" });
    versions.append(el("tr", {}, el("th", {}, "version"), el("th", {}, "status"), el("th", {}, "role"),
                       el("th", {}, "chunks"), el("th", {}, "validation")));
    for (const v of x.versions || []) {
      const metrics = Object.entries(v.metrics || {}).filter(([, m]) => typeof m !== "object")
        .map(([k, m]) => `${k}=${typeof m === "number" ? +m.toFixed(4) : m}`).join(" ");
      versions.append(el("tr", {}, el("td", { class: "version" }, v.version), el("td", {}, v.status),
                         el("td", {}, v.role || ""), el("td", {}, fmt(v.chunks)), el("td", {}, metrics)));
    }
    section.append(el("h4", {}, "Versions"), versions);
    const runs = el("table", { class: "runs" });
    runs.append(el("tr", {}, el("th", {}, "run"), el("th", {}, "status"), el("th", {}, "started"), el("th", {}, "counts")));
    for (const r of x.runs || []) {
      const counts = Object.entries(r.counts || {}).map(([k, n]) => `${k}=${n}`).join(" ");
      runs.append(el("tr", {}, el("td", {}, r.run_id), el("td", {}, r.status), el("td", {}, r.started_at.slice(0, 19)),
                     el("td", {}, counts)));
    }
    section.append(el("h4", {}, "Latest runs"), runs);
    box.append(section);
  }
}

async function loadIndexes() {
  try {
    const response = await fetch("/v1/indexes", { headers: headers() });
    if (response.ok) renderIndexes(await response.json());
    else $("indexes").replaceChildren(el("p", { class: "error" }, `indexes: ${response.status}`));
  } catch (err) {
    $("indexes").replaceChildren(el("p", { class: "error" }, String(err)));
  }
}

$("search-form").addEventListener("submit", search);
$("token").addEventListener("change", () => { localStorage.setItem("ragpipe-token", $("token").value); loadIndexes(); });
loadIndexes();
setInterval(loadIndexes, 10000);
