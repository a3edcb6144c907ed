"""Retrieval metrics exactly as the benchmarks' official code defines them, in percent.

A ranking is a list of image ids, best first. Every scorer rejects a ranking that lists an id twice,
as CIRCO's official scorer does, and one that misses a query or names an unknown one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Literal

from magiclens_core.evaluation.benchmarks.base import Benchmark, Query, Task

Ranking = Sequence[str]
Rankings = Mapping[str, Ranking]
CirrTargets = Literal["hard", "soft"]

RECALL_KS = {"circo": (5, 10, 25, 50), "cirr": (1, 2, 5, 10, 50), "fashioniq": (10, 50), "dtin": (10, 50),
             "genecis": (1, 2, 3), "synthetic": (1, 5, 10)}
MAP_KS = (5, 10, 25, 50)
SUBSET_KS = (1, 2, 3)


class PredictionError(ValueError):
    """Predictions that cannot be scored: a duplicate id in a ranking, a missing or unknown query."""


def check_rankings(queries: Sequence[Query], rankings: Rankings) -> None:
    """Every query ranked exactly once, no unknown query ids, no id twice in one ranking."""
    expected = {query.id for query in queries}
    missing = expected - rankings.keys()
    if missing:
        raise PredictionError(f"{len(missing)} queries have no predictions, e.g. {sorted(missing)[:5]}")
    unknown = rankings.keys() - expected
    if unknown:
        raise PredictionError(f"{len(unknown)} predictions for unknown queries, e.g. {sorted(unknown)[:5]}")
    for query_id, ranking in rankings.items():
        if len(set(ranking)) != len(ranking):
            repeated = sorted(item for item, count in Counter(ranking).items() if count > 1)
            raise PredictionError(f"query {query_id} has duplicate predictions: {repeated}")


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def recall_at_k(rankings: Sequence[Ranking], relevant: Sequence[Collection[str]],
                ks: Sequence[int]) -> dict[int, float]:
    """Percent of queries with a relevant id in their top k (a query with nothing relevant is a miss)."""
    return {k: _mean(any(item in rel for item in ranking[:k]) for ranking, rel in zip(rankings, relevant, strict=True))
            for k in ks}


def average_precision_at_k(ranking: Ranking, relevant: Collection[str], k: int) -> float:
    """CIRCO's AP@k: the sum of precision@i at each relevant position i ≤ k, over min(|relevant|, k)."""
    if not relevant:
        raise ValueError("AP@k needs at least one relevant id")
    hits = 0
    total = 0.0
    for position, item in enumerate(ranking[:k], start=1):
        if item in relevant:
            hits += 1
            total += hits / position
    return total / min(len(relevant), k)


def mean_average_precision(rankings: Sequence[Ranking], relevant: Sequence[Collection[str]],
                           ks: Sequence[int]) -> dict[int, float]:
    """mAP@k in percent for each k."""
    return {k: _mean(average_precision_at_k(ranking, rel, k) for ranking, rel in zip(rankings, relevant, strict=True))
            for k in ks}


def soft_recall_at_k(rankings: Sequence[Ranking], soft_targets: Sequence[Mapping[str, float]],
                     ks: Sequence[int]) -> dict[int, float]:
    """CIRPLANT's soft recall: per query the highest soft score among its top k, from 0 (so -1 never counts)."""
    return {k: _mean(max([0.0, *(soft.get(item, 0.0) for item in ranking[:k])])
                     for ranking, soft in zip(rankings, soft_targets, strict=True))
            for k in ks}


def restrict(ranking: Ranking, candidates: Collection[str]) -> list[str]:
    """The ranking with only the candidates left, in its order."""
    return [item for item in ranking if item in candidates]


def _keyed(prefix: str, values: Mapping[int, float]) -> dict[str, float]:
    return {f"{prefix}@{k}": value for k, value in values.items()}


