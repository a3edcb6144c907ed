"""Retrieval metrics exactly as the benchmarks' official code defines them, in percent.

A ranking is a list of image ids, best first. `check_rankings` rejects a ranking that lists an id twice,
as CIRCO's official scorer does, and predictions that miss a query or name an unknown one. Which metric
a benchmark reports, at which k, is its protocol's business (`benchmarks/<name>.py`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence

Ranking = Sequence[str]
Rankings = Mapping[str, Ranking]


class PredictionError(ValueError):
    """Predictions that cannot be scored: a duplicate id in a ranking, a missing or unknown query."""


def check_rankings(query_ids: Iterable[str], rankings: Rankings) -> None:
    """Every query ranked exactly once, no unknown query ids, no id twice in one ranking."""
    expected = set(query_ids)
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


def percent_mean(values: Iterable[float]) -> float:
    """100 × the mean of per-query scores in [0, 1] (NaN for no queries)."""
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else float("nan")


def recall_at_k(rankings: Sequence[Ranking], relevant: Sequence[Collection[str]],
                ks: Sequence[int]) -> dict[int, float]:
    """Percent of queries with a relevant id in their top k (a query with nothing relevant is a miss)."""
    return {k: percent_mean(any(item in rel for item in ranking[:k])
                            for ranking, rel in zip(rankings, relevant, strict=True))
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
    return {k: percent_mean(average_precision_at_k(ranking, rel, k)
                            for ranking, rel in zip(rankings, relevant, strict=True))
            for k in ks}


def soft_recall_at_k(rankings: Sequence[Ranking], soft_targets: Sequence[Mapping[str, float]],
                     ks: Sequence[int]) -> dict[int, float]:
    """CIRPLANT's soft recall: per query the highest soft score among its top k, from 0 (so -1 never counts)."""
    return {k: percent_mean(max([0.0, *(soft.get(item, 0.0) for item in ranking[:k])])
                            for ranking, soft in zip(rankings, soft_targets, strict=True))
            for k in ks}


def restrict(ranking: Ranking, candidates: Collection[str]) -> list[str]:
    """The ranking with only the candidates left, in its order."""
    return [item for item in ranking if item in candidates]


def keyed(prefix: str, values: Mapping[int, float]) -> dict[str, float]:
    """`{k: value}` as `{"prefix@k": value}`, the names metrics are reported under."""
    return {f"{prefix}@{k}": value for k, value in values.items()}
