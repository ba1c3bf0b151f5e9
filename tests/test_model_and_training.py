"""LoRA state round-trips, seeded init, the saved adapter, and the real local training step."""

import math

import numpy as np
import pytest
import torch
from conftest import adapter_of
from peft import PeftModel

from experiment_schema import TrainConfig
from finetune.data import PartitionedDataset, load_eval_split, load_train_split
from finetune.models import build_base_model, build_model
from finetune.schedule import round_lr
from finetune.state import load_trainable_state, trainable_state
from finetune.tasks import build_task
from finetune.training import local_step_count, train_local


@pytest.fixture
def model(tiny_cfg, hub_mirror):
    return build_model(tiny_cfg, hub_mirror, adapter_of(tiny_cfg))


@pytest.fixture
def client_data(tiny_cfg, hub_mirror):
    task = build_task(tiny_cfg, hub_mirror)
    train = load_train_split(tiny_cfg.dataset, hub_mirror, tiny_cfg.seed)
    part = PartitionedDataset(train, tiny_cfg).partition(1)
    return task.prepare(part, client=1), task


def test_trainable_state_holds_lora_factors_and_head(model, tiny_cfg):
    state = trainable_state(model)
    a_keys = [k for k in state if k.endswith("lora_A.weight")]
    b_keys = [k for k in state if k.endswith("lora_B.weight")]
    assert len(a_keys) == len(b_keys) == 2 * 2  # 2 layers x (query, value)
    assert any("classifier" in k for k in state)
    assert all(state[k].shape[0] == tiny_cfg.method.rank for k in a_keys)
    assert all(not state[k].any() for k in b_keys)  # B starts at zero: BA = 0
    assert all(v.dtype == np.float32 for v in state.values())


def test_state_round_trip_changes_the_model(model):
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 102]])}
    model.eval()
    before = model(**inputs).logits
    state = {k: v + 0.5 for k, v in trainable_state(model).items()}
    load_trainable_state(model, state)
    after = trainable_state(model)
    for key, value in state.items():
        np.testing.assert_array_equal(after[key], value)
    assert not torch.allclose(before, model(**inputs).logits)


def test_lora_init_is_identical_across_processes(tiny_cfg, hub_mirror):
    a = trainable_state(build_model(tiny_cfg, hub_mirror, adapter_of(tiny_cfg)))
    torch.manual_seed(12345)  # whatever the global RNG did before
    b = trainable_state(build_model(tiny_cfg, hub_mirror, adapter_of(tiny_cfg)))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_mismatched_state_is_refused(model):
    state = trainable_state(model)
    with pytest.raises(KeyError, match="missing"):
        load_trainable_state(model, dict(list(state.items())[1:]))
    key = next(iter(state))
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(model, {**state, key: np.zeros((1, 1), np.float32)})


def test_saved_adapter_reloads_with_peft(model, tiny_cfg, hub_mirror, tmp_path):
    load_trainable_state(model, {k: v + 0.1 for k, v in trainable_state(model).items()})
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(build_base_model(tiny_cfg, hub_mirror), tmp_path / "adapter")
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 102]])}
    model.eval()
    reloaded.eval()
    torch.testing.assert_close(model(**inputs).logits, reloaded(**inputs).logits)


def test_local_training_updates_only_trainable_weights(model, client_data):
    data, task = client_data
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable_state(model)
    cfg = TrainConfig(local_steps=3, batch_size=8, lr=1e-2)
    result = train_local(model, data, task.collate, cfg, lr=1e-2, seed=0)
    assert result.steps == 3 and result.examples_seen == 24
    assert math.isfinite(result.loss) and result.peak_memory_mb > 0
    after = trainable_state(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before if "lora_B" in k)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_training_lowers_the_loss_on_its_data(model, client_data):
    data, task = client_data
    start = task.evaluate(model, data, 64)["loss"]
    train_local(model, data, task.collate, TrainConfig(local_steps=30, batch_size=16), lr=3e-2, seed=0)
    assert task.evaluate(model, data, 64)["loss"] < start - 0.01


def test_evaluate_reports_loss_and_metrics(model, tiny_cfg, hub_mirror):
    tiny_cfg.dataset.metrics = ["accuracy", "f1"]
    task = build_task(tiny_cfg, hub_mirror)
    raw = load_eval_split(tiny_cfg.dataset, hub_mirror, 0)
    metrics = task.evaluate(model, task.prepare(raw), 16)
    assert set(metrics) == {"loss", "accuracy", "f1"} and 0 <= metrics["accuracy"] <= 1


def test_local_steps_or_epochs():
    assert local_step_count(TrainConfig(local_steps=7), 1000) == 7
    assert local_step_count(TrainConfig(local_steps=0, local_epochs=2, batch_size=32), 100) == 8


