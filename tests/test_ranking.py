"""Exact cosine ranking: chunked top-k against a brute-force sort, exclusions, small pools, ties in pool
order, and a benchmark's tasks ranked as the protocols need them."""

import numpy as np
import pytest

from magiclens_core.evaluation.benchmarks import Query, Task
from magiclens_core.evaluation.ranking import rank_candidates, rank_pool, rank_tasks


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


def test_ties_rank_in_pool_order_inside_the_top_k_and_at_the_cut():
    """Equal scores never depend on the sort: the earlier pool row ranks first, and where the k-th place
    falls inside a run of equal scores the earliest rows of the run are the ones kept."""
    ids = [f"p{i}" for i in range(8)]
    pool = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [0.6, 0.8], [1, 0], [0, 1], [1, 0]], dtype=np.float32)
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    assert rank_pool(query, pool, ids, 3) == [["p1", "p3", "p5"]]            # five rows tie for first
    assert rank_pool(query, pool, ids, 6) == [["p1", "p3", "p5", "p7", "p4", "p0"]]
    assert rank_pool(query, pool, ids, 2, exclude=["p1"]) == [["p3", "p5"]]
    collapsed = np.ones((6, 4), dtype=np.float32)  # a model that embeds everything alike
    assert rank_pool(np.ones((3, 4)), collapsed, ids[:6], 4, max_scores=6) == [ids[:4]] * 3
    assert rank_pool(np.ones((1, 4)), collapsed, ids[:6], 2, exclude=["p0"]) == [["p1", "p2"]]


def test_the_same_vectors_in_another_pool_order_rank_the_same_when_nothing_ties():
    rng = np.random.default_rng(2)
    queries, pool = rng.normal(size=(20, 8)), rng.normal(size=(60, 8))
    ids = [str(i) for i in range(60)]
    order = rng.permutation(60)
    assert rank_pool(queries, pool, ids, 10) == rank_pool(queries, pool[order], [ids[i] for i in order], 10)


def _query(query_id, **fields):
    return Query(id=query_id, reference="r", text="t", **fields)


def test_tasks_rank_their_own_pool_candidates_and_subsets():
    ids = ["a", "b", "c", "d"]
    pool = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.5, 0.5]], dtype=np.float32)
    tasks = [Task("pooled", [_query("q0", exclude="a", candidates=("c", "d")), _query("q1", candidates=("a", "b"))],
                  ids),
             Task("own", [_query("q2", candidates=("c", "a", "d"))], ["c", "a", "d"], candidates_only=True)]
    queries = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    rankings, subsets = rank_tasks(tasks, queries, ids, pool, k=2)
    assert rankings == {"q0": ["b", "d"], "q1": ["c", "d"], "q2": ["a", "d", "c"]}  # q0 without its "a"
    assert subsets == {"q0": ["d", "c"], "q1": ["b", "a"]}
    plain = [Task("plain", [_query("q0"), _query("q1")], ids)]
    assert rank_tasks(plain, queries[:2], ids, pool, k=1) == ({"q0": ["a"], "q1": ["c"]}, None)
    with pytest.raises(ValueError, match="3 query vectors for 2 queries"):
        rank_tasks(plain, queries, ids, pool, k=1)
