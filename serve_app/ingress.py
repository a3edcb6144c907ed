"""Serve's HAProxy ingress on a local Ray: the environment that switches it on, set before the Ray starts.

With `RAY_SERVE_ENABLE_HA_PROXY=1` in the environment of every Ray process, HAProxy, not Serve's Python proxy,
takes the HTTP requests and hands each to a replica's own HTTP server. A request a lost replica held is then
answered by HAProxy's plain-text 500 instead of the application's JSON 503 (the Python client retries both).
On a cluster the switch is the nodes' environment, set when they start (cluster/README.md).
"""

from __future__ import annotations

import os

HAPROXY_SWITCH = "RAY_SERVE_ENABLE_HA_PROXY"
# a stopping replica keeps answering this long (30 s by Serve's default, for load balancers outside Ray to
# notice); on a local Ray only Serve's own HAProxy routes to the replicas, and it is told at once
LOCAL_DRAINING = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def use_haproxy_locally() -> None:
    """Switch HAProxy on for the local Ray this process will start (its processes, the Serve controller and the
    replicas among them, inherit the environment). A draining period the operator set is kept."""
    os.environ.update({**LOCAL_DRAINING, **os.environ, HAPROXY_SWITCH: "1"})
