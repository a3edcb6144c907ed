"""Metrics on hand-computed cases, the oracle and the reverse ranking on every benchmark excerpt, each scored
by its benchmark's protocol from the registry."""

import math
import random

import numpy as np
import pytest
from benchmark_folders import benchmark_folder

from magiclens_core.evaluation.benchmarks import PROTOCOLS, BenchmarkDataError, load_benchmark, protocol
from magiclens_core.evaluation.metrics import (
    PredictionError,
    average_precision_at_k,
    check_rankings,
    mean_average_precision,
    recall_at_k,
    restrict,
    soft_recall_at_k,
)


def score(benchmark, rankings, subset_rankings=None, cirr_targets="hard"):
    return protocol(benchmark.name).score(benchmark, rankings, subset_rankings, cirr_targets)


def test_average_precision_by_hand():
    ranking = ["a", "x", "b", "y", "c"]
    relevant = {"a", "b", "c"}
    # precision at the relevant positions 1, 3, 5: 1/1, 2/3, 3/5; divided by min(3, k)
    assert average_precision_at_k(ranking, relevant, 5) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision_at_k(ranking, relevant, 3) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision_at_k(ranking, relevant, 2) == pytest.approx(1 / 2)
    assert average_precision_at_k(ranking, relevant, 1) == 1.0


def test_average_precision_with_fewer_predictions_than_k_and_many_ground_truths():
    assert average_precision_at_k(["a"], {"a", "b"}, 50) == 0.5          # the missing one is never found
    assert average_precision_at_k([], {"a"}, 10) == 0.0
    many = {str(i) for i in range(14)}
    assert average_precision_at_k([str(i) for i in range(5)], many, 5) == 1.0  # min(14, 5) = 5
    assert average_precision_at_k([str(i) for i in range(10)], many, 50) == pytest.approx(10 / 14)
    with pytest.raises(ValueError, match="at least one relevant"):
        average_precision_at_k(["a"], set(), 5)


def test_map_matches_the_official_vectorised_formula():
    """CIRCO's scorer: labels = isin(pred, gt); prec = cumsum(labels) * labels / arange(1, n + 1)."""
    rng = random.Random(0)
    pool = [str(i) for i in range(80)]
    rankings, truths = [], []
    for _ in range(40):
        truths.append(set(rng.sample(pool, rng.randint(1, 14))))
        rankings.append(rng.sample(pool, rng.randint(3, 60)))
    ours = mean_average_precision(rankings, truths, (5, 10, 25, 50))
    for k in (5, 10, 25, 50):
        aps = []
        for ranking, truth in zip(rankings, truths, strict=True):
            labels = np.isin(np.array(ranking, dtype=int), np.array(sorted(truth), dtype=int))
            precision = np.cumsum(labels) * labels / np.arange(1, len(labels) + 1)
            aps.append(np.sum(precision[:k]) / min(len(truth), k))
        assert ours[k] == pytest.approx(100 * np.mean(aps))


def test_recall_is_a_hit_rate_and_a_query_with_nothing_relevant_is_a_miss():
    rankings = [["a", "b", "c"], ["x", "y"], ["p", "q"]]
    relevant = [{"c", "z"}, {"x"}, set()]
    assert recall_at_k(rankings, relevant, (1, 2, 3, 50)) == pytest.approx(
        {1: 100 / 3, 2: 100 / 3, 3: 200 / 3, 50: 200 / 3})


def test_soft_recall_takes_the_best_soft_score_from_zero():
    rankings = [["a", "b"], ["c", "d"], ["e", "f"]]
    soft = [{"b": 0.5, "a": 0.2}, {"c": -1.0}, {"f": 1.0, "e": 0.5}]
    assert soft_recall_at_k(rankings, soft, (1, 2)) == pytest.approx({1: 100 * (0.2 + 0 + 0.5) / 3,
                                                                       2: 100 * (0.5 + 0 + 1.0) / 3})


def test_restrict_keeps_candidates_in_ranked_order():
    assert restrict(["e", "a", "q", "c", "b"], ("a", "b", "c")) == ["a", "c", "b"]


