"""The FlowerTune recipes compose and validate, with the leaderboard's rules enforced; their
harness tasks exist, and offline the ones whose data is not mirrored fail before training."""

import pytest

from experiment_schema import ConfigError, available_choices, compose_config

RECIPES = available_choices("recipe")


def test_there_is_a_flowertune_recipe_per_challenge():
    assert [f"flowertune_{d}" for d in ("code", "finance", "general_nlp", "medical")] == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_composes_the_leaderboards_template(recipe):
    cfg = compose_config({"recipe": recipe})
    assert (cfg.model.name, cfg.model.quantization, cfg.method.rank, cfg.method.alpha) == (
        "mistral_7b",
        "nf4",
        32,
        64,
    )
    assert (cfg.partition.num_clients, cfg.federation.num_rounds, cfg.model.max_length) == (20, 200, 512)
    assert (cfg.train.local_steps, cfg.train.batch_size, cfg.train.lr) == (10, 16, 5e-5)
    assert cfg.federation.max_communication_mb == 200_000 and cfg.evaluation.lm_eval.tasks
    assert cfg.evaluation.lm_eval.average == recipe


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("partition.num_clients=10", "exactly 20 SuperNodes"),
        ("federation.max_communication_mb=300000", "200,000 MB"),
        ("federation.max_communication_mb=0", "200,000 MB"),
    ],
)
def test_the_leaderboards_rules_are_enforced(override, named):
    with pytest.raises(ConfigError, match=named):
        compose_config({"recipe": "flowertune_medical"}, [override])


def test_every_recipe_task_is_a_harness_task():
    from finetune.harness import Harness

    for recipe in RECIPES:
        harness = Harness(compose_config({"recipe": recipe}), None, None)
        missing = [t for t in harness.settings.tasks if t not in harness.task_manager.all_tasks]
        assert not missing, (recipe, missing)


def test_offline_a_recipe_whose_benchmark_is_not_mirrored_fails_before_training(hub_mirror, monkeypatch):
    from finetune.harness import Harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = compose_config({"recipe": "flowertune_finance"})
    with pytest.raises(ConfigError, match=r"flowertune_fpb.*takala/financial_phrasebank.*not in the mirror"):
        Harness(cfg, hub_mirror, None).check()
