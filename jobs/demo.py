"""The whole system end to end on a local Ray, offline, with no pretrained weights; then the server.

    python -m jobs.demo [--work demo] [--pages 800] [--steps 500] [--port 8000] [--serve true]

The synthetic world (`magiclens_core.synthetic`) writes a small web site (pages of related images with
alt text and captions), a held-out benchmark and an image pool. Then, each job as its own command would
run it, on one local Ray: `jobs.mine` mines triplets from the site (template instructions), `jobs.train`
trains a tiny MagicLens from random weights on them, `jobs.index` embeds the pool into a LanceDB table,
`jobs.evaluate` scores the held-out benchmark, and the Serve application answers queries on the table
until Ctrl-C (or SIGTERM) stops it and the local Ray. Each stage prints one line; its full log is in
`WORK/logs/`. Run again, every stage reuses what is done (mining and indexing skip what they hold, a
finished training run is not trained again).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import evaluate, index, mine, train
from jobs.common import Demand, InputError, init_ray, run_job
from magiclens_core.synthetic import SyntheticWorld

# The image tower that scores mined pairs: the tiny official-format checkpoint (random weights) the
# repository ships; the text tower that scores their metadata is the packaged all-MiniLM-L6-v2.
SCORING_MODEL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "official_tiny" / "params_tiny.pkl"
BENCHMARK_QUERIES = 100
POOL_SIZE = 300
TRAIN_SETTINGS = ["--init", "tiny", "--workers", "2", "--batch-size", "32", "--lr", "2e-3", "--warmup-steps", "10",
                  "--weight-decay", "0.05", "--temperature", "0.07", "--learn-temperature", "true",
                  "--keep-checkpoints", "2"]


@dataclass(kw_only=True)
class DemoConfig:
    work: str = field(default="demo", metadata={"help": "folder for everything the demo writes"})
    pages: int = field(default=800, metadata={"help": "synthetic web pages to mine"})
    steps: int = field(default=500, metadata={"help": "training steps"})
    port: int = field(default=8000, metadata={"help": "HTTP port of the server (on 127.0.0.1)"})
    serve: bool = field(default=True, metadata={"help": "serve the table at the end, until Ctrl-C"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic world"})


@contextmanager
def logged(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so Ray's and the libraries' output
    too) to `path` for the block's duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def stage(work: Path, name: str, job: Any, argv: list[str], line: Callable[[dict], str]) -> dict:
    """Run `job` (a job module) with `argv` as its command line would, its output in `WORK/logs/NAME.log`;
    print one line: the stage's name, `line(summary)` and its seconds."""
    started = time.perf_counter()
    log = work / "logs" / f"{name}.log"
    try:
        with logged(log):
            print(f"$ python -m jobs.{name} {' '.join(argv)}", flush=True)
            summary = job.main(argv)
    except SystemExit as err:
        raise InputError(f"{name} stopped ({err.code}); its log: {log}") from None
    print(f"{name:<9} {line(summary)}  [{time.perf_counter() - started:.0f} s, log: {log}]", flush=True)
    return summary


def write_world(work: Path, config: DemoConfig) -> dict[str, Path]:
    """The synthetic site, the benchmark, its image pool as files, a few of its queries as files (with
    `queries.json`: image, instruction, right answer) and all of them as `jobs.retrieve` input
    (`queries.parquet`); written once, reused after."""
    world = SyntheticWorld(seed=config.seed)
    paths = {"pages": work / "site", "bench": work / "benchmark", "pool": work / "pool", "queries": work / "queries"}
    if not (paths["pages"] / f"page{config.pages - 1}.html").is_file():
        world.write_web_pages(paths["pages"], config.pages)
    if not (paths["queries"] / "queries.json").is_file():
        bench = world.benchmark(BENCHMARK_QUERIES, POOL_SIZE)
        bench.write(paths["bench"])
        paths["pool"].mkdir(parents=True, exist_ok=True)
        for pool_id, image in zip(bench.pool_ids, bench.pool_images, strict=True):
            (paths["pool"] / f"{pool_id}.png").write_bytes(image)
        paths["queries"].mkdir(parents=True, exist_ok=True)
        samples = []
        for number in range(5):
            file = paths["queries"] / f"query{number}.png"
            file.write_bytes(bench.query_images[number])
            samples.append({"image": str(file), "instruction": bench.instructions[number],
                            "answer": f"{bench.pool_ids[bench.answers[number]]}.png"})
        pq.write_table(pa.table({"query_id": bench.query_ids, "image": pa.array(bench.query_images, pa.binary()),
                                 "instruction": bench.instructions}), paths["queries"] / "queries.parquet")
        (paths["queries"] / "queries.json").write_text(json.dumps(samples, indent=1))
    return paths


