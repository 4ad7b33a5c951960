"""What the ``ragpipe`` command prints for people: pure functions from results to text.

``pipeline.cli`` runs a command, then prints one of these (or the result's JSON with ``--json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: printing needs none of the pipeline loaded
    from pipeline.gc import GcReport
    from pipeline.runner import RunSummary
    from registry.rows import RunListing
    from registry.versions import AliasMove
    from retrieval.hit import Hit

MAX_SKIPPED_LISTED = 50


def format_summary(s: RunSummary) -> str:
    """A run's summary: what it saw, chunked and embedded, how long each stage took, what it published."""
    d, c, e = s.documents, s.chunks, s.embedding
    lines = [
        f"run {s.run_id} on index {s.index!r}: {s.status}" + (f", version {s.version}" if s.version else ", nothing changed"),
        f"  documents  seen {d['seen']}  new {d['new']}  changed {d['changed']}  unchanged {d['unchanged']}"
        f"  metadata-only {d['metadata_only']}  deleted {d['deleted']}  skipped {d['skipped']}",
        f"  chunks     added {c['added']}  removed {c['removed']}  kept {c['kept']}  active {c['active']}",
        f"  embedding  {e['chunks_embedded']} embedded ({e['chars_embedded']} chars), {e['chunks_cached']} from cache"
        f"  [{s.model_id}]",
        "  seconds    " + "  ".join(f"{k} {v:.3f}" for k, v in s.stage_seconds.items()),
    ]
    if s.alias:
        a = s.alias
        role = "shadow of" if a["action"] == "shadow" else "live on"
        lines.append(f"  alias      {a['version']} is {role} {a['alias']!r}"
                     + (f" (was {a['previous']})" if a["previous"] else "")
                     + ("  [full build]" if s.full_build else ""))
    if s.metrics:
        lines.append("  validated  " + "  ".join(f"{k} {v}" for k, v in s.metrics.items()))
    if s.recovered:
        lines.append(f"  recovered  unfinished versions {', '.join(s.recovered)}")
    if s.skipped:
        lines.append(f"  skipped ({len(s.skipped)}):")
        lines.extend(f"    {item['doc_id']}: {item['reason']}" for item in s.skipped[:MAX_SKIPPED_LISTED])
        if len(s.skipped) > MAX_SKIPPED_LISTED:
            lines.append(f"    ... and {len(s.skipped) - MAX_SKIPPED_LISTED} more (--json lists all)")
    return "\n".join(lines)


def format_run(r: RunListing) -> str:
    """One recorded run (a row of ``runs list``): outcome, version, what changed, what was embedded, seconds."""
    counts = r.counts or {}
    d, c, e = counts.get("documents") or {}, counts.get("chunks") or {}, counts.get("embedding") or {}
    took = (r.finished_at - r.started_at).total_seconds() if r.finished_at else None
    head = (f"run {r.run_id} ({r.owner}) on index {r.index_name!r}: {r.status}"
            + (f", version {counts['version']}" if counts.get("version") else
               ", nothing changed" if r.status == "succeeded" else "")
            + (f", {took:.1f} s" if took is not None else ""))
    lines = [head]
    if d:
        lines.append(f"  documents  seen {d.get('seen', 0)}  new {d.get('new', 0)}  changed {d.get('changed', 0)}  "
                     f"unchanged {d.get('unchanged', 0)}  deleted {d.get('deleted', 0)}  skipped {d.get('skipped', 0)}")
    if c:
        lines.append(f"  chunks     added {c.get('added', 0)}  removed {c.get('removed', 0)}"
                     f"  active {c.get('active', 0)}")
    if e:
        lines.append(f"  embedding  {e.get('chunks_embedded', 0)} embedded, {e.get('chunks_cached', 0)} from cache")
    if r.error:
        lines.append(f"  error      {r.error}")
    return "\n".join(lines)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as left-aligned columns under a header line (the header alone when there are none)."""
    cells = [[format_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.extend("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)
    return "\n".join(lines)


def format_cell(value: Any) -> str:
    """A table cell: '-' for nothing, key=value pairs for a mapping, seconds precision for times."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def format_alias_move(move: AliasMove) -> str:
    return f"alias {move.alias}: {move.previous} -> {move.version} ({move.action})"


