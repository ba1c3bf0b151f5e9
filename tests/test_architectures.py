"""Real architectures without their weights: each LLM model config's published shapes build, on
the meta device (no memory), the model with its published parameter count."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from experiment_schema import ConfigError, compose_config
from finetune.models import _model_config

# Parameters of each checkpoint as the Hub lists them (its safetensors' total; the model cards
# round them to 1.24 B, 3.21 B, 8.03 B, 0.49 B, 1.54 B, 7.61 B and 7.25 B).
PUBLISHED = {
    "llama_3_2_1b": 1_235_814_400,
    "llama_3_2_3b": 3_212_749_824,
    "llama_3_1_8b": 8_030_261_248,
    "qwen2_5_0_5b": 494_032_768,
    "qwen2_5_1_5b": 1_543_714_304,
    "qwen2_5_7b": 7_615_616_512,
    "mistral_7b": 7_248_023_552,
}


def random_llm(name: str, *overrides: str):
    selections = {"model": name, "dataset": "gsm8k", "partition": "iid"}
    return compose_config(selections, ["model.weights=random", *overrides])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_random_weights_option_builds_the_published_shapes(name):
    cfg = random_llm(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_model_config(cfg, None))
    count = sum(p.numel() for p in model.parameters())
    assert count == PUBLISHED[name]


def test_the_architecture_is_resized_by_config_overrides():
    cfg = random_llm("llama_3_2_1b", "+model.config_overrides.num_hidden_layers=2")
    assert _model_config(cfg, None).num_hidden_layers == 2


def test_an_architecture_without_its_model_type_is_refused():
    with pytest.raises(ConfigError, match="model_type"):
        compose_config({"model": "llama_3_2_1b"}, ["model.weights=random", "~model.architecture.model_type"])


def test_the_report_refuses_random_weight_runs(tmp_path):
    from benchmarks.report import write_report

    record = {"job": "fedit-gsm8k-iid-s0", "weights": "random", "method": "fedit", "dataset": "gsm8k"}
    with pytest.raises(ValueError, match="refuses 1 run"):
        write_report([record], tmp_path, "llm", parallel=1)


def test_a_random_weight_run_says_so_in_its_record(tmp_path):
    import json

    from benchmarks.results import run_record

    (tmp_path / "summary.json").write_text(json.dumps({
        "status": "completed", "method": "fedit", "model": "llama_3_2_1b", "weights": "random",
        "dataset": "gsm8k", "partition": "iid", "main_metric": "exact_match", "num_clients": 2,
        "wall_seconds": 1.0,
    }))  # fmt: skip
    (tmp_path / "config.yaml").write_text("train: {local_steps: 1, lr: 0.1}\nmethod: {}\n")
    (tmp_path / "metrics.jsonl").write_text("")
    record = run_record(tmp_path, "fedit-gsm8k-iid-s0", 0)
    assert record is not None and record["weights"] == "random"