def run(config: DemoConfig) -> dict:
    """Every stage, then (with `serve`) the server until a signal; the summary of the stages."""
    import ray

    work = Path(config.work).resolve()
    print(f"demo: everything goes to {work}", flush=True)
    paths = write_world(work, config)
    with logged(work / "logs" / "ray.log"):
        init_ray(Demand(cpus=4))
    mined = stage(work, "mine", mine, [
        "--pages", str(paths["pages"]), "--model", str(SCORING_MODEL), "--out", str(work / "mined"),
        "--instructions", "template", "--image-low", "-1", "--image-high", "0.9999", "--min-side", "32",
        "--cpus-per-worker", "0.5"],
        lambda s: f"{s['pages_read']} pages read, {s['images_kept']} images kept, {s['triplets_written']} "
                  f"triplets written ({s['triplets_before']} from earlier runs)")
    trained = stage(work, "train", train, [
        "--triplets", mined["triplets"], "--name", "demo", "--storage", str(work / "runs"),
        "--steps", str(config.steps), "--checkpoint-every", str(max(config.steps // 2, 1)),
        "--validation", str(paths["bench"]), *TRAIN_SETTINGS],
        lambda s: f"{s['steps']} steps ({s['triplets_seen']} triplets seen), best validation R@1 "
                  f"{s['best_val_recall@1']:.0f}% R@10 {s['best_val_recall@10']:.0f}%"
                  + (" (already trained)" if s.get("already_finished") else ""))
    model = trained["model"]
    indexed = stage(work, "index", index, [
        "--images", str(paths["pool"]), "--model", model, "--db", str(work / "lancedb"), "--table", "images"],
        lambda s: f"{s['rows_added']} images added, {s['rows_already_present']} already there, "
                  f"{s['table_rows']} in the table")
    scored = stage(work, "evaluate", evaluate, [
        "--benchmark", "synthetic", "--data", str(paths["bench"]), "--model", model, "--out", str(work / "eval")],
        lambda s: f"R@1 {s['metrics']['synthetic/R@1']:.0f}%, R@5 {s['metrics']['synthetic/R@5']:.0f}%, "
                  f"R@10 {s['metrics']['synthetic/R@10']:.0f}% on {s['queries']} held-out queries, a pool of "
                  f"{s['pool_size']} (chance: {100 / s['pool_size']:.1f}%, {500 / s['pool_size']:.1f}%, "
                  f"{1000 / s['pool_size']:.1f}%)")
    summary = {"mine": mined["triplets_written"] + mined["triplets_before"], "model": model,
               "table_rows": indexed["table_rows"], "metrics": scored["metrics"], "work": str(work)}
    if config.serve:
        serve_until_stopped(work, paths, model, config.port)
    ray.shutdown()
    return summary


def serve_until_stopped(work: Path, paths: dict[str, Path], model: str, port: int) -> None:
    """Start the Serve application on the demo table, print how to query it, serve until SIGINT or SIGTERM."""
    from ray import serve

    from serve_app.app import application
    from serve_app.config import AppConfig

    app_config = AppConfig(model=model, db=str(work / "lancedb"), table="images",
                           allowed_uri_prefixes=(str(paths["pool"]),))
    with logged(work / "logs" / "serve.log"):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(app_config, {"num_replicas": 1, "autoscaling_config": None}), name="magiclens",
                  route_prefix="/")
    sample = json.loads((paths["queries"] / "queries.json").read_text())[0]
    url = f"http://127.0.0.1:{port}"
    print(f"serve     ready: open {url}/ (upload a query image from {paths['queries']}, type its instruction)\n"
          f"  curl -s {url}/v1/search -F image=@{sample['image']} -F 'instruction={sample['instruction']}' -F k=5\n"
          f"  python -c \"from serve_app.client import MagicLensClient; print(MagicLensClient('{url}')"
          f".search('{sample['image']}', '{sample['instruction']}', k=5))\"\n"
          f"  (the right answer to that query is {sample['answer']}; the others are in "
          f"{paths['queries'] / 'queries.json'})\n"
          f"serving until Ctrl-C", flush=True)
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    print("stopping the server and the local Ray", flush=True)
    with logged(work / "logs" / "serve.log"):
        serve.shutdown()


def main(argv: list[str] | None = None) -> dict:
    """Parse options, start the local Ray, run the demo."""
    return run_job(DemoConfig, run, argv, __doc__.splitlines()[0], "python -m jobs.demo",
                   needs_ray=lambda config: False)


if __name__ == "__main__":
    main()
