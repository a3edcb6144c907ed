"""`report.html`: the metrics next to the paper's MagicLens-B/L numbers, and sample queries with their results."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path

from magiclens_core.evaluation.benchmarks.base import Benchmark, ImageRef, PaperResults, Query, open_image
from magiclens_core.images.decode import ImageDecodeError

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}.query{display:flex;gap:8px;align-items:flex-start;margin:12px 0}
figure{margin:0;width:110px;font-size:11px;text-align:center;word-break:break-all}img{width:100px;height:100px;object-fit:cover;
border:4px solid #ddd}.hit img{border-color:#2a2}.ref img{border-color:#36c}.text{width:220px;font-size:13px}
.broken{width:100px;height:100px;border:4px solid #c33;display:flex;align-items:center;justify-content:center}
"""


def thumbnail(ref: ImageRef, size: int = 100) -> str:
    """An `<img>` of the image as a small inline JPEG, or a box naming why it cannot be shown."""
    try:
        image = open_image(ref)
    except ImageDecodeError as err:
        return f'<div class="broken">{html.escape(err.reason)}</div>'
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}" alt="">'


def _number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def metrics_table(benchmark: Benchmark, metrics: Mapping[str, float], paper: PaperResults | None) -> str:
    """Our metrics and the paper's MagicLens-B/L numbers (the protocol's `paper`), one row per metric either
    side has."""
    paper_split, paper = (paper.split, paper.numbers) if paper else ("", {})
    rows = []
    for name in [*metrics, *(name for name in paper if name not in metrics)]:
        base, large = paper.get(name, (None, None))
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{_number(metrics.get(name))}</td>"
                    f"<td>{_number(base, 1)}</td><td>{_number(large, 1)}</td></tr>")
    return (f"<table><tr><th>metric</th><th>this run ({html.escape(benchmark.split)})</th>"
            f"<th>MagicLens-B, paper ({paper_split})</th><th>MagicLens-L, paper ({paper_split})</th></tr>"
            f"{''.join(rows)}</table>")


def _figure(ref: ImageRef, caption: str, css: str) -> str:
    return f'<figure class="{css}">{thumbnail(ref)}<figcaption>{html.escape(caption)}</figcaption></figure>'


def query_row(benchmark: Benchmark, query: Query, ranking: Sequence[str], top: int) -> str:
    """The reference image, the instruction, and the top results; right answers have a green frame."""
    results = [_figure(benchmark.images[image_id], f"{rank}. {image_id}" + (" ✓" if image_id in query.ground_truth
                                                                             else ""),
                       "hit" if image_id in query.ground_truth else "")
               for rank, image_id in enumerate(ranking[:top], start=1)]
    return (f'<div class="query">{_figure(benchmark.images[query.reference], "query " + query.id, "ref")}'
            f'<div class="text">{html.escape(query.text)}</div>{"".join(results)}</div>')


def sample_queries(queries: Sequence[Query], count: int) -> list[Query]:
    """`count` queries spread evenly over the list (all of them when there are fewer)."""
    if len(queries) <= count:
        return list(queries)
    return [queries[round(i * (len(queries) - 1) / max(1, count - 1))] for i in range(count)]


def write_report(path: str | PathLike, benchmark: Benchmark, metrics: Mapping[str, float],
                 rankings: Mapping[str, Sequence[str]], paper: PaperResults | None = None,
                 model_id: str | None = None, files: Sequence[str] = (), samples: int = 12, top: int = 5) -> Path:
    """Write a self-contained `report.html` (thumbnails are inline) and return its path."""
    title = f"MagicLens evaluation: {benchmark.name} ({benchmark.split})"
    notes = [f"model: {html.escape(model_id or 'unnamed')}",
             f"queries: {len(benchmark.queries)}"]
    notes += [f"missing: {html.escape(name)} ({html.escape(str(where))})" for name, where in benchmark.missing.items()]
    notes += [f"file: {html.escape(name)}" for name in files]
    table = metrics_table(benchmark, metrics, paper) if metrics else \
        "<p>No ground truth on this split: submit the files above to the benchmark's server.</p>"
    grid = "".join(query_row(benchmark, query, rankings[query.id], top)
                   for query in sample_queries(benchmark.queries, samples))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<ul>{''.join(f'<li>{note}</li>' for note in notes)}</ul><h2>Metrics</h2>{table}"
            f"<h2>Sample queries</h2><p>Blue: the query image. Green: a right answer.</p>{grid}</body></html>")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
