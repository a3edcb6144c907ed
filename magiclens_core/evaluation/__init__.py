"""Evaluation: benchmarks, ranking, metrics, retrieval sets and the HTML report."""
