"""Run every benchmark loader over the full annotation files and compare the counts with the shared README.

    python tests/perf/check_loaders_full.py [--shared ../shared/benchmarks]

The shared folder holds the official files flat (`circo/val.json`, `cirr/cap.rc2.val.json`, ...); they are
linked into each benchmark's official layout in a temporary folder, and loaded. No image is needed or
opened. Prints one JSON object: per benchmark the counts found, the counts the README states, and whether
they agree; also the longest instruction in tokens (the model takes 77).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from magiclens_core.evaluation.benchmarks import load_benchmark
from magiclens_core.model.tokenizer import Tokenizer

DEFAULT_SHARED = Path(__file__).resolve().parents[3] / "shared" / "benchmarks"

LAYOUT = {  # official path inside the benchmark folder → file in the shared folder
    "circo": {"annotations/val.json": "val.json", "annotations/test.json": "test.json"},
    "cirr": {f"{kind}/{prefix}.rc2.{split}.json": f"{prefix}.rc2.{split}.json"
             for split in ("val", "test1") for kind, prefix in (("captions", "cap"), ("image_splits", "split"))},
    "fashioniq": {f"{kind}/{prefix}.{c}.val.json": f"{prefix}.{c}.val.json" for c in ("dress", "shirt", "toptee")
                  for kind, prefix in (("captions", "cap"), ("image_splits", "split"))},
    "dtin": {name: name for name in ("imgnet_real_query.txt", "imgnet_targets.txt")},
    "genecis": {f"{task}.json": f"{task}.json" for task in ("focus_object", "change_object")},
}

EXPECTED = {
    "circo": {"val/queries": 220, "test/queries": 800, "val/ground_truth_max": 14, "val/ground_truth_mean": 4.16,
              "val/target_is_first_ground_truth": 220},
    "cirr": {"val/queries": 4181, "val/gallery": 2297, "test/queries": 4148, "test/gallery": 2315,
             "val/hard_target_soft_score_not_1": 42, "val/hard_target_not_in_soft": 37,
             "val/reference_in_soft": 37, "val/soft_keys_outside_set": 367},
    "fashioniq": {"dress/queries": 2017, "dress/pool": 3817, "shirt/queries": 2038, "shirt/pool": 6346,
                  "toptee/queries": 1961, "toptee/pool": 5373, "shirt/empty_caption_queries": 1,
                  "toptee/empty_caption_queries": 2, "dress/empty_caption_queries": 0},
    "dtin": {**{f"{d}/queries": 10000 for d in ("cartoon", "origami", "toy", "sculpture")}, "pool": 16983,
             "classes": 200, "cartoon/no_target": 2350, "origami/no_target": 4700, "toy/no_target": 2800,
             "sculpture/no_target": 2900},
    "genecis": {"focus_object/queries": 1960, "change_object/queries": 1960,
                "change_object/target_listed_twice": 1, "focus_object/target_listed_twice": 0},
}


def lay_out(shared: Path, target: Path) -> dict[str, Path]:
    """Symbolic links from each benchmark's official layout to the flat shared files."""
    roots = {}
    for name, files in LAYOUT.items():
        roots[name] = target / name
        for official, flat in files.items():
            link = roots[name] / official
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((shared / name / flat).resolve())
    return roots


def longest_instruction(benchmarks) -> int:
    tokenizer = Tokenizer()
    return max(tokenizer.token_count(q.text) for benchmark in benchmarks for q in benchmark.queries)


def circo_counts(root: Path) -> tuple[dict, list]:
    val, test = load_benchmark("circo", root, "val"), load_benchmark("circo", root, "test")
    sizes = [len(q.ground_truth) for q in val.queries]
    records = json.loads((root / "annotations" / "val.json").read_text())
    first = {str(r["id"]): str(r["gt_img_ids"][0]) for r in records}
    return {"val/queries": len(val.queries), "test/queries": len(test.queries),
            "val/ground_truth_max": max(sizes), "val/ground_truth_mean": round(statistics.mean(sizes), 2),
            "val/target_is_first_ground_truth": sum(q.target == first[q.id] for q in val.queries),
            "val/with_semantic_aspects": sum(bool(q.aspects) for q in val.queries),
            "test/with_ground_truth": sum(bool(q.ground_truth) for q in test.queries),
            "pool": "missing: " + str(val.missing.get("gallery", "")).rsplit("/", 1)[-1]}, [val, test]


