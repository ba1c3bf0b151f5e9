"""Large models on small memory, tested on a tiny Llama on every device this machine has (the CPU
always, CUDA when present; `scripts/gpu-check.sh` runs them on a GPU machine): mixed precision,
activation checkpointing, gradient accumulation, a 4-bit (nf4) or 8-bit frozen base, merged updates
kept exact on a quantized base, and Opacus on a peft model."""

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, adapter_of

from experiment_schema import ConfigError, compose_config
from finetune.models import build_model
from finetune.tasks import build_task

LLAMA = {"model": "tiny_llama", "dataset": "gsm8k", "partition": "iid"}
LLAMA_OVERRIDES = [
    *TINY_OVERRIDES, "dataset.max_eval_examples=16", "dataset.generate_examples=0", "dataset.metrics=[loss]",
    "dataset.main_metric=loss",
]  # fmt: skip
# bitsandbytes' CPU kernels quantize in blocks of 64 inputs: a 4-bit layer needs at least that many
WIDE = ["model.config_overrides.hidden_size=64", "model.config_overrides.intermediate_size=128"]
NO_CUDA = "no CUDA device here: scripts/gpu-check.sh runs this half on a GPU machine"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)),
]


@pytest.fixture(params=DEVICES)
def on(request, monkeypatch) -> torch.device:
    """The device a test runs on; the code under test (the ClientApp included) finds it through
    ``finetune.precision.device()``."""
    monkeypatch.setenv("FEDSUBSPACE_DEVICE", request.param)
    return torch.device(request.param)


def _to(batch, on):
    return {k: v.to(on) for k, v in batch.items()}


def _llama(hub_mirror, *overrides, method="fedit"):
    cfg = compose_config({**LLAMA, "method": method}, [*LLAMA_OVERRIDES, *overrides])
    cfg.hub_mirror = str(hub_mirror)
    return cfg


def _batch(cfg, hub_mirror, size=4):
    from finetune.data import load_train_split

    task = build_task(cfg, hub_mirror)
    data = task.prepare(load_train_split(cfg.dataset, hub_mirror, cfg.seed).select(range(size)))
    return task.collate([data[i] for i in range(size)])


def _grads(model, batch, precision="fp32"):
    from finetune.precision import autocast

    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with autocast(precision, next(model.parameters()).device):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def test_bf16_autocast_matches_fp32_within_tolerance(hub_mirror, on):
    cfg = _llama(hub_mirror, "method.dropout=0")
    model = build_model(cfg, hub_mirror, adapter_of(cfg)).to(on)
    batch = _to(_batch(cfg, hub_mirror), on)
    loss32, _ = _grads(model, batch, "fp32")
    loss16, grads16 = _grads(model, batch, "bf16")
    assert loss16 == pytest.approx(loss32, rel=2e-2)  # bf16 keeps 8 bits of mantissa
    assert all(g.dtype == torch.float32 for g in grads16.values())  # trainable parameters stay float32


def saved_activation_bytes(model, batch):
    """Bytes autograd keeps for the backward pass during one forward of the decoder layers (the
    LM head's logits, which checkpointing does not touch, are left out)."""
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    decoder = model.get_base_model().model  # LlamaModel: embeddings and the decoder layers
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = decoder(input_ids=batch["input_ids"]).last_hidden_state
    hidden.float().pow(2).mean().backward()
    return total[0]


def test_checkpointing_gives_the_same_gradients_with_less_activation_memory(hub_mirror, on):
    plain_cfg = _llama(hub_mirror, "method.dropout=0")
    ckpt_cfg = _llama(hub_mirror, "method.dropout=0", "train.gradient_checkpointing=true")
    plain = build_model(plain_cfg, hub_mirror, adapter_of(plain_cfg)).to(on)
    ckpt = build_model(ckpt_cfg, hub_mirror, adapter_of(ckpt_cfg)).to(on)
    batch = _to(_batch(plain_cfg, hub_mirror), on)
    loss_a, grads_a = _grads(plain, batch)
    loss_b, grads_b = _grads(ckpt, batch)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7)
    plain.train(), ckpt.train()
    assert saved_activation_bytes(ckpt, batch) < 0.7 * saved_activation_bytes(plain, batch)


def test_gradient_accumulation_equals_one_large_batch(hub_mirror):
    from finetune.training import StepPlan, run_steps

    # a classifier: its loss is the mean over examples, so two halves of 4 average to the batch of 8
    cfg = compose_config({"model": "tiny_bert"}, [*TINY_OVERRIDES, "method.dropout=0"])
    cfg.hub_mirror = str(hub_mirror)
    task = build_task(cfg, hub_mirror)
    from finetune.data import load_train_split

    data = task.prepare(load_train_split(cfg.dataset, hub_mirror, cfg.seed).select(range(8)))
    batch = task.collate([data[i] for i in range(8)])
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    results = {}
    for name, batches, micro in (("one batch of 8", [batch], 1), ("2 x 4 accumulated", halves, 2)):
        model = build_model(cfg, hub_mirror, adapter_of(cfg)).eval()  # no dropout anywhere
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        run_steps(model, optimizer, iter(batches), StepPlan(steps=1, micro_batches=micro), 1.0, None)
        results[name] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for key, value in results["one batch of 8"].items():
        torch.testing.assert_close(results["2 x 4 accumulated"][key], value, rtol=1e-4, atol=1e-6)