def test_duplicates_missing_and_unknown_queries_are_rejected(tmp_path):
    benchmark = load_benchmark("circo", benchmark_folder("circo", tmp_path, images=False), "val")
    oracle = oracle_rankings(benchmark)
    with pytest.raises(PredictionError, match="query 3 has duplicate predictions: \\['7'\\]"):
        check_rankings([q.id for q in benchmark.queries], {**oracle, "3": ["7", "1", "7"]})
    with pytest.raises(PredictionError, match="1 queries have no predictions"):
        score(benchmark, {k: v for k, v in oracle.items() if k != "0"})
    with pytest.raises(PredictionError, match="unknown queries"):
        score(benchmark, {**oracle, "9999": ["1"]})


def oracle_rankings(benchmark, reverse=False):
    """Each query's target, its other right answers, then the rest of its pool (or candidates); reversed if asked."""
    rankings = {}
    for task in benchmark.tasks:
        for query in task.queries:
            others = query.candidates if task.candidates_only else [i for i in task.pool if i != query.exclude]
            right = [query.target] if query.target else []
            right += sorted(query.ground_truth - set(right))
            ranking = right + [i for i in others if i not in query.ground_truth]
            rankings[query.id] = ranking[::-1] if reverse else ranking
    return rankings


def subset_rankings(benchmark, reverse=False):
    rankings = {}
    for query in benchmark.queries:
        ranking = [query.target] + [c for c in query.candidates if c != query.target]
        rankings[query.id] = ranking[::-1] if reverse else ranking
    return rankings


@pytest.mark.parametrize("name", ["circo", "cirr", "fashioniq", "genecis"])
def test_oracle_ranking_scores_100(name, tmp_path):
    benchmark = load_benchmark(name, benchmark_folder(name, tmp_path, images=False))
    subsets = subset_rankings(benchmark) if name == "cirr" else None
    metrics = score(benchmark, oracle_rankings(benchmark), subsets)
    assert metrics and all(value == pytest.approx(100.0) for value in metrics.values()), metrics


def test_dtin_oracle_scores_the_share_of_queries_that_can_hit(tmp_path):
    dtin = load_benchmark("dtin", benchmark_folder("dtin", tmp_path, images=False))
    metrics = score(dtin, oracle_rankings(dtin))
    for task in dtin.tasks:
        reachable = 100 * sum(bool(q.ground_truth) for q in task.queries) / len(task.queries)
        assert metrics[f"{task.name}/R@10"] == metrics[f"{task.name}/R@50"] == pytest.approx(reachable)
    assert metrics["origami/R@10"] == 100.0 and metrics["cartoon/R@10"] < 100.0
    assert metrics["average/R@10"] == pytest.approx(sum(metrics[f"{t.name}/R@10"] for t in dtin.tasks) / 4)


def test_reverse_ranking_scores_as_low_as_the_definitions_allow(tmp_path):
    """Right answers last: a metric is 0 unless its k reaches past the rest of the pool."""
    scores = {}
    for name in ("circo", "cirr", "fashioniq", "genecis", "dtin"):
        benchmark = load_benchmark(name, benchmark_folder(name, tmp_path, images=False))
        subsets = subset_rankings(benchmark, reverse=True) if name == "cirr" else None
        scores[name] = (benchmark, score(benchmark, oracle_rankings(benchmark, reverse=True), subsets))
    circo, metrics = scores["circo"]
    assert len(circo.tasks[0].pool) > 50 + 14 and set(metrics.values()) == {0.0}
    cirr, metrics = scores["cirr"]
    assert len(cirr.tasks[0].pool) - 1 > 50 and set(metrics.values()) == {0.0}  # R_subset: last of 5, k <= 3
    assert set(scores["genecis"][1].values()) == {0.0}  # last of 14 or 15 candidates, k <= 3
    fiq, metrics = scores["fashioniq"]
    for task in fiq.tasks:  # the target is at position len(pool)
        assert metrics[f"{task.name}/R@10"] == 0.0
        assert metrics[f"{task.name}/R@50"] == (100.0 if len(task.pool) <= 50 else 0.0)
    assert {metrics["dress/R@50"], metrics["toptee/R@50"]} == {0.0, 100.0}  # the excerpt has both cases
    dtin, metrics = scores["dtin"]
    assert len(dtin.tasks[0].pool) <= 50
    for task in dtin.tasks:  # every right answer lies within the top 50 of a 43-image pool, none in the top 10
        assert metrics[f"{task.name}/R@10"] == 0.0
        reachable = 100 * sum(bool(q.ground_truth) for q in task.queries) / len(task.queries)
        assert metrics[f"{task.name}/R@50"] == pytest.approx(reachable)


