"""Throughput of the triplet mining job end to end, per stage, and the cost of mining at the paper's scale.

    python tests/perf/mine_pipeline.py [--pages 2000] [--instructions template|llm] [--llm-workers 1] [--cpus 4]
                                       [--no-alone]

Pages built by `SyntheticWorld(seed=0).write_web_pages` (HTML files with their images, in a temporary
folder) are mined by `jobs.mine.run` on a local Ray started here (`ray.init(num_cpus=--cpus)`), with the
tiny official-format checkpoint of the test fixtures and the README's flags (`--min-side 32 --image-low 0
--image-high 0.999 --text-low 0.3`). Reported: pages/s and triplets/s of the whole run (model loads
included), the job's seconds per stage (the seconds each stage's workers spent on the pages, summed over
workers) and their shares, pages per triplet, and a projection to `--target-triplets` (36.7M, the paper's
data set): core-hours per stage at the measured pages per triplet and stage seconds per page, counting a
stage's worker-second as one core-second (the stages' tasks are single-threaded Python; the model actors'
torch threads are what Ray gives an actor), and the core-hours the run's reserved CPUs took for its wall
time. Then (unless `--no-alone`) each stage runs alone, in the same Ray, on its input precomputed and
materialised by the stages before it (read, fetch, clean, score, instruct, as `jobs.stages.mining` builds
them), and `whole_job_vs_slowest_stage` = the slowest stage's seconds alone / the whole job's seconds: the
whole job's throughput as a share of its slowest stage's. Goal: >= 0.8. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray

from jobs.mine import MineConfig, list_page_files, run
from jobs.stages.mining import SeenImages, mining_steps, read_page_files
from magiclens_core.synthetic import SyntheticWorld

OFFICIAL_TINY = Path(__file__).resolve().parents[1] / "fixtures" / "official_tiny" / "params_tiny.pkl"
PAPER_TRIPLETS = 36_700_000


def projection(summary: dict, target_triplets: int, cpus: int) -> dict:
    """Core-hours to mine `target_triplets` at this run's pages per triplet and per-stage seconds per page."""
    pages, triplets = summary["pages_read"], summary["triplets_written"]
    if not pages or not triplets:
        return {"error": "no triplets mined: nothing to project from"}
    pages_needed = target_triplets * pages / triplets
    stage_hours = {stage: round(seconds / pages * pages_needed / 3600, 1)
                   for stage, seconds in summary["seconds_per_stage"].items()}
    return {
        "target_triplets": target_triplets, "pages_needed": round(pages_needed),
        "stage_core_hours": stage_hours, "total_stage_core_hours": round(sum(stage_hours.values()), 1),
        "dominant_stage": max(stage_hours, key=stage_hours.get),
        "reserved_core_hours_at_run_rate": round(target_triplets / summary["triplets_per_s"] * cpus / 3600, 1),
    }


def stages_alone(config: MineConfig) -> dict[str, float]:
    """Seconds of each stage run alone on its materialised input (a fresh run: nothing seen yet)."""
    files, roots, _ = list_page_files(config.pages)
    started = time.perf_counter()
    data = read_page_files(files, set(), config.cpus_per_task).materialize()
    seconds = {"read": time.perf_counter() - started}
    for stage, step in mining_steps(config, roots, SeenImages.remote(set())):
        started = time.perf_counter()
        data = step(data).materialize()
        seconds[stage] = time.perf_counter() - started
    return {stage: round(value, 2) for stage, value in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--instructions", default="template", choices=["template", "llm"])
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--model", default=str(OFFICIAL_TINY))
    parser.add_argument("--llm-workers", type=int, default=1, help="text-generation actors (--instructions llm)")
    parser.add_argument("--target-triplets", type=int, default=PAPER_TRIPLETS)
    parser.add_argument("--alone", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each stage alone")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mine_pipeline_"))
    started = time.perf_counter()
    site = SyntheticWorld(seed=0).write_web_pages(work / "site", args.pages)
    write_seconds = time.perf_counter() - started

    ray.init(num_cpus=args.cpus, include_dashboard=False)
    config = MineConfig(pages=[str(site)], out=str(work / "mined"), model=args.model,
                        instructions=args.instructions, llm_workers=args.llm_workers, min_side=32, image_low=0.0,
                        image_high=0.999, text_low=0.3)
    try:
        started = time.perf_counter()
        summary = run(config)
        whole_seconds = time.perf_counter() - started
        alone = stages_alone(config) if args.alone else {}
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    seconds = summary["seconds_per_stage"]
    total = sum(seconds.values()) or 1.0
    pages, triplets = summary["pages_read"], summary["triplets_written"]
    print(json.dumps({
        "benchmark": "mine_pipeline", "instructions": args.instructions, "llm_workers": args.llm_workers,
        "pages": args.pages,
        "ray_cpus": args.cpus, "machine_cores": os.cpu_count(), "corpus_write_s": round(write_seconds, 2),
        "job_seconds": summary["seconds"], "pages_read": pages, "images_found": summary["images_found"],
        "images_kept": summary["images_kept"], "pairs_scored": summary["pairs_scored"],
        "triplets_written": triplets, "instructions_by_origin": summary["instructions_by_origin"],
        "rejects": summary["rejects"],
        "pages_per_s": summary["pages_per_s"], "triplets_per_s": summary["triplets_per_s"],
        "seconds_per_stage": seconds,
        "stage_share": {stage: round(value / total, 3) for stage, value in seconds.items()},
        "pages_per_triplet": round(pages / triplets, 3) if triplets else None,
        "whole_job_s": round(whole_seconds, 2), "stage_alone_s": alone,
        "slowest_stage_alone": max(alone, key=alone.get) if alone else None,
        "whole_job_vs_slowest_stage": round(max(alone.values()) / whole_seconds, 3) if alone else None,
        "projection": projection(summary, args.target_triplets, args.cpus),
    }))


if __name__ == "__main__":
    main()
