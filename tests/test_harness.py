"""lm-evaluation-harness on the in-memory model, offline: local tasks made here (multiple choice and
generation) scored before and after a round, deterministically; a task whose data is missing fails
before any training, naming the task and the path."""

import json
from pathlib import Path

import pytest

from experiment_schema import ConfigError, compose_config


def write_tasks(folder: Path, missing: bool = False) -> Path:
    """A multiple-choice and a generation task in the harness's format, their data beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": f"{a} plus {b}", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "answer": 0}
        for a in range(1, 7)
        for b in range(1, 5)
    ]
    (folder / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "toy_add.yaml").write_text(
        "task: toy_add\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: add.jsonl\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n'
    )
    (folder / "toy_echo.yaml").write_text(
        "task: toy_echo\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: add.jsonl\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{question}} ="\n'
        'doc_to_target: "{{choices[0]}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 3\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    if missing:
        (folder / "toy_missing.yaml").write_text(
            "task: toy_missing\ndataset_path: nobody/not-mirrored\ndataset_name: main\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n"
        )
    return folder


def tiny_cfg(hub_mirror, tasks_folder, *tasks, overrides=()):
    from conftest import TINY_OVERRIDES

    cfg = compose_config(
        {"model": "tiny_llama", "dataset": "gsm8k", "partition": "iid"},
        [*TINY_OVERRIDES, "dataset.max_eval_examples=8", "dataset.generate_examples=0",
         "dataset.metrics=[loss]", "dataset.main_metric=loss",
         f"evaluation.lm_eval.tasks=[{','.join(tasks)}]", f"evaluation.lm_eval.include={tasks_folder}",
         *overrides],
    )  # fmt: skip
    cfg.hub_mirror = str(hub_mirror)
    return cfg


def test_local_tasks_score_the_in_memory_model_deterministically(hub_mirror, tmp_path):
    from finetune.harness import Harness
    from finetune.models import build_model, load_tokenizer
    from strategies import get_rule

    cfg = tiny_cfg(hub_mirror, write_tasks(tmp_path / "tasks"), "toy_add", "toy_echo")
    model = build_model(cfg, hub_mirror, get_rule("fedit").server_adapter(cfg))
    harness = Harness(cfg, hub_mirror, load_tokenizer(cfg, hub_mirror))
    harness.check()
    first, second = harness.score(model), harness.score(model)
    assert set(first) == {"lm_toy_add_acc", "lm_toy_echo_exact_match"}
    assert first == second
    assert 0 <= first["lm_toy_add_acc"] <= 1


def test_a_round_is_scored_before_and_after_training(hub_mirror, tmp_path):
    from fakes import FakeGrid, real_clients

    from server_app.app import run_experiment
    from server_app.results import RunRecorder

    folder = write_tasks(tmp_path / "tasks")
    rounds = ["federation.num_rounds=1", "evaluation.lm_eval.every=1", "train.lr=5e-2", "save_adapter=false"]
    cfg = tiny_cfg(hub_mirror, folder, "toy_add", overrides=rounds)
    cfg.output_dir = str(tmp_path / "runs")
    recorder = RunRecorder.create(cfg)
    nodes = {100: 0, 101: 1}
    run_experiment(FakeGrid(nodes, real_clients(nodes)), cfg, recorder)
    before, after = (row["eval_lm_toy_add_acc"] for row in recorder.rows)
    assert 0 <= before <= 1 and 0 <= after <= 1
    summary = json.loads((recorder.folder / "summary.json").read_text())
    assert summary["final"]["eval_lm_toy_add_acc"] == after


def test_a_task_whose_data_is_missing_fails_before_training(hub_mirror, tmp_path, monkeypatch):
    from finetune.harness import Harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = tiny_cfg(hub_mirror, write_tasks(tmp_path / "tasks", missing=True), "toy_missing")
    with pytest.raises(ConfigError, match=r"toy_missing.*nobody/not-mirrored.*not in the mirror"):
        Harness(cfg, hub_mirror, None).check()


def test_an_unknown_task_and_a_text_classifier_are_refused(hub_mirror, tmp_path):
    from finetune.harness import Harness

    cfg = tiny_cfg(hub_mirror, write_tasks(tmp_path / "tasks"), "toy_nothing")
    with pytest.raises(ConfigError, match="no harness task named \\['toy_nothing'\\]"):
        Harness(cfg, hub_mirror, None).check()
    with pytest.raises(ConfigError, match="scores causal LMs"):
        compose_config({}, ["evaluation.lm_eval.tasks=[arc_easy]"])


def test_the_shipped_demo_task_loads_from_a_path_relative_to_the_project(hub_mirror, monkeypatch, tmp_path):
    from finetune.harness import Harness

    monkeypatch.chdir(tmp_path)  # not the project: evals/demo is found beside the code
    cfg = tiny_cfg(hub_mirror, "evals/demo", "demo_arith")
    harness = Harness(cfg, hub_mirror, None)
    harness.check()
    assert harness.include is not None and (harness.include / "arith.jsonl").is_file()