def test_cirr_hard_and_soft_targets_and_the_reference_is_never_counted(tmp_path):
    cirr = load_benchmark("cirr", benchmark_folder("cirr", tmp_path, images=False))
    # each ranking starts with the reference itself, then the hard target
    rankings = {q.id: [q.reference, q.target] for q in cirr.queries}
    hard = score(cirr, rankings, None)
    assert hard["R@1"] == 100.0 and set(hard) == {"R@1", "R@2", "R@5", "R@10", "R@50"}
    soft = score(cirr, rankings, None, cirr_targets="soft")
    expected = [max(0.0, q.soft_targets.get(q.target, 0.0)) for q in cirr.queries]
    assert soft["R@1"] == pytest.approx(100 * sum(expected) / len(expected)) and soft["R@1"] < 100.0
    subset_only = score(cirr, None, subset_rankings(cirr))
    assert set(subset_only) == {"R_subset@1", "R_subset@2", "R_subset@3"}


def test_test_split_has_no_metrics_but_is_still_checked(tmp_path):
    circo = load_benchmark("circo", benchmark_folder("circo", tmp_path, images=False), "test")
    rankings = {q.id: ["1", "2"] for q in circo.queries}
    assert score(circo, rankings) == {}
    with pytest.raises(PredictionError, match="duplicate"):
        score(circo, {**rankings, "0": ["1", "1"]})


def test_circo_semantic_aspects_average_their_queries(tmp_path):
    circo = load_benchmark("circo", benchmark_folder("circo", tmp_path, images=False))
    rankings = oracle_rankings(circo)
    negation = [q for q in circo.queries if "negation" in q.aspects]
    assert negation
    spoiled = {**rankings, negation[0].id: rankings[negation[0].id][::-1]}
    metrics = score(circo, spoiled)
    assert metrics["semantic_mAP@10/negation"] == pytest.approx(100 * (len(negation) - 1) / len(negation))
    assert not math.isnan(metrics["mAP@10"]) and metrics["mAP@10"] < 100.0


def test_the_registry_names_each_protocol_once_and_rejects_unknown_names():
    assert list(PROTOCOLS) == ["circo", "cirr", "fashioniq", "dtin", "genecis", "synthetic"]
    assert all(spec.name == name and spec.recall_ks for name, spec in PROTOCOLS.items())
    with pytest.raises(BenchmarkDataError, match="unknown benchmark 'nope'; choose from circo, cirr"):
        protocol("nope")


@pytest.mark.parametrize("name", ["circo", "cirr", "fashioniq", "dtin", "genecis"])
def test_every_number_the_paper_reports_is_a_metric_the_protocol_computes(name, tmp_path):
    spec = protocol(name)
    benchmark = load_benchmark(name, benchmark_folder(name, tmp_path, images=False))
    subsets = subset_rankings(benchmark) if name == "cirr" else None
    metrics = spec.score(benchmark, oracle_rankings(benchmark), subsets)
    assert spec.paper.numbers and set(spec.paper.numbers) <= set(metrics)
    assert all(0 < base < large < 100 for base, large in spec.paper.numbers.values())
    assert spec.paper.split in spec.splits


def test_per_task_recall_averages_tasks_not_queries(tmp_path):
    """FashionIQ's average is the mean of its three categories, whatever their sizes."""
    fiq = load_benchmark("fashioniq", benchmark_folder("fashioniq", tmp_path, images=False))
    rankings = oracle_rankings(fiq)
    spoiled = {**rankings, **{q.id: rankings[q.id][::-1] for q in fiq.tasks[0].queries}}  # dress: all last
    metrics = score(fiq, spoiled)
    assert metrics["dress/R@10"] == 0.0 and metrics["shirt/R@10"] == metrics["toptee/R@10"] == 100.0
    assert metrics["average/R@10"] == pytest.approx(200 / 3)


def test_cirr_needs_some_ranking_and_the_others_need_the_full_one(tmp_path):
    cirr = load_benchmark("cirr", benchmark_folder("cirr", tmp_path, images=False))
    with pytest.raises(PredictionError, match="cirr needs a ranking or a subset ranking"):
        score(cirr, None, None)
    genecis = load_benchmark("genecis", benchmark_folder("genecis", tmp_path, images=False))
    with pytest.raises(PredictionError, match="genecis needs a ranking for every query"):
        score(genecis, None, subset_rankings(genecis))
