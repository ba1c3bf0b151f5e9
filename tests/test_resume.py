"""Crash-safe runs: checkpoints, resume equals uninterrupted, refusals, and the privacy ledger.

The in-process tests run the real ServerApp ``main`` and ClientApp handlers through a stand-in
Grid; the crash is an exception out of the Grid in round 3, and the resumed run gets new node ids
(as a restarted federation does). Equal results alone would not tell a resume from a silent rerun
from round 0, so the resumed run is also held to training only the rounds after its checkpoint
(the messages it sent, the nodes its records name) and to reading what the nodes kept on disk.
The SIGKILL tests with real processes are in ``test_e2e_resume.py``.
"""

import json
import logging
import shutil

import numpy as np
import pytest
from conftest import TINY_OVERRIDES, contents, node_state_of
from fakes import FakeGrid
from flwr.app import Context, Error, MessageType, RecordDict
from safetensors.numpy import load_file
from test_modalities import HANDLERS

from client_app.durable import RESTORED
from experiment_schema import ConfigError
from server_app.app import main
from server_app.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    round_folders,
    write_checkpoint,
)

ROUNDS = 4
RESUMED_RULES = ["fedit", "fedsa_lora", "flora", "hetlora"]
# HetLoRA prunes within the run (its ranks, on the server and the nodes, must survive the crash)
EXTRA = {"hetlora": ["method.prune_gamma=0.5", "method.prune_lambda=1.0"]}
# rules whose nodes keep state of their own on disk (FedSA-LoRA: B and the head; HetLoRA: its
# pruning); FedIT keeps nothing, FLoRA only the merged base the server resends on a resume
KEEPS_NODE_STATE = {"fedsa_lora", "hetlora"}


class Crash(BaseException):
    """The ServerApp dies (not an error it could handle)."""


def _contexts(first_node_id):
    return {
        first_node_id + p: Context(
            run_id=1, node_id=first_node_id + p, node_config={"partition-id": p, "num-partitions": 2},
            state=RecordDict(), run_config={},
        )
        for p in range(2)
    }  # fmt: skip


def _serve(run_config, first_node_id, crash_in_round=None):
    """Run the ServerApp over two nodes; the Grid (with every message sent) and the nodes' contexts."""
    contexts = _contexts(first_node_id)

    def respond(message):
        config = message.content.config_records.get("config", {})
        if crash_in_round is not None and config.get("server-round") == crash_in_round:
            raise Crash
        handler = HANDLERS[message.metadata.message_type]
        try:
            return handler(message, contexts[message.metadata.dst_node_id]).content
        except Exception as error:  # as Flower replies for a ClientApp that raised
            return Error(code=0, reason=f"{type(error).__name__}: {error}")

    grid = FakeGrid(list(contexts), respond)
    main(grid, Context(1, 0, {}, RecordDict(), run_config))
    return grid, contexts


def _run_config(method, output, hub_mirror, extra=()):
    overrides = [*TINY_OVERRIDES, f"federation.num_rounds={ROUNDS}", *extra]
    return {
        "method": method, "model": "tiny_bert", "overrides": " ".join(overrides),
        "output-dir": str(output), "hub-mirror": str(hub_mirror),
    }  # fmt: skip


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _eval(rows):
    return [{k: v for k, v in row.items() if k.startswith("eval_") and k != "eval_seconds"} for row in rows]


def _result_files(folder):
    saved = [p for p in (folder / "adapter", folder / "model") if p.exists()]
    return {p.name: load_file(str(p)) for d in saved for p in d.glob("*.safetensors")}


def _sent(grid):
    """(message type, server round, node) of every message the ServerApp sent."""
    return [(m.metadata.message_type, _round_of(m), m.metadata.dst_node_id) for m in grid.sent]


def _round_of(message):
    return message.content.config_records["config"].get("server-round")


