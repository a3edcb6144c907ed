"""Train MagicLens on triplets with Ray Train; the last line printed is a JSON summary.

    python -m jobs.train --triplets train.parquet --init tiny --name demo --storage runs --steps 200
    ray job submit --working-dir . -- python -m jobs.train --config train.yaml

Rerunning the same `--name`/`--storage` resumes from the run's latest checkpoint; once the run has
finished, it prints the run's summary again without training.
"""

from __future__ import annotations

import os

from jobs.common import init_ray, parse_config, print_summary
from jobs.train_loop import TrainConfig, cpus_needed, run_training


def main(argv: list[str] | None = None) -> dict:
    """Parse options, connect to Ray, train, print and return the summary."""
    config = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], prog="python -m jobs.train")
    init_ray(num_cpus=max(os.cpu_count() or 1, cpus_needed(config)))  # used only when starting a local Ray
    summary = run_training(config)
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
