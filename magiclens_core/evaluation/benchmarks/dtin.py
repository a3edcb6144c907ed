"""Domain-Transfer ImageNet (from Pic2Word), as MagicLens evaluates it: one task per target domain.

Layout: `ROOT/imgnet_real_query.txt`, `ROOT/imgnet_targets.txt`, `ROOT/real/<wnid>/*.JPEG` (ImageNet val)
and `ROOT/imagenet-r/<wnid>/*.jpg`; the files' paths start with `imgnet/`, which is dropped. Every query
runs once per domain with the text `find this object in {domain}`; the pool is the whole target file
(the real images stay in it as distractors). A retrieved image is a hit when its label is
`domain * 1000 + class`, so a query's ground truth is every pool image with that label; queries whose
(domain, class) has no image still count (as misses).

Metrics: R@10/R@50 per domain and their average, the default protocol's per-task recall over that
ground truth (which is the official hit rule).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from magiclens_core.evaluation.benchmarks.base import (
    Benchmark,
    BenchmarkProtocol,
    ImageRef,
    PaperResults,
    Query,
    Task,
    read_lines,
)

DOMAINS = ("cartoon", "origami", "toy", "sculpture")


def _local_path(root: Path, listed: str) -> Path:
    return root.joinpath(*listed.split("/")[1:])


class Dtin(BenchmarkProtocol):
    name = "dtin"
    recall_ks = (10, 50)
    paper = PaperResults("val", {"average/R@10": (28.3, 41.5)})

    def read(self, root: Path, split: str) -> Benchmark:
        """Four tasks (cartoon, origami, toy, sculpture) of the 10,000 ImageNet-val queries over one pool."""
        targets = read_lines(root / "imgnet_targets.txt")
        query_lines = read_lines(root / "imgnet_real_query.txt")
        images = {path: ImageRef(_local_path(root, path)) for path, _ in [*targets, *query_lines]}
        pool = [path for path, _ in targets]
        by_label: dict[int, set[str]] = defaultdict(set)
        for path, label in targets:
            by_label[int(label)].add(path)
        tasks = []
        for domain_id, domain in enumerate(DOMAINS):
            queries = []
            for path, class_id in query_lines:
                label = domain_id * 1000 + int(class_id)
                queries.append(Query(
                    id=f"{path.rsplit('/', 1)[-1]}-class-{class_id}-to-{domain}",
                    reference=path,
                    text=f"find this object in {domain}",
                    ground_truth=frozenset(by_label.get(label, ())),
                ))
            tasks.append(Task(domain, queries, pool))
        return Benchmark(self.name, split, root, tasks, images)


PROTOCOL = Dtin()
