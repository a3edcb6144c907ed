"""Actor pools of the jobs' model and search stages."""

from __future__ import annotations

import ray.data


def actor_pool(workers: int) -> ray.data.ActorPoolStrategy:
    """A pool of 1 to `workers` actors: it starts one and grows while inputs wait, so a small input does not pay
    for starting (and loading a model into) actors it cannot keep busy."""
    return ray.data.ActorPoolStrategy(min_size=1, max_size=workers)
