"""The synthetic composed-retrieval benchmark: a retrieval-set folder (`queries.parquet`, `pool.parquet`)
as `SyntheticWorld.write_benchmark` writes it (or any retrieval set in that format).

One task; each query has exactly one right answer in the pool. Images are the folder's encoded bytes (or
the paths its cells name), so nothing else needs to be on disk.
"""

from __future__ import annotations

from pathlib import Path

from magiclens_core.evaluation.benchmarks.base import Benchmark, BenchmarkDataError, ImageRef, Query, Task, check_split
from magiclens_core.evaluation.retrieval_set import POOL_FILE, QUERIES_FILE, read_retrieval_set

SPLITS = ("val",)


def _ref(value: bytes | str, listed_in: Path, image_id: str) -> ImageRef:
    if isinstance(value, bytes):
        return ImageRef(listed_in / image_id, data=value)
    return ImageRef(Path(value))


def load(root: Path, split: str = "val") -> Benchmark:
    """The held-out queries of a retrieval-set folder against its pool."""
    check_split("synthetic", split, SPLITS)
    if not (root / QUERIES_FILE).is_file() or not (root / POOL_FILE).is_file():
        raise BenchmarkDataError(f"{root} is not a retrieval-set folder: it needs {QUERIES_FILE} and {POOL_FILE} "
                                 "(write one with `python -m magiclens_core.synthetic benchmark DIR`)")
    retrieval_set = read_retrieval_set(root)
    images = {pool_id: _ref(value, root / POOL_FILE, pool_id)
              for pool_id, value in zip(retrieval_set.pool_ids, retrieval_set.pool_images, strict=True)}
    queries = []
    for query_id, value, text, answer in zip(retrieval_set.query_ids, retrieval_set.query_images,
                                             retrieval_set.instructions, retrieval_set.answers, strict=True):
        reference = f"query/{query_id}"
        images[reference] = _ref(value, root / QUERIES_FILE, query_id)
        target = retrieval_set.pool_ids[answer]
        queries.append(Query(id=query_id, reference=reference, text=text, ground_truth=frozenset([target]),
                             target=target))
    return Benchmark("synthetic", split, root, [Task("synthetic", queries, list(retrieval_set.pool_ids))], images)