def cirr_counts(root: Path) -> tuple[dict, list]:
    counts, loaded = {}, []
    for split in ("val", "test"):
        benchmark = load_benchmark("cirr", root, split)
        loaded.append(benchmark)
        gallery = set(benchmark.tasks[0].pool)
        queries = benchmark.queries
        counts |= {f"{split}/queries": len(queries), f"{split}/gallery": len(gallery),
                   f"{split}/subset_of_5": sum(len(q.candidates) == 5 for q in queries),
                   f"{split}/all_images_in_gallery": all({q.reference, *q.candidates} <= gallery for q in queries)}
    records = {str(r["pairid"]): r for r in json.loads((root / "captions" / "cap.rc2.val.json").read_text())}
    val = loaded[0].queries
    counts |= {
        "val/hard_target_soft_score_not_1": sum(q.soft_targets.get(q.target) != 1.0 for q in val),
        "val/hard_target_not_in_soft": sum(q.target not in q.soft_targets for q in val),
        "val/reference_in_soft": sum(q.reference in q.soft_targets for q in val),
        "val/soft_keys_outside_set": sum(key not in records[q.id]["img_set"]["members"]
                                         for q in val for key in q.soft_targets),
        "test/with_target": sum(q.target is not None for q in loaded[1].queries),
    }
    return counts, loaded


def fashioniq_counts(root: Path) -> tuple[dict, list]:
    fiq = load_benchmark("fashioniq", root)
    counts = {}
    for task in fiq.tasks:
        records = json.loads((root / "captions" / f"cap.{task.name}.val.json").read_text())
        empty = [(q, r) for q, r in zip(task.queries, records, strict=True)
                 if not all(c.strip() for c in r["captions"])]
        counts |= {f"{task.name}/queries": len(task.queries), f"{task.name}/pool": len(task.pool),
                   f"{task.name}/empty_caption_queries": len(empty),
                   f"{task.name}/empty_caption_texts_are_the_other_caption":
                       all(q.text == next(c for c in r["captions"] if c.strip()) for q, r in empty),
                   f"{task.name}/all_images_in_pool": all({q.reference, q.target} <= set(task.pool)
                                                           for q in task.queries)}
    return counts, [fiq]


def dtin_counts(root: Path) -> tuple[dict, list]:
    dtin = load_benchmark("dtin", root)
    counts = {"pool": len(dtin.tasks[0].pool),
              "classes": len({q.id.split("-class-")[1].split("-to-")[0] for q in dtin.queries})}
    for task in dtin.tasks:
        relevant = [len(q.ground_truth) for q in task.queries if q.ground_truth]
        counts |= {f"{task.name}/queries": len(task.queries),
                   f"{task.name}/no_target": sum(not q.ground_truth for q in task.queries),
                   f"{task.name}/relevant_per_query_max": max(relevant)}
    return counts, [dtin]


def genecis_counts(root: Path) -> tuple[dict, list]:
    genecis = load_benchmark("genecis", root)
    counts = {"missing_tasks": sorted(genecis.missing)}
    for task in genecis.tasks:
        counts |= {f"{task.name}/queries": len(task.queries),
                   f"{task.name}/target_listed_twice": sum(len(q.candidates) == 14 for q in task.queries),
                   f"{task.name}/candidates_of_15": sum(len(q.candidates) == 15 for q in task.queries),
                   f"{task.name}/reference_among_candidates": sum(q.reference in q.candidates for q in task.queries)}
    return counts, [genecis]


COUNTERS = {"circo": circo_counts, "cirr": cirr_counts, "fashioniq": fashioniq_counts, "dtin": dtin_counts,
            "genecis": genecis_counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared benchmarks folder")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        roots = lay_out(args.shared, Path(folder))
        for name, count in COUNTERS.items():
            counts, loaded = count(roots[name])
            counts["longest_instruction_tokens"] = longest_instruction(loaded)
            expected = EXPECTED[name]
            results[name] = {"counts": counts, "expected": expected,
                             "agree": all(counts.get(key) == value for key, value in expected.items())}
    print(json.dumps({"benchmark": "check_loaders_full", "shared": str(args.shared),
                      "all_agree": all(r["agree"] for r in results.values()), "results": results}))


if __name__ == "__main__":
    main()