@pytest.mark.parametrize("method", RESUMED_RULES)
def test_a_resumed_run_equals_the_uninterrupted_one(method, hub_mirror, tmp_path, node_state_dir):
    extra = EXTRA.get(method, [])
    _serve(_run_config(method, tmp_path / "whole", hub_mirror, extra), 100)
    (whole,) = (tmp_path / "whole").iterdir()
    if method == "hetlora":  # ranks fall after the crash point: uploads shrink in rounds 3-4
        ups = [row["bytes_up"] for row in _rows(whole)[1:]]
        assert ups[3] < ups[1], ups

    with pytest.raises(Crash):
        _serve(_run_config(method, tmp_path / "crashed", hub_mirror, extra), 200, crash_in_round=3)
    (crashed,) = (tmp_path / "crashed").iterdir()
    assert [int(p.name[6:]) for p in round_folders(crashed)] == [2, 1]  # keep=2
    assert [row["round"] for row in _rows(crashed)] == [0, 1, 2]
    checkpointed = 2
    kept = node_state_of(node_state_dir, crashed)  # what the nodes left, before the resume
    assert bool(kept) == (method in KEEPS_NODE_STATE)
    assert all(sorted(rounds) == [1, 2] for rounds in kept.values())

    resumed_grid, contexts = _serve({"resume-from": str(crashed), "hub-mirror": str(hub_mirror)}, 300)
    rows, reference = _rows(crashed), _rows(whole)
    # the rounds up to the checkpoint are the crashed run's (its nodes 200, 201); the resumed run
    # (nodes 300, 301) trained those after it, one TRAIN message per sampled node
    trained_by = [sorted(row["bytes_down_per_client"]) for row in rows[1:]]
    expected = [["200", "201"]] * checkpointed + [["300", "301"]] * (ROUNDS - checkpointed)
    assert trained_by == expected, trained_by
    # ... and sent nothing for rounds 0 to 2 (no set-up, no round-0 evaluation, no training)
    sent = _sent(resumed_grid)
    assert {round_ for _, round_, _ in sent} == set(range(checkpointed + 1, ROUNDS + 1)), sent
    trainings = sorted((round_, node) for kind, round_, node in sent if kind == MessageType.TRAIN)
    assert trainings == [(r, n) for r in range(checkpointed + 1, ROUNDS + 1) for n in (300, 301)], sent
    # every node read the state it kept after the checkpoint's round (a rule keeping none: nothing)
    restored = {c.node_config["partition-id"]: c.state[RESTORED]["from-round"] for c in contexts.values()}
    assert restored == {p: checkpointed if kept else -1 for p in (0, 1)}
    after, uninterrupted_state = node_state_of(node_state_dir, crashed), node_state_of(node_state_dir, whole)
    for partition, rounds in kept.items():
        assert sorted(after[partition]) == [2, 3, 4]
        assert after[partition][2] == rounds[2]  # read, not trained again (nor rewritten)
        for round_ in (3, 4):  # the rounds after continue from it as the uninterrupted nodes did
            assert contents(after[partition][round_]) == contents(uninterrupted_state[partition][round_])
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    assert _eval(rows) == _eval(reference)  # bit for bit, every round
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in reference]
    resumed, uninterrupted = _result_files(crashed), _result_files(whole)
    assert resumed.keys() == uninterrupted.keys()
    for name, arrays in uninterrupted.items():
        assert arrays.keys() == resumed[name].keys()
        assert all(np.array_equal(arrays[k], resumed[name][k]) for k in arrays), name
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == ROUNDS
    assert all(row["checkpoint_mb"] > 0 and row["checkpoint_seconds"] >= 0 for row in rows[1:])


def test_a_resume_that_changes_the_experiment_is_refused_naming_the_differences(hub_mirror, tmp_path):
    with pytest.raises(Crash):
        _serve(_run_config("fedit", tmp_path, hub_mirror), 100, crash_in_round=2)
    (folder,) = tmp_path.iterdir()
    before = (folder / "metrics.jsonl").read_text()
    changed = {
        "resume-from": str(folder),
        "hub-mirror": str(hub_mirror),
        "overrides": "method.rank=16 seed=3",
    }
    with pytest.raises(ConfigError, match=r"method\.rank: 8 -> 16; seed: 0 -> 3"):
        _serve(changed, 200)
    assert (folder / "metrics.jsonl").read_text() == before  # nothing lost or rewritten
    # more rounds (and new timeouts) are a continuation, not another experiment
    longer = {**changed, "overrides": f"federation.num_rounds={ROUNDS + 1} federation.round_timeout_s=60"}
    _serve(longer, 300)
    assert [row["round"] for row in _rows(folder)] == list(range(ROUNDS + 2))
    # a finished run continues only with more rounds
    with pytest.raises(ConfigError, match=r"federation\.num_rounds=<more>"):
        _serve({"resume-from": str(folder), "hub-mirror": str(hub_mirror)}, 400)


