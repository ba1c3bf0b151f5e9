"""A real deployment on loopback: SuperLink + SuperNodes as separate processes, TLS, SuperNode
authentication, and a node killed mid-run."""

import json
import time

import pytest
from conftest import TINY_OVERRIDES

from launch.cluster import LocalCluster, SuperNode
from launch.simulation import COMPLETED, CONNECTION, PROJECT_DIR

pytestmark = pytest.mark.e2e


def _run_config(output, hub_mirror, rounds=2, extra=""):
    overrides = " ".join([*TINY_OVERRIDES, f"federation.num_rounds={rounds}", extra]).strip()
    return [f"model='tiny_bert' output-dir='{output}' hub-mirror='{hub_mirror}' overrides='{overrides}'"]


def _rows(output):
    (run_dir,) = output.iterdir()
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tls_authenticated_cluster_runs_and_refuses_an_unregistered_node(tmp_path, hub_mirror):
    with LocalCluster(tmp_path / "flwr", 2, tls=True, auth=True, hub_mirror=str(hub_mirror)) as cluster:
        # A third node whose key the SuperLink never registered must not get in.
        stranger = SuperNode(2, "partition-id=0 num-partitions=2", cluster.make_node_key("stranger"))
        cluster.start_node(stranger)
        assert stranger.process.wait(timeout=120) != 0
        assert "Failed to activate SuperNode" in stranger.log_file.read_text()
        listed = json.loads(
            cluster.superlink.flwr("supernode", "list", CONNECTION, "--format", "json").stdout
        )
        assert len(listed["nodes"]) == 2
        outcome = cluster.run(_run_config(tmp_path / "out", hub_mirror), timeout=400, stream=False)
        assert outcome.status == COMPLETED, outcome
        assert "BEGIN CERTIFICATE" in cluster.superlink.tls.ca_cert.read_text()
        processes = [node.process for node in cluster.nodes] + [cluster.superlink.process]
    rows = _rows(tmp_path / "out")
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients_aggregated"] == 2 for row in rows[1:])
    assert all(p.poll() is not None for p in processes)  # everything the cluster started is gone


def test_a_node_killed_mid_run_does_not_stall_it(tmp_path, hub_mirror):
    """3 nodes, 4 rounds; node 2 dies during round 2: the run still completes all 4 rounds."""
    extra = "partition.num_clients=3 federation.min_train_clients=1 federation.connect_timeout_s=30"
    config = _run_config(tmp_path / "out", hub_mirror, rounds=4, extra=extra)
    with LocalCluster(tmp_path / "flwr", 3, hub_mirror=str(hub_mirror)) as cluster:
        run_id = cluster.superlink.submit(PROJECT_DIR, config)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not _round_started(tmp_path / "out", 2):
            time.sleep(1.0)
        cluster.kill_node(2)
        start = time.monotonic()
        outcome = cluster.superlink.follow(run_id, timeout=600, stream=False)
        assert outcome.status == COMPLETED, outcome
        assert time.monotonic() - start < 600
    rows = _rows(tmp_path / "out")
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["clients_aggregated"] == 3
    assert all(row["clients_aggregated"] == 2 for row in rows[3:])  # the dead node is not sampled again
    assert any(row["clients_rejected"] for row in rows[2:3]) or rows[2]["clients_aggregated"] == 3


def _round_started(output, server_round):
    """Round ``server_round`` began: round ``server_round - 1`` is in metrics.jsonl."""
    runs = list(output.iterdir()) if output.exists() else []
    if not runs or not (runs[0] / "metrics.jsonl").exists():
        return False
    return len((runs[0] / "metrics.jsonl").read_text().splitlines()) >= server_round
