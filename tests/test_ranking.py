"""Exact cosine ranking: chunked top-k against a brute-force sort, exclusions, small pools, stable ties."""

import numpy as np
import pytest

from magiclens_core.evaluation.ranking import rank_candidates, rank_pool


def brute_force(queries, pool, ids, k, exclude=None):
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    scores = unit(queries) @ unit(pool).T
    rankings = []
    for row, query_scores in enumerate(scores):
        order = [ids[i] for i in np.argsort(-query_scores, kind="stable")]
        rankings.append([i for i in order if exclude is None or i != exclude[row]][:k])
    return rankings


def test_chunked_top_k_equals_a_full_sort():
    rng = np.random.default_rng(0)
    queries, pool = rng.normal(size=(37, 16)), rng.normal(size=(500, 16)) * rng.uniform(0.5, 3, size=(500, 1))
    ids = [f"img{i}" for i in range(500)]
    expected = brute_force(queries, pool, ids, 10)
    assert rank_pool(queries, pool, ids, 10) == expected
    assert rank_pool(queries, pool, ids, 10, max_scores=1000) == expected  # two queries per chunk
    assert rank_pool(queries, pool, ids, 10, max_scores=1) == expected     # one query per chunk


def test_excluded_ids_are_left_out_and_k_is_still_filled():
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(50, 8)).astype(np.float32)
    ids = [str(i) for i in range(50)]
    queries = pool[[3, 7, 9]] + 0.01  # each query's nearest image is its own
    exclude = ["3", None, "not-in-pool"]
    rankings = rank_pool(queries, pool, ids, 5, exclude=exclude)
    assert rankings == brute_force(queries, pool, ids, 5, exclude)
    assert "3" not in rankings[0] and rankings[1][0] == "7" and rankings[2][0] == "9"
    assert all(len(r) == 5 for r in rankings)


def test_small_pool_returns_what_there_is():
    pool, ids = np.eye(3, dtype=np.float32), ["a", "b", "c"]
    query = np.array([[1.0, 0.5, 0.0]], dtype=np.float32)
    assert rank_pool(query, pool, ids, 50) == [["a", "b", "c"]]
    assert rank_pool(query, pool, ids, 50, exclude=["a"]) == [["b", "c"]]
    with pytest.raises(ValueError, match="2 pool ids for 3 pool vectors"):
        rank_pool(query, pool, ids[:2], 5)


def test_candidates_rank_by_similarity_and_ties_keep_their_listed_order():
    pool = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
    ids = ["a", "b", "a-copy", "c"]
    query = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    assert rank_candidates(query, pool, ids, [["b", "a-copy", "c", "a"], ["a", "c"]]) == \
        [["a-copy", "a", "c", "b"], ["c", "a"]]
