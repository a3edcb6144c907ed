"""`python -m serve_app.run CONFIG --ingress haproxy`, as an operator runs it: a new local Ray whose HTTP
requests HAProxy hands straight to the replicas' own HTTP servers, answering real queries; stopped by SIGINT."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml
from served_pool import free_port

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300


def test_the_haproxy_ingress_answers_queries_and_stops_on_ctrl_c(indexed_pool, tmp_path):
    config = yaml.safe_load((ROOT / "serve_app" / "config.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    folders = sorted({str(path.parent) for path in indexed_pool.files.values()})
    app["args"].update(model=indexed_pool.model, db=indexed_pool.db, table=indexed_pool.table,
                       allowed_uri_prefixes=folders)
    deployment = app["deployments"][0]
    deployment.pop("autoscaling_config")
    deployment["num_replicas"] = 1
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    output = tmp_path / "output.log"
    with output.open("w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "serve_app.run", str(path), "--ingress", "haproxy"],
                                  cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and server.poll() is None and f":{port}/ until Ctrl-C" not in (
                output.read_text()):
            time.sleep(0.5)
        assert f":{port}/ until Ctrl-C" in output.read_text(), output.read_text()[-3000:]
        haproxy = [child for child in psutil.process_iter(["name", "cmdline"])
                   if "haproxy" in (child.info["name"] or "") and child.info["cmdline"]]
        assert haproxy, "no HAProxy process runs"
        image_id, image = next(iter(indexed_pool.files.items()))
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/search", timeout=60,
                            json={"image": base64.b64encode(image.read_bytes()).decode(), "k": 3})
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["id"] == image_id
        timings = [part.split(";")[0].strip() for part in answer.headers["server-timing"].split(",")]
        assert timings == ["read", "decode", "embed", "search", "server"]
        assert httpx.post(f"http://127.0.0.1:{port}/v1/search", json={"k": 3}, timeout=60).status_code == 422
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        finally:
            if server.poll() is None:
                server.kill()
    assert server.returncode == 0, output.read_text()[-3000:]
    assert not [child for child in psutil.process_iter(["name"]) if "haproxy" in (child.info["name"] or "")]


def test_the_haproxy_ingress_is_refused_for_a_cluster_address(monkeypatch, capsys):
    from serve_app.run import main

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert main([str(ROOT / "serve_app" / "config.yaml"), "--ingress", "haproxy"]) == 2
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in capsys.readouterr().err