def format_served(stats: Mapping[str, Mapping[str, Any]]) -> str:
    """What serving processes measured of a version, per role: ``canary 420q overlap@10 0.91 p95 12ms``."""
    parts = []
    for role in ("live", "canary", "shadow"):
        s = stats.get(role)
        if not s:
            continue
        text = f"{role} {s['queries']}q"
        if s.get("overlap@10") is not None:
            text += f" overlap@10 {s['overlap@10']:.2f}"
        if s.get("p95_ms") is not None:
            text += f" p95 {s['p95_ms']:g}ms"
        parts.append(text)
    return "; ".join(parts)


def format_versions_gc(result: Mapping[str, Any]) -> str:
    return (f"removed {len(result['versions_removed'])} versions, {result['rows_removed']} registry rows and"
            f" {result['stats_removed']} serving statistics rows")


def format_gc(report: GcReport) -> str:
    """What ``ragpipe gc`` removed: versions and their rows, segments, run workspaces, cache entries,
    downloaded copies."""
    versions = f" ({', '.join(report.versions_removed)})" if report.versions_removed else ""
    return "\n".join([
        f"gc of index {report.index!r}",
        f"  versions         {len(report.versions_removed)} removed{versions}, {report.rows_removed} registry rows,"
        f" {report.stats_removed} serving statistics rows",
        f"  segments         {len(report.segments_removed)} removed, {len(report.deletions_removed)} deletion sets "
        f"({report.segment_bytes} bytes): listed by no retained version",
        f"  run files        {len(report.runs_removed)} finished runs' workspaces removed ({report.run_bytes} bytes)",
        f"  embedding cache  {report.embeddings_removed} entries removed ({report.embedding_bytes} bytes of vectors):"
        f" used by no retained version, older than {format_duration(report.embedding_cache_ttl)}",
        f"  download cache   {len(report.downloads_removed)} directories removed ({report.download_bytes} bytes)",
    ])


def format_duration(seconds: float) -> str:
    """A duration in the largest unit that keeps it readable: days, hours, else seconds."""
    for unit, size in (("days", 86400.0), ("hours", 3600.0)):
        if seconds >= size:
            return f"{seconds / size:.4g} {unit}"
    return f"{seconds:.4g} s"


def format_pages(hit: Hit) -> str:
    """"p. 3" or "pp. 3-4", with the printed labels where the file defines them."""
    span = f"p. {hit.page_start}" if hit.page_start == hit.page_end else f"pp. {hit.page_start}-{hit.page_end}"
    labels = [label for label in dict.fromkeys([hit.page_label_start, hit.page_label_end]) if label]
    return span + (f" (labelled {'-'.join(labels)})" if labels else "")


def format_hits(hits: Sequence[Hit], alias: str, version: str | None) -> str:
    """Search hits, best first: score, document, heading path and characters, each stage's score and
    rank, the start of the text and the source."""
    lines = [f"{len(hits)} hits from {alias!r} version {version}"]
    for rank, h in enumerate(hits, start=1):
        where = " > ".join(h.heading_path) or "(no heading)"
        pages = "" if h.page_start is None else f"  {format_pages(h)}"
        lines.append(f"{rank:>2}. {h.score:.4f}  {h.doc_id}  [{where}]{pages}  chars {h.char_start}-{h.char_end}")
        stages = "  ".join(f"{name} {s.score:.4f} (#{s.rank})" if s.score is not None else f"{name} -"
                           for name, s in (("bm25", h.bm25), ("vector", h.vector), ("fused", h.fused),
                                           ("rerank", h.rerank)))
        lines.append(f"    {stages}")
        snippet = " ".join(h.text.split())
        lines.append(f"    {snippet[:160]}{'...' if len(snippet) > 160 else ''}")
        lines.append(f"    {h.source_uri}")
    return "\n".join(lines)


def format_evaluation(result: Mapping[str, Any]) -> str:
    """An evaluation: the data set's size and model, then one row of metrics per mode."""
    head = (f"{result['dataset']}: {result['documents']} documents, {result['chunks']} chunks, "
            f"{result['queries']} queries, model {result['model_id']}")
    table = format_table([{"mode": m, **v} for m, v in result["modes"].items()],
                         ["mode", "ndcg@10", "recall@100", "mrr@10", "latency_p50_ms", "latency_p95_ms"])
    return f"{head}\n{table}"


def format_replay(result: Mapping[str, Any]) -> str:
    """A replay's counts, one per line (the per-check list and the no-op's stages only in --json)."""
    return "\n".join(f"{key:36} {value}" for key, value in result.items()
                     if key not in {"checks", "noop_stage_seconds"})
