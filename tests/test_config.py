"""One typed schema composed by Hydra; bad configs fail before training with a clear message."""

import pytest

from experiment_schema import ConfigError, ExperimentConfig, available_choices, compose_config
from server_app.run_config import experiment_from_run_config


def test_default_experiment():
    cfg = compose_config()
    assert (cfg.method.name, cfg.model.name, cfg.dataset.name, cfg.partition.name) == (
        "fedit",
        "minilm",
        "sst2",
        "dirichlet",
    )
    assert cfg.partition.num_clients == 10 and cfg.partition.alpha == 0.5


def test_groups_and_overrides_compose():
    cfg = compose_config({"dataset": "mrpc", "partition": "iid"}, "method.rank=16 federation.num_rounds=3")
    assert cfg.dataset.text_fields == ["sentence1", "sentence2"]
    assert cfg.dataset.main_metric == "f1"
    assert cfg.method.rank == 16 and cfg.federation.num_rounds == 3


def test_json_round_trip_is_lossless():
    cfg = compose_config({"model": "tiny_bert"}, "train.lr=0.01")
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg


# Options that only make sense beside another modality's groups.
INSTRUCTION_DATASETS = ("alpaca_gpt4", "fingpt_sentiment", "medical_flashcards", "code_alpaca")
COMPANIONS = {
    "efficientnet_lite0": {"dataset": "cifar10"},
    "vit_base": {"dataset": "cifar10"},
    "tiny_vit": {"dataset": "mnist"},
    "cifar10": {"model": "efficientnet_lite0"},
    "mnist": {"model": "tiny_vit"},
    "smollm2": {"dataset": "gsm8k", "partition": "clusters"},
    "llama_3_2_1b": {"dataset": "gsm8k", "partition": "clusters"},
    "tiny_llama": {"dataset": "gsm8k", "partition": "iid"},
    "gsm8k": {"model": "smollm2", "partition": "clusters"},
    **{key: {"model": "smollm2", "partition": "iid"} for key in INSTRUCTION_DATASETS},
    "feature_shift": {"dataset": "cifar10", "model": "tiny_vit"},
}


def test_every_shipped_option_composes():
    for group in ("method", "model", "dataset", "partition", "recipe"):
        for option in available_choices(group):
            compose_config({**COMPANIONS.get(option, {}), group: option})


@pytest.mark.parametrize(
    ("selections", "overrides", "message"),
    [
        (
            {"method": "nope"},
            "",
            "unknown method 'nope'; valid choices: ['centralized', 'fed_sb', 'fedex_lora'",
        ),
        (
            {"dataset": "imagenet"},
            "",
            "valid choices: ['alpaca_gpt4', 'cifar10', 'code_alpaca', 'cola', 'fingpt_sentiment', 'gsm8k',",
        ),
        ({}, "method.rank=0", "method.rank must be >= 1"),
        ({"model": "efficientnet_lite0"}, "", "model.builder='efficientnet_lite0' is an image classifier"),
        ({"dataset": "gsm8k"}, "", "partition.name='dirichlet' splits by a field, and 'gsm8k' has no labels"),
        (
            {"dataset": "sst2"},
            "partition.feature_shift=[sepia]",
            "partition.feature_shift entry='sepia' is not valid",
        ),
        ({}, "train.lr=-0.1", "train.lr must be > 0"),
        ({}, "dataset.max_train_examples=5", "fewer than partition.num_clients=10"),
        ({}, "partition.num_clients=0", "partition.num_clients must be >= 1"),
        ({}, "federation.fraction_train=1.5", "federation.fraction_train"),
        ({}, "method.weighting=median", "method.weighting='median' is not valid"),
        ({}, "dataset.main_metric=f1", "must be one of dataset.metrics"),
        ({}, "train.lr=fast", "train.lr"),
        ({}, "method.rnak=4", "rnak"),
        ({"partition": "pathological"}, "partition.classes_per_client=3", "exceeds dataset.num_labels=2"),
    ],
)
def test_bad_config_names_the_problem(selections, overrides, message):
    with pytest.raises(ConfigError, match=None) as error:
        compose_config(selections, overrides)
    assert message in str(error.value)


def test_run_config_selects_groups_and_paths(tmp_path):
    cfg = experiment_from_run_config(
        {
            "method": "fedit",
            "dataset": "rte",
            "overrides": "federation.num_rounds=2",
            "output-dir": str(tmp_path),
            "hub-mirror": str(tmp_path),
        }
    )
    assert cfg.dataset.name == "rte" and cfg.federation.num_rounds == 2
    assert cfg.output_dir == str(tmp_path) and cfg.hub_mirror == str(tmp_path)


def test_run_config_refuses_unknown_keys_and_relative_output():
    with pytest.raises(ConfigError, match="unknown run-config keys"):
        experiment_from_run_config({"num-server-rounds": 3})
    with pytest.raises(ConfigError, match="absolute"):
        experiment_from_run_config({"output-dir": "runs"})
