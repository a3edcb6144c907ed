"""Serve the application from a Serve config file, failing fast: `serve run` that exits on a bad deployment.

    python -m serve_app.run serve_app/config.yaml [--ingress proxy|haproxy]

The file is checked first (`serve_app.config_check`: keys, the model and the table it names, replicas that
fit). Then it is deployed, as `serve run` would, on the cluster at `RAY_ADDRESS` or on a new local Ray, and
this command waits until every application is RUNNING, printing its URL, or exits 1 with the reason when one
fails to deploy (Ray's `serve run CONFIG` keeps waiting then). It serves until Ctrl-C or SIGTERM, which
shut the applications (and a local Ray) down.

`--ingress haproxy` starts the local Ray with Serve's HAProxy ingress (`serve_app.ingress`), which cuts the
time a query spends outside its replica by about two thirds; a lost replica's requests then get a plain 500.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from serve_app.config_check import check_config, cluster_cpus, deployment_problems
from serve_app.ingress import HAPROXY_SWITCH, use_haproxy_locally

READY_TIMEOUT_S = 600.0


def _deploy(config: dict[str, Any]) -> None:
    """Start Serve with the file's HTTP and proxy options and deploy its applications (what `serve run` does)."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                         grpc_options=schema.grpc_options.model_dump(),
                         controller_options=schema.controller_options.model_dump())
    client.deploy_apps(schema, _blocking=False)


def wait_until_running(names: list[str], timeout_s: float = READY_TIMEOUT_S) -> str | None:
    """None once every application in `names` is RUNNING; the first failure's message when one fails to
    deploy or the timeout passes."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        applications = serve.status().applications
        states = {name: applications.get(name) for name in names}
        for name, state in states.items():
            if state is not None and state.status == "DEPLOY_FAILED":
                return f"application {name!r} failed to deploy: {state.message.strip().splitlines()[-1]}"
        if all(state is not None and state.status == "RUNNING" for state in states.values()):
            return None
        time.sleep(1.0)
    return f"the applications were not running after {timeout_s:.0f} s; see `serve status`"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.run", description=__doc__.splitlines()[0])
    parser.add_argument("config", metavar="CONFIG.yaml")
    parser.add_argument("--ingress", choices=["proxy", "haproxy"], default="proxy",
                        help="what takes HTTP requests on a new local Ray: Serve's proxy, or HAProxy straight to "
                             "the replicas (faster; a lost replica's requests get a plain 500)")
    args = parser.parse_args(argv)
    if args.ingress == "haproxy":
        if os.environ.get("RAY_ADDRESS"):
            print(f"--ingress haproxy starts a local Ray; the cluster at RAY_ADDRESS has HAProxy when its nodes "
                  f"were started with {HAPROXY_SWITCH}=1 (cluster/README.md)", file=sys.stderr)
            return 2
        use_haproxy_locally()
    config = yaml.safe_load(Path(args.config).read_text())
    problems = check_config(config) or deployment_problems(config, cluster_cpus())
    if problems:
        print(f"{args.config}: cannot serve:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    import ray
    from ray import serve

    from magiclens_core.search.store import silence_fork_warnings

    silence_fork_warnings()
    # Ray's notice that it turned token authentication on, its default, is not a warning to act on
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level="WARNING")
    try:
        _deploy(config)
        failure = wait_until_running([application["name"] for application in config["applications"]])
        if failure:
            print(f"{args.config}: {failure}", file=sys.stderr)
            return 1
        http = config.get("http_options") or {}
        host = http.get("host", "127.0.0.1")
        print(f"serving {args.config} at http://{'127.0.0.1' if host == '0.0.0.0' else host}:"
              f"{http.get('port', 8000)}/ until Ctrl-C", flush=True)
        stopped = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopped.set())
        stopped.wait()
        serve.shutdown()
        return 0
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
