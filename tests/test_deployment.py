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
    """3 nodes, 4 rounds; node 2 is killed as round 2 starts, while it trains: round 2 goes on with
    the other two as soon as the SuperLink declares node 2 unavailable (its missed heartbeats, not
    the hour of ``federation.round_timeout_s``; sooner than Flower's default heartbeat would, as the
    nodes declare a 10 s heartbeat), and no later round samples it."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    # 50 local steps (about a second) keep node 2 training well past the kill, which follows round
    # 1's line in metrics.jsonl within a twentieth of a second: it never replies in round 2
    extra = (
        "partition.num_clients=3 federation.min_train_clients=1 federation.connect_timeout_s=30 "
        "federation.round_timeout_s=3600 train.local_steps=50"
    )
    output = tmp_path / "out"
    config = _run_config(output, hub_mirror, rounds=4, extra=extra)
    with LocalCluster(tmp_path / "flwr", 3, hub_mirror=str(hub_mirror), heartbeat_interval=10) as cluster:
        run_id = cluster.superlink.submit(PROJECT_DIR, config)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not _round_started(output, 2):
            time.sleep(0.05)
        assert _round_started(output, 2), "round 2 never started"
        cluster.kill_node(2)
        outcome = cluster.superlink.follow(run_id, timeout=600, stream=False)
        assert outcome.status == COMPLETED, outcome
    rows = _rows(output)
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["partitions_aggregated"] == [0, 1, 2]
    assert rows[2]["clients_sampled"] == 3 and rows[2]["partitions_aggregated"] == [0, 1]
    [reason] = rows[2]["clients_rejected"].values()
    assert "Node Unavailable" in reason, reason  # the SuperLink's verdict, not the round timeout
    # given up on after its declared heartbeats (2 × 10 s), before Flower's default ones (2 × 30 s)
    assert rows[2]["seconds"] < HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL
    for row in rows[3:]:  # the dead node is not sampled again
        assert row["clients_sampled"] == 2 and row["partitions_aggregated"] == [0, 1], row
        assert row["clients_rejected"] == {}, row


def _round_started(output, server_round):
    """Round ``server_round`` began: round ``server_round - 1`` is in metrics.jsonl."""
    runs = list(output.iterdir()) if output.exists() else []
    if not runs or not (runs[0] / "metrics.jsonl").exists():
        return False
    return len((runs[0] / "metrics.jsonl").read_text().splitlines()) >= server_round


def test_a_cluster_across_separate_hosts_trains_over_shaped_tls_links(tmp_path, hub_mirror):
    """The SuperLink and each SuperNode in a network namespace of their own (launch.netns), every
    link shaped to 100 Mbit/s, TLS and node authentication on: the nodes reach the SuperLink only
    at the addresses of their own links, and the run completes as on loopback."""
    from launch.netns import Hosts, unavailable_reason

    if reason := unavailable_reason():
        pytest.skip(reason)
    with Hosts(2, rate_mbit=100) as hosts:
        cluster = LocalCluster(
            tmp_path / "flwr", 2, tls=True, auth=True, hub_mirror=str(hub_mirror), hosts=hosts
        )
        with cluster:
            assert all(
                hosts.hub_address(i) in " ".join(cluster.node_command(n)) for i, n in enumerate(cluster.nodes)
            )
            outcome = cluster.run(_run_config(tmp_path / "out", hub_mirror), timeout=400, stream=False)
            assert outcome.status == COMPLETED, outcome
    rows = _rows(tmp_path / "out")
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients_aggregated"] == 2 for row in rows[1:])
