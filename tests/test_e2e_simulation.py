"""Real processes, a tiny BERT, 2 clients, 2 rounds: `flwr run` on the simulation runtime (the
default experiment's path, a failing config, seeded repeats), and every rule, server optimizer and
modality (images, causal LMs, 4-bit bases) on one warm loopback deployment shared by the module (one
SuperLink and two warm SuperNodes, each run its own ServerApp process; what the simulation would add
per run is Ray and two fresh actors, about 10 s).

The run's outcome is read from its recorded status (``flwr run`` exits 0 even on failure).
"""

import json

import numpy as np
import psutil
import pytest
from conftest import ONE_ACTOR_FEDERATION, TINY_OVERRIDES
from peft import PeftModel
from safetensors.numpy import load_file

from client_app.durable import STATE_DIR_ENV
from experiment_schema import compose_config
from finetune.models import build_base_model, build_model, load_trained_adapter
from finetune.state import lora_base_layers, merged_delta, trainable_state
from launch.cluster import LocalCluster
from launch.simulation import COMPLETED, CONNECTION, PROJECT_DIR, LocalSuperLink
from strategies import RULES, Family

pytestmark = pytest.mark.e2e
FEDERATION = ONE_ACTOR_FEDERATION


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    link = LocalSuperLink(tmp_path_factory.mktemp("flwr-home"))
    link.start()
    pid = link.process.pid
    yield link
    link.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, hub_mirror):
    """A warm 2-node loopback deployment for the module's runs of every rule."""
    with pytest.MonkeyPatch.context() as env:  # the nodes keep their state in the test's folders
        env.setenv(STATE_DIR_ENV, str(tmp_path_factory.mktemp("cluster-node-state")))
        with LocalCluster(tmp_path_factory.mktemp("cluster"), 2, hub_mirror=str(hub_mirror)) as started:
            yield started


def _run_config(hub_mirror, output, overrides, method, groups):
    selected = {"model": "tiny_bert", **groups}
    chosen = " ".join(f"{group}='{option}'" for group, option in selected.items())
    return [
        f"method='{method}' {chosen} output-dir='{output}' hub-mirror='{hub_mirror}' overrides='{overrides}'"
    ]


def _run(superlink, hub_mirror, output, overrides, method="fedit", federation=FEDERATION, **groups):
    run_id = superlink.submit(
        PROJECT_DIR, _run_config(hub_mirror, output, overrides, method, groups), federation
    )
    return superlink.follow(run_id, timeout=420, stream=False)


def _deployed(cluster, hub_mirror, output, overrides, method="fedit", **groups):
    return cluster.run(_run_config(hub_mirror, output, overrides, method, groups), timeout=420, stream=False)


def test_fedit_run_completes_and_records_everything(superlink, hub_mirror, tmp_path):
    outcome = _run(superlink, hub_mirror, tmp_path, " ".join(TINY_OVERRIDES))
    assert outcome.status == COMPLETED, outcome
    # its simulation process was forked from the SuperLink's warm SuperExec (launch/warm_server.py)
    superexec_log = (superlink.flwr_home / "warm-superexec.log").read_text()
    assert "flwr-simulation forked from the zygote" in superexec_log

    (run_dir,) = tmp_path.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients_aggregated"] == 2 and row["clients_rejected"] == {}
        assert row["bytes_down"] > 0 and row["bytes_up"] == row["bytes_down"]
        assert row["train_loss"] > 0 and 0 <= row["eval_accuracy"] <= 1
        assert row["peak_client_memory_mb"] > 0 and row["slowest_client_seconds"] > 0

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert summary["total_bytes_up"] == sum(row["bytes_up"] for row in rows)
    assert "method:" in (run_dir / "config.yaml").read_text()

    # The final adapter is what the server aggregated, and peft loads it.
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and np.abs(v).sum() > 0 for k, v in adapter.items())
    cfg = compose_config({"model": "tiny_bert"}, TINY_OVERRIDES)
    model = PeftModel.from_pretrained(build_base_model(cfg, hub_mirror), run_dir / "adapter")
    assert model.peft_config["default"].r == cfg.method.rank


def test_bad_config_fails_the_run_before_training(superlink, hub_mirror, tmp_path):
    outcome = _run(superlink, hub_mirror, tmp_path, "method.rank=0")
    assert outcome.status == "finished:failed"
    assert list(tmp_path.iterdir()) == []  # failed before any run folder or training
    # the launcher reads the status from the Control API itself, as `flwr list` shows it
    listed = superlink.flwr("list", CONNECTION, "--run-id", str(outcome.run_id), "--format", "json")
    assert json.loads(listed.stdout)["runs"][0]["status"] == superlink.control_status(outcome.run_id)