def test_fp16_loss_scaling_trains(hub_mirror, on):
    from finetune.data import load_train_split
    from finetune.training import train_local

    cfg = _llama(hub_mirror, "train.precision=fp16", "train.local_steps=2")
    model = build_model(cfg, hub_mirror, adapter_of(cfg)).to(on)
    task = build_task(cfg, hub_mirror)
    data = task.prepare(load_train_split(cfg.dataset, hub_mirror, cfg.seed).select(range(16)))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = train_local(model, data, task.collate, cfg.train, lr=1e-2, seed=0)
    assert np.isfinite(result.loss)
    moved = [not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before]
    assert any(moved)  # fp16's scaler may skip an overflowing step, not every step


# --- a quantized frozen base ----------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_base_trains_a_lora_round_and_the_adapter_loads_in_plain_peft(
    quantization, hub_mirror, tmp_path, on
):
    import bitsandbytes as bnb
    from peft import PeftModel
    from test_client_protocol import _context, _global, _message

    from client_app.app import train
    from finetune.models import build_base_model
    from finetune.wire import from_wire

    cfg = _llama(hub_mirror, f"model.quantization={quantization}", "train.precision=bf16", *WIDE)
    init, global_state = _global(cfg, hub_mirror)
    reply = train(_message(cfg, global_state), _context(0))
    upload = from_wire(reply.content.array_records["arrays"])
    assert set(upload) == set(init) and any(not np.array_equal(upload[k], init[k]) for k in upload)
    # the adapter, as the server saves it, on a base quantized the same way in plain peft
    model = build_model(cfg, hub_mirror, adapter_of(cfg), on)
    layer_type = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, layer_type) for m in model.modules())
    from finetune.state import load_trainable_state

    load_trainable_state(model, upload)
    model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(build_base_model(cfg, hub_mirror, on), tmp_path / "adapter").to(on)
    assert all(p.device.type == on.type for p in [*model.parameters(), *plain.parameters()])
    batch = _to(_batch(cfg, hub_mirror), on)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_full_fine_tuning_on_a_quantized_base_is_refused_naming_the_fix():
    for method in ("full", "galore"):
        with pytest.raises(ConfigError, match=r"set model.quantization=none, or train an adapter"):
            compose_config({**LLAMA, "method": method}, ["model.quantization=nf4"])
    with pytest.raises(ConfigError, match="gradient of the base weights"):
        compose_config({**LLAMA, "method": "fed_sb"}, ["model.quantization=nf4"])


@pytest.mark.parametrize("method", ["flora", "fedex_lora"])
def test_merged_updates_stay_exact_on_a_4bit_base(method, hub_mirror, on):
    """Three rounds of the real Strategy and ClientApp: after every round, the base delta each
    client trains on is bit-identical to the server's, and both hold the same 4-bit weights."""
    import bitsandbytes.functional as bnbf
    from fakes import FakeGrid
    from flwr.app import Context, RecordDict
    from test_modalities import HANDLERS

    from client_app.session import _SESSIONS
    from finetune.lora import split_base_deltas
    from finetune.records import from_record, to_record
    from finetune.state import lora_base_layers, merged_delta, trainable_state
    from server_app.loop import exchange
    from strategies import get_rule
    from strategies.protocol import Instruction

    cfg = _llama(hub_mirror, "model.quantization=nf4", *WIDE, method=method)
    if method == "flora":
        cfg.method.client_ranks = [2, 4]
    rule = get_rule(method)
    server = build_model(cfg, hub_mirror, rule.server_adapter(cfg), on)
    strategy = rule.build_strategy(cfg)
    state = strategy.initial_state(trainable_state(server))
    contexts = {
        100 + p: Context(
            run_id=1, node_id=100 + p, node_config={"partition-id": p, "num-partitions": 2},
            state=RecordDict(), run_config={},
        )
        for p in range(2)
    }  # fmt: skip

    def respond(message):
        handler = HANDLERS[message.metadata.message_type]
        return handler(message, contexts[message.metadata.dst_node_id]).content

    grid = FakeGrid(list(contexts), respond)
    for server_round in (1, 2, 3):
        before = split_base_deltas(state)[1]  # the base every client must train on this round
        config = Instruction(cfg.to_json(), server_round=server_round, lr=1e-2).to_config()
        messages = list(strategy.configure_train(server_round, to_record(state), config, grid))
        arrays, _ = strategy.aggregate_train(server_round, exchange(grid, messages, timeout=60))
        assert strategy.rounds[server_round].aggregated == list(contexts), strategy.rounds[
            server_round
        ].rejected
        session = next(s for s in reversed(_SESSIONS.values()) if s.cfg.method.name == method)
        for prefix, layer in lora_base_layers(session.model).items():
            held = merged_delta(layer)
            if held is None:  # round 1: nothing merged yet
                assert not np.any(before[prefix])
                continue
            assert held.dtype == torch.float32  # kept beside the 4-bit weight, never in it
            assert held.device.type == on.type
            np.testing.assert_array_equal(held.cpu().numpy(), before[prefix])  # bit for bit
        state = from_record(arrays)
        assert all(np.abs(d).max() > 0 for d in split_base_deltas(state)[1].values())
    client_layers, server_layers = lora_base_layers(session.model), lora_base_layers(server)
    for prefix in client_layers:
        weights = [layers[prefix].get_base_layer().weight for layers in (client_layers, server_layers)]
        dequantized = [bnbf.dequantize_4bit(w.data, w.quant_state) for w in weights]
        torch.testing.assert_close(dequantized[0], dequantized[1], rtol=0, atol=0)  # the same 4-bit base


