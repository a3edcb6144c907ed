"""Render cluster/kuberay/rayservice.yaml from the two files it derives from, so it never drifts from them:
`serveConfigV2` is serve_app/config.yaml with the cluster's overrides below, `rayClusterConfig` is the spec of
cluster/kuberay/raycluster.yaml.

    python -m cluster.render_rayservice           # write the manifest
    python -m cluster.render_rayservice --check   # exit 1 when the committed manifest differs

The overrides are the only differences from serve_app/config.yaml, each a (path, value): where the cluster's
model, table and stored images are (the shared volume and object storage every pod reaches), and one GPU per
replica. The rendered Serve config is checked with `serve_app.config_check` before it is written.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_app" / "config.yaml"
RAY_CLUSTER = ROOT / "cluster" / "kuberay" / "raycluster.yaml"
RAY_SERVICE = ROOT / "cluster" / "kuberay" / "rayservice.yaml"
NAME = "magiclens-serve"

Path_ = tuple[str | int, ...]
APP = ("applications", 0)
SERVER = (*APP, "deployments", 0)
OVERRIDES: tuple[tuple[Path_, Any], ...] = (
    ((*APP, "args", "model"), "/shared/models/magiclens-base"),
    ((*APP, "args", "db"), "s3://my-bucket/magiclens/lancedb"),
    ((*APP, "args", "allowed_uri_prefixes"), ["s3://my-bucket/magiclens/pool/"]),
    ((*SERVER, "ray_actor_options", "num_gpus"), 1),
)
HEADER = ("# KubeRay RayService: the MagicLens search application (serve_app) on its own autoscaled cluster.\n"
          "# Rendered by `python -m cluster.render_rayservice`; do not edit: change serve_app/config.yaml, the\n"
          "# overrides in cluster/render_rayservice.py or cluster/kuberay/raycluster.yaml, and render again.\n")


class _Block(str):
    """A multi-line string written as a YAML literal block (`|`), readable in the manifest."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Block, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|"))


def _node(document: Any, path: Path_) -> Any:
    for key in path:
        document = document[key]
    return document


def apply_overrides(serve_config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `serve_config` with `OVERRIDES` set; each overridden key must already exist in it (so a
    renamed key in serve_app/config.yaml fails here instead of adding a key Serve would ignore)."""
    config = copy.deepcopy(serve_config)
    for path, value in OVERRIDES:
        parent = _node(config, path[:-1])
        if path[-1] not in parent:
            raise KeyError(f"override {'.'.join(map(str, path))}: no such key in {SERVE_CONFIG.name}")
        parent[path[-1]] = copy.deepcopy(value)
    if _node(config, SERVER)["name"] != "SearchServer":
        raise KeyError("the first deployment of the application must be SearchServer, whose replicas get a GPU")
    return config


def render(serve_config: dict[str, Any], ray_cluster: dict[str, Any]) -> str:
    """The RayService manifest's text for a parsed Serve config and RayCluster manifest."""
    from serve_app.config_check import check_config

    config = apply_overrides(serve_config)
    problems = check_config(config)
    if problems:
        raise ValueError("the rendered Serve config is not sound:\n  " + "\n  ".join(problems))
    manifest = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": NAME},
        "spec": {
            "serveConfigV2": _Block(yaml.safe_dump(config, sort_keys=False, width=120)),
            "rayClusterConfig": copy.deepcopy(ray_cluster["spec"]),
        },
    }
    return HEADER + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120)


def render_files() -> str:
    """`render` of serve_app/config.yaml and cluster/kuberay/raycluster.yaml."""
    return render(yaml.safe_load(SERVE_CONFIG.read_text()), yaml.safe_load(RAY_CLUSTER.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.render_rayservice", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the committed manifest")
    args = parser.parse_args(argv)
    text = render_files()
    if args.check:
        if not RAY_SERVICE.is_file() or RAY_SERVICE.read_text() != text:
            print(f"{RAY_SERVICE.relative_to(ROOT)} is out of date: run python -m cluster.render_rayservice",
                  file=sys.stderr)
            return 1
        print(f"{RAY_SERVICE.relative_to(ROOT)}: up to date")
        return 0
    RAY_SERVICE.write_text(text)
    print(f"wrote {RAY_SERVICE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