def test_a_seeded_run_repeats_exactly(superlink, hub_mirror, tmp_path):
    # 2 of 4 clients per round: which ones must follow the seed, not the node ids a start draws.
    federation = FEDERATION.replace("num-supernodes=2", "num-supernodes=4")
    sampled = ["partition.num_clients=4", "federation.fraction_train=0.5"]
    overrides = [o for o in TINY_OVERRIDES if o.split("=")[0] not in {s.split("=")[0] for s in sampled}]
    runs = []
    for attempt in ("first", "second"):
        output = tmp_path / attempt
        outcome = _run(superlink, hub_mirror, output, " ".join([*overrides, *sampled]), federation=federation)
        assert outcome.status == COMPLETED, outcome
        (run_dir,) = output.iterdir()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
        runs.append((rows, adapter))
    (first, first_adapter), (second, second_adapter) = runs
    for key in ("partitions_aggregated", "train_loss", "eval_loss", "eval_accuracy"):
        assert [r.get(key) for r in first] == [r.get(key) for r in second], key
    assert all(len(r["partitions_aggregated"]) == 2 for r in first[1:])
    assert first_adapter.keys() == second_adapter.keys()
    assert all(np.array_equal(first_adapter[k], second_adapter[k]) for k in first_adapter)


@pytest.mark.parametrize("method", sorted(set(RULES) - {"fedit"}))
def test_every_method_runs_two_rounds(cluster, hub_mirror, tmp_path, method):
    outcome = _deployed(cluster, hub_mirror, tmp_path, " ".join(TINY_OVERRIDES), method=method)
    assert outcome.status == COMPLETED, outcome
    (run_dir,) = tmp_path.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    rule = RULES[method]
    if rule.centralized:  # the server trained alone: nothing moved
        assert all(row["clients_aggregated"] == 0 and row["bytes_down"] == 0 for row in rows)
    else:
        assert all(row["clients_aggregated"] == 2 for row in rows[1:])
    if rule.personalised:  # personalised: metrics come from the clients
        assert all(0 <= row["eval_accuracy"] <= 1 for row in rows)
        assert json.loads((run_dir / "summary.json").read_text())["adapter_dir"] is None
        return
    cfg = compose_config({"model": "tiny_bert", "method": method}, TINY_OVERRIDES)
    merges = rule.family == Family.MERGED_BASE
    if rule.family == Family.FULL or merges:  # the result is a whole model, not an adapter
        saved = load_file(str(run_dir / "model" / "model.safetensors"))
        pretrained = build_base_model(cfg, hub_mirror).state_dict()
        queries = [k for k in saved if k.endswith("query.weight")]
        assert queries and all(not np.allclose(saved[k], pretrained[k].numpy()) for k in queries)
        assert all(saved[k].shape == pretrained[k].shape for k in saved)  # LoRA merged away
        if merges:  # each round's update reached the clients as factors or dense
            assert rows[2]["bytes_down"] > rows[1]["bytes_down"]
        return
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    if rule.heterogeneous_ranks:  # client ranks 4 and 8; global factors, unit scale
        rank = rule.server_adapter(cfg).rank
        assert rank == (8 if method == "hetlora" else 12)  # max r_k vs Σ r_k
        assert all(v.shape[0] == rank for k, v in adapter.items() if k.endswith("lora_A.weight"))
        assert any(np.abs(v).sum() > 0 for k, v in adapter.items() if k.endswith("lora_B.weight"))
        sent = {row["bytes_down_per_client"][n] for row in rows[1:] for n in row["bytes_down_per_client"]}
        assert len(sent) >= 2  # two ranks, two payload sizes (HetLoRA may prune)
        return
    adapter_spec = rule.client.default_adapter(cfg)
    init = trainable_state(build_model(cfg, hub_mirror, adapter_spec))
    a_keys = [k for k in init if k.endswith("lora_A.weight")]
    assert set(a_keys) <= set(adapter)  # peft saves the keys of get_peft_model_state_dict
    if method == "fedsvd":  # A re-factored by the server every round: orthonormal rows
        assert all(
            np.allclose(adapter[k] @ adapter[k].T, np.eye(adapter[k].shape[0]), atol=1e-4) for k in a_keys
        )
        assert all(row["bytes_up"] < 0.6 * row["bytes_down"] for row in rows[1:])  # no A goes up
    elif adapter_spec.freeze_lora_a:  # A never moved, on any client, in any round
        assert all(np.array_equal(adapter[k], init[k]) for k in a_keys)
        assert all(row["bytes_up"] < row["bytes_down"] * 1.01 for row in rows[1:])
    elif method == "fed_sb":  # r × r matrices up; A and B once, then R and the head down
        assert rows[0]["bytes_up"] > 0  # the one-off gradient exchange, recorded in round 0
        assert all(row["bytes_up"] < row["bytes_down"] for row in rows[1:2])  # R and the head only
        assert rows[2]["bytes_down"] < rows[1]["bytes_down"]  # A and B were sent once
    else:
        assert any(not np.array_equal(adapter[k], init[k]) for k in a_keys)