def test_dp_step_applies_the_sum_of_clipped_per_sample_gradients_on_a_peft_model(hub_mirror, on):
    """No noise: Opacus's step must be (Σ clip(g_i)) / B, on the very parameters peft trains."""
    from finetune.privacy import PrivateRound, PrivateTraining

    no_dropout = [
        "method.dropout=0", "+model.config_overrides.hidden_dropout_prob=0",
        "+model.config_overrides.attention_probs_dropout_prob=0",
    ]  # fmt: skip
    cfg = compose_config({"model": "tiny_bert", "method": "ffa_lora"}, [*TINY_OVERRIDES, *no_dropout])
    cfg.hub_mirror = str(hub_mirror)
    model = build_model(cfg, hub_mirror, adapter_of(cfg)).to(on)
    task = build_task(cfg, hub_mirror)
    from finetune.data import load_train_split

    data = task.prepare(load_train_split(cfg.dataset, hub_mirror, cfg.seed).select(range(6)))
    rows = [data[i] for i in range(6)]

    def collate(examples):
        return _to(task.collate(examples), on)

    trainable = [p for p in model.parameters() if p.requires_grad]
    clip = 0.01
    # by hand: each example's gradient alone, clipped to `clip` over all trainable parameters
    clipped_sum = [torch.zeros_like(p) for p in trainable]
    model.eval()
    for row in rows:
        model.zero_grad(set_to_none=True)
        model(**collate([row])).loss.backward()
        grads = [p.grad.detach().clone() for p in trainable]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for acc, g in zip(clipped_sum, grads, strict=True):
            acc += factor * g
    model.zero_grad(set_to_none=True)
    model.train()  # Opacus records activations in training mode only (no dropout anywhere here)
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    private = PrivateTraining(model, optimizer, PrivateRound(0.0, clip, 1.0, 1, 1e-5, "rdp"), num_examples=6)
    before = [p.detach().clone() for p in trainable]
    private.module(**collate(rows)).loss.backward()
    private.optimizer.step()
    private.close()
    for p, start, expected in zip(trainable, before, clipped_sum, strict=True):
        torch.testing.assert_close(start - p.detach(), expected / 6, rtol=1e-3, atol=2e-6)  # lr 1, B = 6
    assert any(not torch.equal(start, p) for p, start in zip(trainable, before, strict=True))


def test_dp_refuses_a_model_whose_parameters_the_optimizer_does_not_hold(hub_mirror):
    from finetune.privacy import PrivateRound, PrivateTraining

    cfg = compose_config({"model": "tiny_bert", "method": "fedit"}, TINY_OVERRIDES)
    model = build_model(cfg, hub_mirror, adapter_of(cfg))
    stale = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(RuntimeError, match="other tensors than the model's trainable parameters"):
        PrivateTraining(model, stale, PrivateRound(1.0, 1.0, 0.5, 1, 1e-5, "rdp"), num_examples=4)


def test_the_clients_can_evaluate_the_global_model_instead_of_the_server(hub_mirror, tmp_path):
    from test_modalities import run_in_process

    cfg = compose_config({"model": "tiny_bert"}, [*TINY_OVERRIDES, "evaluation.where=clients"])
    cfg.hub_mirror = str(hub_mirror)
    recorder = run_in_process(cfg, tmp_path)
    assert [row["round"] for row in recorder.rows] == [0, 1, 2]
    assert all(0 <= row["eval_accuracy"] <= 1 and np.isfinite(row["eval_loss"]) for row in recorder.rows)
    reference = compose_config({"model": "tiny_bert"}, TINY_OVERRIDES)
    reference.hub_mirror = str(hub_mirror)
    server_side = run_in_process(reference, tmp_path / "server")
    # the clients' shares together hold (nearly) the validation split: round 0 scores the same model
    assert recorder.rows[0]["eval_loss"] == pytest.approx(server_side.rows[0]["eval_loss"], rel=2e-2)
