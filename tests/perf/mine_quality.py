"""Quality of mined triplets: the tiny model trained with the same step budget on (a) triplets mined from
synthetic-world pages and (b) the world's own ground-truth triplets, held-out Recall@1 of both.

    python tests/perf/mine_quality.py [--pages 3000] [--steps 300] [--instructions template|llm] [--text-low 0.3]
                                      [--galleries 0.0] [--true-instructions] [--template-truth]
                                      [--cpus 4]

(a) `SyntheticWorld(seed).write_web_pages` → `jobs.mine.run` (the tiny official-format checkpoint of the
test fixtures scores image pairs, the packaged MiniLM text pairs, with the README's window flags); (b) as
many triplets from `SyntheticWorld(seed).write_triplets`. Both train through `jobs.train.run` from the same
random tiny model (same seed, steps, batch and learning rate) and validate on the same held-out benchmark
(`write_benchmark`: queries whose (scene, change) pairs neither set holds, one right answer in the pool).
Reported: each run's best and final R@1/R@5/R@10 (percent), chance, `recall@1_ratio` = (a) / (b), and how many
attributes each mined pair changes (the world's own triplets change 1 or 2). `--true-instructions` trains a
third model on the mined pairs with the world's own instruction for each pair's true change: what those pairs
are worth with perfect instructions, which tells the pairs' share of the gap from the instructions'.
`--template-truth` trains one more on the world's own pairs with the template's instruction for each (from
the two scenes' captions, as mining writes it): what the template alone costs on perfect pairs.
`--galleries` makes that share of the pages variant galleries (one item and variants changing 1 or 2
attributes, as product pages are) instead of category pages (`SyntheticWorld.web_pages`).
Goal: ratio >= 0.8. Also printed when those arms run: the ratio with instructions held equal (mined pairs
with the world's instructions over the ground truth; mined over the world's pairs, both with the template's).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from jobs.mine import MineConfig
from jobs.mine import run as mine
from jobs.train import TrainConfig
from jobs.train import run as train
from magiclens_core.mining.instructions import ImageText, template_instruction
from magiclens_core.model.tokenizer import Tokenizer
from magiclens_core.synthetic import ATTRIBUTES, Scene, SyntheticWorld, all_scenes, instruction_for

OFFICIAL_TINY = Path(__file__).resolve().parents[1] / "fixtures" / "official_tiny" / "params_tiny.pkl"
RECALLS = ("recall@1", "recall@5", "recall@10")


def _config(triplets: str, name: str, folder: Path, bench: Path, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        triplets=triplets, init="tiny", name=name, storage=str(folder / "runs"), workers=args.workers,
        batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup_steps=max(1, args.steps // 20),
        weight_decay=0.05, temperature=0.07, learn_temperature=True, validation=str(bench),
        checkpoint_every=args.validate_every, keep_checkpoints=args.steps // args.validate_every + 1,
        seed=args.seed, log_every=args.validate_every)


def _train(config: TrainConfig) -> dict:
    started = time.perf_counter()
    summary = train(config)
    last = next(point for point in reversed(summary["history"]) if "val_recall@1" in point)
    return {"train_seconds": round(time.perf_counter() - started, 1),
            "best": {key: summary[f"best_val_{key}"] for key in RECALLS},
            "final": {key: last[f"val_{key}"] for key in RECALLS}}


def _mined_scenes(world: SyntheticWorld, pages: int, galleries: float,
                  triplets: str) -> list[tuple[Scene, Scene, dict]]:
    """(query scene, target scene, row) of every mined triplet, from the page images' known scenes."""
    by_key = {scene.key: scene for scene in all_scenes()}
    by_name = {image.name: by_key[image.scene] for page in world.web_pages(pages, galleries)
               for image in page.images
               if image.scene}
    rows = pq.read_table(triplets, columns=["query_image", "target_image", "query_url", "target_url"]).to_pylist()
    return [(by_name[row["query_url"].rsplit("/", 1)[-1]], by_name[row["target_url"].rsplit("/", 1)[-1]], row)
            for row in rows]


def _change(query: Scene, target: Scene) -> tuple:
    return tuple((name, getattr(target, name)) for name in ATTRIBUTES if getattr(query, name) != getattr(target, name))