def circo_metrics(task: Task, rankings: Rankings) -> dict[str, float]:
    """mAP@5/10/25/50 over all ground truths, Recall@k of the single target, mAP@10 per semantic aspect."""
    ranked = [rankings[query.id] for query in task.queries]
    metrics = _keyed("mAP", mean_average_precision(ranked, [q.ground_truth for q in task.queries], MAP_KS))
    metrics |= _keyed("R", recall_at_k(ranked, [{q.target} for q in task.queries], RECALL_KS["circo"]))
    for aspect in sorted({aspect for query in task.queries for aspect in query.aspects}):
        tagged = [(ranking, q.ground_truth) for ranking, q in zip(ranked, task.queries, strict=True)
                  if aspect in q.aspects]
        metrics[f"semantic_mAP@10/{aspect}"] = _mean(average_precision_at_k(r, gt, 10) for r, gt in tagged)
    return metrics


def _cirr_recall(prefix: str, ranked: list[list[str]], queries: Sequence[Query], ks: Sequence[int],
                 targets: CirrTargets) -> dict[str, float]:
    if targets == "soft":
        return _keyed(prefix, soft_recall_at_k(ranked, [q.soft_targets or {} for q in queries], ks))
    return _keyed(prefix, recall_at_k(ranked, [{q.target} for q in queries], ks))


def cirr_metrics(task: Task, rankings: Rankings | None, subset_rankings: Rankings | None,
                 targets: CirrTargets = "hard") -> dict[str, float]:
    """Recall@1/2/5/10/50 with the reference removed, Recall_subset@1/2/3 within the other set members.

    `targets="hard"` scores the one `target_hard` (CLIP4Cir, SEARLE, most papers); `"soft"` scores
    `target_soft` the CIRPLANT way.
    """
    metrics: dict[str, float] = {}
    if rankings is not None:
        ranked = [[item for item in rankings[q.id] if item != q.exclude] for q in task.queries]
        metrics |= _cirr_recall("R", ranked, task.queries, RECALL_KS["cirr"], targets)
    if subset_rankings is not None:
        ranked = [restrict(subset_rankings[q.id], q.candidates or ()) for q in task.queries]
        metrics |= _cirr_recall("R_subset", ranked, task.queries, SUBSET_KS, targets)
    return metrics


def per_task_recall(benchmark: Benchmark, rankings: Rankings) -> dict[str, float]:
    """Recall@k per task (within each query's candidates where the task says so) and the average over tasks
    (FashionIQ categories, DTIN domains, GeneCIS tasks).

    DTIN's hit rule (a top-k image labelled `domain * 1000 + class`) is this recall over the ground truth
    its loader builds: every pool image with that label.
    """
    ks = RECALL_KS[benchmark.name]
    metrics: dict[str, float] = {}
    for task in benchmark.tasks:
        ranked = [restrict(rankings[q.id], q.candidates) if task.candidates_only else rankings[q.id]
                  for q in task.queries]
        metrics |= _keyed(f"{task.name}/R", recall_at_k(ranked, [q.ground_truth for q in task.queries], ks))
    for k in ks:
        metrics[f"average/R@{k}"] = sum(metrics[f"{t.name}/R@{k}"] for t in benchmark.tasks) / len(benchmark.tasks)
    return metrics


def has_ground_truth(benchmark: Benchmark) -> bool:
    """False on a hidden test split (CIRCO, CIRR test), where only the submission files can be scored."""
    return any(query.ground_truth for query in benchmark.queries)


def score(benchmark: Benchmark, rankings: Rankings | None, subset_rankings: Rankings | None = None,
          cirr_targets: CirrTargets = "hard") -> dict[str, float]:
    """The benchmark's official metrics from rankings keyed by query id (empty on a hidden test split).

    `subset_rankings` (CIRR) rank each query's subset; only CIRR may leave `rankings` out.
    """
    for given in (rankings, subset_rankings):
        if given is not None:
            check_rankings(benchmark.queries, given)
    if not has_ground_truth(benchmark):
        return {}
    if benchmark.name == "cirr":
        return cirr_metrics(benchmark.tasks[0], rankings, subset_rankings, cirr_targets)
    if rankings is None:
        raise PredictionError(f"{benchmark.name} needs a ranking for every query")
    if benchmark.name == "circo":
        return circo_metrics(benchmark.tasks[0], rankings)
    return per_task_recall(benchmark, rankings)
