"""Experiment trackers write what they promise, read back with each tool's own reader."""

import json

import pytest
from conftest import TINY_OVERRIDES
from test_modalities import run_in_process

from experiment_schema import compose_config


def _run(tracker, hub_mirror, tmp_path, *extra):
    cfg = compose_config({"model": "tiny_bert"}, [*TINY_OVERRIDES, f"logging.tracker={tracker}", *extra])
    cfg.hub_mirror = str(hub_mirror)
    return run_in_process(cfg, tmp_path)


def test_tensorboard_events_hold_every_round(hub_mirror, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = _run("tensorboard", hub_mirror, tmp_path)
    events = EventAccumulator(str(recorder.folder / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("eval/accuracy")
    assert [e.step for e in accuracy] == [0, 1, 2]
    assert [e.value for e in accuracy] == pytest.approx([r["eval_accuracy"] for r in recorder.rows])
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_file_store_holds_params_metrics_and_the_adapter(hub_mirror, tmp_path):
    from mlflow.tracking import MlflowClient

    recorder = _run("mlflow", hub_mirror, tmp_path, "logging.project=tracked")
    client = MlflowClient(tracking_uri=(recorder.folder / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == recorder.folder.name
    assert run.data.params["method.name"] == "fedit" and run.data.params["train.batch_size"] == "8"
    history = client.get_metric_history(run.info.run_id, "eval_accuracy")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx([r["eval_accuracy"] for r in recorder.rows])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "adapter"} <= artifacts
    saved = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in saved
    summary = json.loads((recorder.folder / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_the_run_folder_keeps_a_debug_log_of_third_party_warnings(tmp_path):
    """In a process of its own: pytest records warnings itself, which would hide what logging does."""
    import subprocess
    import sys

    code = f"""
import logging, warnings
from finetune.logs import add_debug_file, setup_logging
setup_logging()
add_debug_file(__import__("pathlib").Path({str(tmp_path / "debug.log")!r}))
warnings.warn("a library's deprecation", FutureWarning, stacklevel=1)
logging.getLogger("some.library").warning("a library's own warning")
logging.getLogger("strategies.engine").debug("our own detail")
logging.getLogger("strategies.engine").info("our own line")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    text = (tmp_path / "debug.log").read_text()
    for line in ("a library's deprecation", "a library's own warning", "our own detail", "our own line"):
        assert line in text, text
    assert result.stdout.strip().endswith("our own line")  # the console: our INFO lines only
    assert "library" not in result.stdout + result.stderr and "our own detail" not in result.stdout