def _write_true_instructions(mined: list[tuple[Scene, Scene, dict]], path: Path) -> str:
    """The mined pairs with the world's own instruction for each pair's true change, as a Parquet file."""
    rows = [{"query_image": row["query_image"], "target_image": row["target_image"],
             "instruction": instruction_for(query, _change(query, target), index)}
            for index, (query, target, row) in enumerate(mined)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _write_template_truth(truth: Path, path: Path) -> str:
    """The world's own triplets with the template's instruction for each pair, as a Parquet file."""
    by_key, tokenizer = {scene.key: scene for scene in all_scenes()}, Tokenizer()
    rows = pq.read_table(truth, columns=["query_image", "target_image", "query_scene", "target_scene"]).to_pylist()
    for row in rows:
        query, target = by_key[row.pop("query_scene")], by_key[row.pop("target_scene")]
        row["instruction"] = template_instruction(ImageText(alt=target.describe()), tokenizer,
                                                  ImageText(alt=query.describe()))
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


RATIOS = {  # name -> (numerator arm, denominator arm): the ratio, then with instructions held equal
    "recall@1_ratio": ("mined", "ground_truth"),
    "recall@1_ratio_world_instructions": ("mined_pairs_true_instructions", "ground_truth"),
    "recall@1_ratio_template_instructions": ("mined", "true_pairs_template_instructions"),
}


def _ratio(results: dict, numerator: str, denominator: str) -> float | None:
    """Best R@1 of one arm over another's, None when the denominator is 0."""
    top, bottom = results[numerator]["best"]["recall@1"], results[denominator]["best"]["recall@1"]
    return round(top / bottom, 3) if bottom else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=3000,
                        help="fewer pages give fewer triplets, which the step budget then repeats many times")
    parser.add_argument("--instructions", default="template", choices=["template", "llm"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--pool", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-low", type=float, default=0.3, help="mining's text-similarity lower bound")
    parser.add_argument("--galleries", type=float, default=0.0,
                        help="share of the pages that are variant galleries instead of category pages")
    parser.add_argument("--true-instructions", action="store_true",
                        help="also train on the mined pairs with the world's own instructions")
    parser.add_argument("--template-truth", action="store_true",
                        help="also train on the world's own pairs with the template's instructions")
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray (training needs "
                                                            "--workers + 2)")
    args = parser.parse_args()
    if args.steps % args.validate_every:
        parser.error("--steps must be a multiple of --validate-every")
    with tempfile.TemporaryDirectory(prefix="mine_quality_") as name:
        folder = Path(name)
        world = SyntheticWorld(seed=args.seed)
        bench = world.write_benchmark(folder / "bench", args.queries, pool_size=args.pool)
        site = world.write_web_pages(folder / "site", args.pages, args.galleries)
        ray.init(num_cpus=args.cpus, include_dashboard=False)
        try:
            started = time.perf_counter()
            mined = mine(MineConfig(pages=[str(site)], out=str(folder / "mined"), model=str(OFFICIAL_TINY),
                                    instructions=args.instructions, min_side=32, image_low=0.0, image_high=0.999,
                                    text_low=args.text_low))
            mine_seconds = time.perf_counter() - started
            count = mined["triplets_written"]
            if not count:
                raise SystemExit(f"no triplets mined from {args.pages} pages: {json.dumps(mined['rejects'])}")
            truth = world.write_triplets(folder / "truth.parquet", count)
            pairs = _mined_scenes(world, args.pages, args.galleries, mined["triplets"])
            changes = Counter(len(_change(query, target)) for query, target, _ in pairs)
            results = {"mined": _train(_config(mined["triplets"], "mined", folder, bench, args)),
                       "ground_truth": _train(_config(str(truth), "truth", folder, bench, args))}
            if args.true_instructions:
                oracle = _write_true_instructions(pairs, folder / "mined_true_instructions.parquet")
                results["mined_pairs_true_instructions"] = _train(_config(oracle, "oracle", folder, bench, args))
            if args.template_truth:
                templated = _write_template_truth(truth, folder / "truth_template_instructions.parquet")
                results["true_pairs_template_instructions"] = _train(_config(templated, "templated", folder, bench,
                                                                             args))
        finally:
            ray.shutdown()
    ratios = {name: _ratio(results, *arms) for name, arms in RATIOS.items() if all(arm in results for arm in arms)}
    print(json.dumps({
        "benchmark": "mine_quality", "instructions": args.instructions, "pages": args.pages, "triplets": count,
        "mine_seconds": round(mine_seconds, 1), "steps": args.steps, "workers": args.workers,
        "batch_size": args.batch_size, "queries": args.queries, "pool": args.pool,
        "chance_recall@1": round(100 / args.pool, 3), "text_low": args.text_low,
        "galleries": args.galleries,
        "mined_changed_attributes": dict(sorted(changes.items())), **results,
        **ratios,
    }))


if __name__ == "__main__":
    main()
