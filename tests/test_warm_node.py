"""The warm node runtime (``launch/warm_node.py``) on a real loopback deployment: the model loads once
per node, the metrics equal the simulation's, a killed worker comes back, a worker that cannot
start leaves the node training cold, and a SIGTERMed launcher leaves no process behind."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ONE_ACTOR_FEDERATION, TINY_OVERRIDES

from launch.cluster import LocalCluster
from launch.processes import wait_ended
from launch.simulation import COMPLETED, PROJECT_DIR, LocalSuperLink

pytestmark = pytest.mark.e2e
ROUNDS = 4
LOADED = "client_app.session: loading"


def _overrides(extra=()):
    return " ".join([*TINY_OVERRIDES, f"federation.num_rounds={ROUNDS}", *extra])


def _run_config(output, hub_mirror, extra=()):
    return [
        f"model='tiny_bert' output-dir='{output}' hub-mirror='{hub_mirror}' overrides='{_overrides(extra)}'"
    ]


def _rows(output):
    (run_dir,) = output.iterdir()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _eval(rows):
    return [{k: v for k, v in r.items() if k.startswith("eval_") and k != "eval_seconds"} for r in rows]


def _round_started(output, server_round):
    folders = list(output.iterdir()) if output.exists() else []
    if not folders or not (folders[0] / "metrics.jsonl").exists():
        return False
    return len((folders[0] / "metrics.jsonl").read_text().splitlines()) >= server_round


def test_the_model_loads_once_per_node_and_the_metrics_equal_the_simulation(tmp_path, hub_mirror):
    with LocalCluster(tmp_path / "flwr", 2, hub_mirror=str(hub_mirror)) as cluster:
        outcome = cluster.run(_run_config(tmp_path / "deployed", hub_mirror), timeout=600, stream=False)
        assert outcome.status == COMPLETED, outcome
        logs = [node.runtime_log.read_text() for node in cluster.nodes]
    # 4 train rounds per node, one model load per node (the first round's)
    assert [text.count(LOADED) for text in logs] == [1, 1], [t[-2000:] for t in logs]
    assert all(text.count("done in the warm worker") >= ROUNDS for text in logs)
    with LocalSuperLink(tmp_path / "sim-home") as superlink:
        run_id = superlink.submit(
            PROJECT_DIR,
            _run_config(tmp_path / "simulated", hub_mirror),
            ONE_ACTOR_FEDERATION,
        )
        assert superlink.follow(run_id, timeout=600, stream=False).status == COMPLETED
    deployed, simulated = _rows(tmp_path / "deployed"), _rows(tmp_path / "simulated")
    assert _eval(deployed) == _eval(simulated)
    assert [r["train_loss"] for r in deployed] == [r["train_loss"] for r in simulated]


def test_a_worker_killed_mid_run_is_restarted_and_its_node_trains_again(tmp_path, hub_mirror):
    extra = ["federation.min_replies=1", "federation.round_timeout_s=120"]
    with LocalCluster(tmp_path / "flwr", 2, hub_mirror=str(hub_mirror)) as cluster:
        run_id = cluster.superlink.submit(PROJECT_DIR, _run_config(tmp_path / "out", hub_mirror, extra))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (
            _round_started(tmp_path / "out", 2) and cluster.worker_pids(1)
        ):
            time.sleep(0.2)
        (worker,) = cluster.worker_pids(1)
        psutil.Process(worker).kill()
        outcome = cluster.superlink.follow(run_id, timeout=600, stream=False)
        assert outcome.status == COMPLETED, outcome
        log = cluster.nodes[1].runtime_log.read_text()
        assert "died" in log and cluster.worker_pids(1) and cluster.worker_pids(1) != [worker]
    rows = _rows(tmp_path / "out")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert rows[-1]["clients_aggregated"] == 2  # the node is back by the last round


def test_a_worker_that_cannot_start_leaves_the_node_training_cold(tmp_path, hub_mirror):
    with LocalCluster(
        tmp_path / "flwr", 2, hub_mirror=str(hub_mirror), worker_options=["--gpu", "0"]
    ) as cluster:
        outcome = cluster.run(
            _run_config(tmp_path / "out", hub_mirror, ["federation.num_rounds=1"]), timeout=600
        )
        assert outcome.status == COMPLETED, outcome
        log = cluster.nodes[0].runtime_log.read_text()
    assert "no such CUDA device" in log and "fresh flwr-clientapp" in log
    assert log.count("could not start") == 1  # tried once, not again for every task
    assert all(r["clients_aggregated"] == 2 for r in _rows(tmp_path / "out")[1:])


def test_a_sigterm_to_the_cluster_launcher_stops_everything_it_started(tmp_path, hub_mirror):
    home = tmp_path / "flwr"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch.cluster", "--num-nodes", "2", "--flwr-home", str(home),
         "--output-dir", str(tmp_path / "out"), "--hub-mirror", str(hub_mirror),
         "--run-config", f"model='tiny_bert' overrides='{_overrides()}'"],
        cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    started = []
    while time.monotonic() < deadline and not _round_started(tmp_path / "out", 1):
        started = psutil.Process(launcher.pid).children(recursive=True)
        time.sleep(0.5)
    started = psutil.Process(launcher.pid).children(recursive=True) or started
    names = " ".join(" ".join(p.cmdline()) for p in started if p.is_running())
    for name in ("fedsubspace-supernode", "launch.warm_node", "fedsubspace-superlink"):
        assert name in names
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) == 128 + signal.SIGTERM
    alive = wait_ended(started, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