def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    def checkpoint(round_):
        arrays = {"w": np.full(3, round_, np.float32)}
        return Checkpoint(round_, arrays, {"seed": 0}, "hash", {"m/w": np.zeros(3)}, {"merged": [round_]})

    for round_ in (1, 2, 3):
        write_checkpoint(tmp_path, checkpoint(round_), keep=2)
    assert [p.name for p in round_folders(tmp_path)] == ["round-00003", "round-00002"]
    (tmp_path / "checkpoints" / ".round-00004.partial-1").mkdir()  # a crash mid-write: ignored
    assert latest_checkpoint(tmp_path).round == 3
    newest = tmp_path / "checkpoints" / "round-00003" / "arrays.safetensors"
    newest.write_bytes(newest.read_bytes()[:-4] + b"\0\0\0\0")  # flipped bytes
    with caplog.at_level(logging.WARNING):
        restored = latest_checkpoint(tmp_path)
    assert restored.round == 2 and np.array_equal(restored.arrays["w"], np.full(3, 2, np.float32))
    assert restored.strategy_state == {"merged": [2]}
    assert "round-00003" in caplog.text and "SHA-256" in caplog.text
    shutil.rmtree(tmp_path / "checkpoints" / "round-00002")
    with pytest.raises(CheckpointError, match="every checkpoint"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        latest_checkpoint(tmp_path / "elsewhere")


def test_the_privacy_ledger_composes_over_runs_and_refuses_past_the_budget(
    hub_mirror, tmp_path, node_state_dir
):
    """Two 3-round DP runs on the same data report, after the second, the ε of one 6-round run
    (computed here with Opacus's RDP analysis); a third run that would pass the budget is refused
    on every node, so the run ends naming the refusal."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    from client_app.privacy import LEDGER_DIR

    dp = ["privacy.enabled=true", "privacy.noise_multiplier=1.0", "federation.num_rounds=3"]
    reported = []
    for run in ("first", "second"):
        config = _run_config("ffa_lora", tmp_path / run, hub_mirror, dp)
        config["overrides"] = config["overrides"].replace(f"federation.num_rounds={ROUNDS}", "")
        _serve(config, 100 if run == "first" else 200)
        (folder,) = (tmp_path / run).iterdir()
        reported.append([row["dp_epsilon"] for row in _rows(folder)[1:]])
    sizes = json.loads((folder / "summary.json").read_text())["partition_sizes"]
    orders, steps = RDPAccountant.DEFAULT_ALPHAS, 2  # train.local_steps in TINY_OVERRIDES

    def client_spent(rounds, n):
        rdp = compute_rdp(q=8 / n, noise_multiplier=1.0, steps=rounds * steps, orders=orders)
        return get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0]

    def spent(rounds):  # the largest over the two clients, as the server reports it
        return max(client_spent(rounds, n) for n in sizes)

    assert reported[0] == pytest.approx([spent(1), spent(2), spent(3)], rel=1e-9)
    assert reported[1] == pytest.approx([spent(4), spent(5), spent(6)], rel=1e-9)  # not a fresh start
    ledgers = sorted((node_state_dir / LEDGER_DIR).glob("*.jsonl"))
    assert len(ledgers) == 2 and all(len(p.read_text().splitlines()) == 6 for p in ledgers)  # readable lines

    # a budget both clients' seventh round would pass
    least = min(client_spent(6, n) for n in sizes)
    budget = [*dp, f"privacy.target_epsilon={least + 1e-3}", "privacy.calibrate_noise=false"]
    config = _run_config("ffa_lora", tmp_path / "third", hub_mirror, budget)
    config["overrides"] = config["overrides"].replace(f"federation.num_rounds={ROUNDS}", "")
    with pytest.raises(RuntimeError, match=r"every node .* refused .*PrivacyBudgetExhausted: privacy budget"):
        _serve(config, 300)
    (refused,) = (tmp_path / "third").iterdir()
    assert "PrivacyBudgetExhausted" in (refused / "error.txt").read_text()
    assert all(len(p.read_text().splitlines()) == 6 for p in ledgers)  # a refused round spends nothing