def test_round_lr_schedules():
    cosine = TrainConfig(lr=1.0, lr_schedule="cosine", min_lr_ratio=0.1)
    assert round_lr(cosine, 1, 5) == pytest.approx(1.0)
    assert round_lr(cosine, 3, 5) == pytest.approx(0.55)
    assert round_lr(cosine, 5, 5) == pytest.approx(0.1)
    linear = TrainConfig(lr=1.0, lr_schedule="linear", min_lr_ratio=0.0)
    assert [round_lr(linear, r, 3) for r in (1, 2, 3)] == pytest.approx([1.0, 0.5, 0.0])
    warm = TrainConfig(lr=1.0, lr_schedule="constant", warmup_rounds=3)
    assert [round_lr(warm, r, 10) for r in (1, 2, 3, 4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


# --- base deltas (FLoRA / FedEx-LoRA), full fine-tuning, fresh adapters ----------------------


def _tiny_gpt2():
    """GPT-2 stores its projections as Conv1D (d_in × d_out): peft marks them fan_in_fan_out."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, pad_token_id=0)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS")
    return get_peft_model(GPT2ForSequenceClassification(config), lora), {
        "input_ids": torch.tensor([[1, 5, 7]])
    }


@pytest.mark.parametrize("arch", ["bert (nn.Linear)", "gpt2 (Conv1D)"])
def test_base_delta_in_math_layout_matches_the_lora_product(arch, tiny_cfg, hub_mirror):
    """``W0 + D`` with ``D = s B A`` (d_out × d_in) must act exactly like the adapter itself."""
    from finetune.state import base_weights, lora_base_layers, set_base_deltas

    if arch.startswith("gpt2"):
        model, inputs = _tiny_gpt2()
        layer = next(iter(lora_base_layers(model).values()))
        assert layer.fan_in_fan_out and layer.get_base_layer().weight.shape == (16, 48)  # d_in × d_out
    else:
        model, inputs = (
            build_model(tiny_cfg, hub_mirror, adapter_of(tiny_cfg)),
            {"input_ids": torch.tensor([[101, 2023, 102]])},
        )
    model.eval()
    w0 = base_weights(model)
    state = trainable_state(model)
    rng = np.random.default_rng(0)
    state = {k: rng.normal(size=v.shape).astype(np.float32) if "lora_B" in k else v for k, v in state.items()}
    load_trainable_state(model, state)
    with_adapter = model(**inputs).logits
    deltas = {}
    for prefix, layer in lora_base_layers(model).items():
        s = layer.scaling["default"]
        deltas[prefix] = s * state[prefix + ".lora_B.weight"] @ state[prefix + ".lora_A.weight"]
    load_trainable_state(model, {k: np.zeros_like(v) if "lora_B" in k else v for k, v in state.items()})
    set_base_deltas(model, w0, deltas)
    torch.testing.assert_close(model(**inputs).logits, with_adapter, rtol=1e-4, atol=1e-5)
    set_base_deltas(model, w0, {})  # no deltas: back to the pretrained base exactly
    for prefix, layer in lora_base_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, w0[prefix])


def test_full_fine_tuning_trains_the_targeted_weights_and_head(hub_mirror):
    from conftest import TINY_OVERRIDES

    from experiment_schema import ConfigError, compose_config

    cfg = compose_config({"model": "tiny_bert", "method": "full"}, TINY_OVERRIDES)
    model = build_model(cfg, hub_mirror, adapter_of(cfg))
    assert not isinstance(model, PeftModel)
    state = trainable_state(model)
    assert {k.split(".")[-2] for k in state} == {"query", "value", "classifier"}
    assert len([k for k in state if ".query." in k]) == 2 * 2  # weight + bias in 2 layers
    load_trainable_state(model, {k: v + 1.0 for k, v in state.items()})
    assert all(np.array_equal(trainable_state(model)[k], v + 1.0) for k, v in state.items())
    every_cfg = compose_config(
        {"model": "tiny_bert", "method": "full"}, [*TINY_OVERRIDES, "method.full_scope=all"]
    )
    everything = build_model(every_cfg, hub_mirror, adapter_of(every_cfg))
    assert all(p.requires_grad for p in everything.parameters())
    with pytest.raises(ConfigError, match="nope"):
        nope = compose_config(
            {"model": "tiny_bert", "method": "full"}, [*TINY_OVERRIDES, "model.lora_targets=[nope]"]
        )
        build_model(nope, hub_mirror, adapter_of(nope))


def test_fresh_adapter_is_seeded(model):
    from finetune.models import reinitialize_lora

    load_trainable_state(model, {k: v + 1.0 for k, v in trainable_state(model).items()})
    reinitialize_lora(model, seed=7)
    first = trainable_state(model)
    assert all(not v.any() for k, v in first.items() if "lora_B" in k)
    reinitialize_lora(model, seed=8)
    other = trainable_state(model)
    reinitialize_lora(model, seed=7)
    again = trainable_state(model)
    a_keys = [k for k in first if "lora_A" in k]
    assert all(np.array_equal(first[k], again[k]) for k in a_keys)
    assert all(not np.array_equal(first[k], other[k]) for k in a_keys)
