"""Evaluation: benchmark protocols and their registry (`benchmarks`), generic metrics, exact ranking, the
one evaluation path (`evaluator`), retrieval sets and the HTML report."""
