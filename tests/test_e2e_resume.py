"""Resume equals uninterrupted with real processes: `flwr run` on the simulation runtime, the
ServerApp (the `flwr-simulation` process, with its Ray workers) SIGKILLed once round 2's checkpoint
is on disk, then the run folder resumed as a new Flower run with new node ids. The resumed process
must train only the rounds after the checkpoint (its log, the nodes its records name) and its nodes
must continue from the state the killed run's nodes left on disk."""

import json
import re
import signal
import time

import numpy as np
import pytest
from conftest import ONE_ACTOR_FEDERATION, TINY_OVERRIDES, contents, node_state_of
from safetensors.numpy import load_file

from client_app.durable import STATE_DIR_ENV
from launch.processes import end_processes, server_apps
from launch.simulation import COMPLETED, CONNECTION, PROJECT_DIR, LocalSuperLink
from server_app.checkpoint import round_folders

pytestmark = pytest.mark.e2e
FEDERATION = ONE_ACTOR_FEDERATION
ROUNDS = 4
EXTRA = {"hetlora": ["method.prune_gamma=0.5", "method.prune_lambda=1.0"]}  # it prunes in the run


@pytest.fixture(scope="module")
def simulation_state_dir(tmp_path_factory):
    """The node-state folder (``client_app.durable``) of the simulated nodes."""
    return tmp_path_factory.mktemp("simulation-node-state")


@pytest.fixture(scope="module")
def superlink(tmp_path_factory, simulation_state_dir):
    link = LocalSuperLink(tmp_path_factory.mktemp("flwr-home"))
    with pytest.MonkeyPatch.context() as env:  # the processes it starts (the nodes) inherit it
        env.setenv(STATE_DIR_ENV, str(simulation_state_dir))
        link.start()
    yield link
    link.stop()


def _overrides(method):
    return " ".join([*TINY_OVERRIDES, f"federation.num_rounds={ROUNDS}", *EXTRA.get(method, [])])


def _submit(superlink, hub_mirror, output, method):
    line = (
        f"method='{method}' model='tiny_bert' output-dir='{output}' hub-mirror='{hub_mirror}' "
        f"overrides='{_overrides(method)}'"
    )
    return superlink.submit(PROJECT_DIR, [line], FEDERATION)


def _simulation_processes(superlink):
    """The ServerApp processes (``flwr-simulation``) the SuperLink started, with everything under
    them (Ray)."""
    runs = server_apps(superlink.process.pid)
    assert runs and all(p.name() == "flwr-simulation" for p in runs), runs
    return [tree for p in runs for tree in (p, *p.children(recursive=True))]


def _kill_after_checkpoint(superlink, output, round_, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folders = list(output.iterdir()) if output.exists() else []
        if folders and any(int(p.name[6:]) >= round_ for p in round_folders(folders[0])):
            end_processes(_simulation_processes(superlink), signal.SIGKILL, grace=30)
            return folders[0]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of round {round_} within {timeout} s")


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _eval(rows):
    return [{k: v for k, v in r.items() if k.startswith("eval_") and k != "eval_seconds"} for r in rows]


def _server_logs(folder):
    """The run folder's ``debug.log`` cut into one part per ServerApp process that wrote it."""
    parts = re.split(r"^.* server_app\.app: run folder .*$", (folder / "debug.log").read_text(), flags=re.M)
    return parts[1:]


def _logged_rounds(log):
    return [int(n) for n in re.findall(r"server_app\.results: round (\d+) \|", log)]


def _new_nodes(log):
    """The node ids the ServerApp learnt (its "partition per new node" lines)."""
    learnt = re.findall(r"partition per new node: \{(.*)\}", log)
    return {node for line in learnt for node in re.findall(r"(\d+):", line)}


# private client state on the nodes' disks, server state with per-client ranks, a merged base
# (FedIT's stateless resume is covered in process by test_resume.py)
KEEPS_NODE_STATE = {"fedsa_lora", "hetlora"}  # B and the head; the pruned ranks


@pytest.mark.parametrize("method", ["fedsa_lora", "flora", "hetlora"])
def test_a_killed_server_resumes_to_the_uninterrupted_result(
    superlink, simulation_state_dir, hub_mirror, tmp_path, method
):
    whole_id = _submit(superlink, hub_mirror, tmp_path / "whole", method)
    assert superlink.follow(whole_id, timeout=600, stream=False).status == COMPLETED
    (whole,) = (tmp_path / "whole").iterdir()

    killed_id = _submit(superlink, hub_mirror, tmp_path / "killed", method)
    folder = _kill_after_checkpoint(superlink, tmp_path / "killed", 2)
    superlink.flwr("stop", str(killed_id), CONNECTION)  # the SuperLink's record of the dead run
    assert not (folder / "summary.json").exists()
    checkpointed = int(round_folders(folder)[0].name[6:])  # 2, or later had the kill come late
    after_checkpoint = list(range(checkpointed + 1, ROUNDS + 1))
    kept = node_state_of(simulation_state_dir, folder)  # what the killed run's nodes left
    if method in KEEPS_NODE_STATE:
        assert sorted(kept) == [0, 1] and all(checkpointed in rounds for rounds in kept.values()), kept
    else:  # FLoRA's nodes keep nothing of their own: the server resends the merged base
        assert kept == {}, kept

    resumed_id = superlink.submit(
        PROJECT_DIR, [f"resume-from='{folder}' hub-mirror='{hub_mirror}'"], FEDERATION
    )
    outcome = superlink.follow(resumed_id, timeout=600, stream=False)
    assert outcome.status == COMPLETED, outcome
    rows, reference = _rows(folder), _rows(whole)
    # the resumed process (its part of debug.log) continued after the checkpoint: it logged, and
    # recorded as trained by its own nodes, only the rounds after it, a TRAIN message per node
    killed_log, resumed_log = _server_logs(folder)
    assert f"resuming after round {checkpointed} of {ROUNDS}" in resumed_log
    assert _logged_rounds(resumed_log) == after_checkpoint
    killed_nodes, resumed_nodes = _new_nodes(killed_log), _new_nodes(resumed_log)
    assert len(killed_nodes) == len(resumed_nodes) == 2 and not killed_nodes & resumed_nodes
    trained_by = [set(r["bytes_down_per_client"]) for r in rows[1:]]
    assert trained_by == [killed_nodes] * checkpointed + [resumed_nodes] * len(after_checkpoint), trained_by
    # its nodes read the state the killed run's nodes left after the checkpoint's round (kept, not
    # trained again) and went on from it as the uninterrupted run's nodes did
    after = node_state_of(simulation_state_dir, folder)
    uninterrupted_state = node_state_of(simulation_state_dir, whole)
    assert after.keys() == kept.keys()
    for partition, rounds in kept.items():
        assert after[partition][checkpointed] == rounds[checkpointed]
        for round_ in after_checkpoint:
            assert contents(after[partition][round_]) == contents(uninterrupted_state[partition][round_])
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert _eval(rows) == _eval(reference)
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in reference]
    for saved in ("adapter", "model"):
        for file in (whole / saved).glob("*.safetensors"):
            expected, got = load_file(str(file)), load_file(str(folder / saved / file.name))
            assert expected.keys() == got.keys()
            assert all(np.array_equal(expected[k], got[k]) for k in expected), file.name