@pytest.mark.parametrize("optimizer", ["avgm", "adam", "yogi", "adagrad"])  # issue #20: each one end to end
def test_every_server_optimizer_runs_two_rounds(cluster, hub_mirror, tmp_path, optimizer):
    overrides = [*TINY_OVERRIDES, f"method.server_optimizer={optimizer}", "method.server_lr=0.1"]
    outcome = _deployed(cluster, hub_mirror, tmp_path, " ".join(overrides))
    assert outcome.status == COMPLETED, outcome
    assert "flwr-serverapp forked from the zygote" in (cluster.flwr_home / "warm-superexec.log").read_text()
    (run_dir,) = tmp_path.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients_aggregated"] == 2 and np.isfinite(row["eval_loss"]) for row in rows[1:])
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and np.abs(v).sum() > 0 for k, v in adapter.items())


@pytest.mark.parametrize(
    ("groups", "extra", "metric"),
    [
        ({"model": "tiny_vit", "dataset": "cifar10", "partition": "feature_shift"}, [], "accuracy"),
        (
            {"model": "tiny_llama", "dataset": "gsm8k", "partition": "clusters"},
            ["partition.clusters=4", "dataset.generate_examples=2", "dataset.max_new_tokens=4"],
            "exact_match",
        ),
    ],
    ids=["vit-cifar10-feature-shift", "llama-gsm8k-clusters"],
)
def test_image_and_causal_lm_runs_complete(cluster, hub_mirror, tmp_path, groups, extra, metric):
    outcome = _deployed(cluster, hub_mirror, tmp_path, " ".join([*TINY_OVERRIDES, *extra]), **groups)
    assert outcome.status == COMPLETED, outcome
    (run_dir,) = tmp_path.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients_aggregated"] == 2 and 0 <= row[f"eval_{metric}"] <= 1 for row in rows[1:])
    assert all(row["train_loss"] > 0 and np.isfinite(row["eval_loss"]) for row in rows[1:])
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and np.abs(v).sum() > 0 for k, v in adapter.items())


@pytest.mark.parametrize("method", ["fedit", "flora"])
def test_a_4bit_llama_trains_in_bf16_with_checkpointing(cluster, hub_mirror, tmp_path, method):
    """QLoRA as users run it: an nf4 base, bf16 autocast, activation checkpointing, 2 micro-batches."""
    qlora = [
        "model.quantization=nf4", "model.quant_compute_dtype=bfloat16", "train.precision=bf16",
        "train.gradient_checkpointing=true", "train.grad_accum_steps=2", "dataset.generate_examples=0",
        "dataset.metrics=[loss]", "dataset.main_metric=loss", "dataset.max_eval_examples=16",
        # bitsandbytes' CPU kernels quantize in blocks of 64 inputs
        "model.config_overrides.hidden_size=64", "model.config_overrides.intermediate_size=128",
    ]  # fmt: skip
    groups = {"model": "tiny_llama", "dataset": "gsm8k", "partition": "iid"}
    overrides = " ".join([*TINY_OVERRIDES, *qlora])
    outcome = _deployed(cluster, hub_mirror, tmp_path, overrides, method=method, **groups)
    assert outcome.status == COMPLETED, outcome
    (run_dir,) = tmp_path.iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients_aggregated"] == 2 and np.isfinite(row["eval_loss"]) for row in rows[1:])
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]
    if method == "flora":  # merged into a 4-bit base: the merged delta is saved beside the adapter
        deltas = load_file(str(run_dir / "adapter" / "base_deltas.safetensors"))
        assert deltas and all(np.isfinite(v).all() and np.abs(v).sum() > 0 for v in deltas.values())
        cfg = compose_config({**groups, "method": method}, [*TINY_OVERRIDES, *qlora])
        cfg.hub_mirror = str(hub_mirror)
        model = load_trained_adapter(cfg, run_dir / "adapter", hub_mirror)
        assert {merged_delta(layer) is not None for layer in lora_base_layers(model).values()} == {True}
