"""The synthetic composed-retrieval benchmark: a retrieval set, i.e. a folder (`queries.parquet`,
`pool.parquet`) as `SyntheticWorld.write_benchmark` writes it, or a Parquet file (or folder) of held-out
triplets, whose distinct targets are the pool. This is also what training validates on.

One task; each query has exactly one right answer in the pool. Images are the set's encoded bytes (or
the paths its cells name), so nothing else needs to be on disk. Metrics: Recall@1/5/10 (the default
protocol's per-task recall).
"""

from __future__ import annotations

from pathlib import Path

from magiclens_core.evaluation.benchmarks.base import (
    Benchmark,
    BenchmarkDataError,
    BenchmarkProtocol,
    ImageRef,
    Query,
    Task,
)
from magiclens_core.evaluation.retrieval_set import POOL_FILE, QUERIES_FILE, RetrievalSet, read_retrieval_set


def _ref(value: bytes | str, listed_in: Path, image_id: str) -> ImageRef:
    if isinstance(value, bytes):
        return ImageRef(listed_in / image_id, data=value)
    return ImageRef(Path(value))


def as_benchmark(retrieval_set: RetrievalSet, root: Path, split: str = "val") -> Benchmark:
    """A retrieval set as a one-task benchmark; `root` (where it was read from) names its images."""
    queries_at, pool_at = (root / QUERIES_FILE, root / POOL_FILE) if root.is_dir() else (root, root)
    images = {pool_id: _ref(value, pool_at, pool_id)
              for pool_id, value in zip(retrieval_set.pool_ids, retrieval_set.pool_images, strict=True)}
    queries = []
    for query_id, value, text, answer in zip(retrieval_set.query_ids, retrieval_set.query_images,
                                             retrieval_set.instructions, retrieval_set.answers, strict=True):
        reference = f"query/{query_id}"
        images[reference] = _ref(value, queries_at, query_id)
        target = retrieval_set.pool_ids[answer]
        queries.append(Query(id=query_id, reference=reference, text=text, ground_truth=frozenset([target]),
                             target=target))
    return Benchmark(Synthetic.name, split, root, [Task("synthetic", queries, list(retrieval_set.pool_ids))],
                     images)


class Synthetic(BenchmarkProtocol):
    name = "synthetic"
    recall_ks = (1, 5, 10)

    def read(self, root: Path, split: str) -> Benchmark:
        """The held-out queries of a retrieval set against its pool."""
        try:
            retrieval_set = read_retrieval_set(root)
        except (OSError, KeyError, ValueError) as err:  # pyarrow's errors are among these
            raise BenchmarkDataError(
                f"{root} is not a retrieval set: give a folder with {QUERIES_FILE} and {POOL_FILE} "
                "(`magiclens_core.synthetic.SyntheticWorld().write_benchmark(DIR, n_queries)` writes one) "
                f"or Parquet triplets ({err})") from err
        if not len(retrieval_set):
            raise BenchmarkDataError(f"{root}: the retrieval set has no queries")
        return as_benchmark(retrieval_set, root, split)


PROTOCOL = Synthetic()
