"""GaLore as the local optimizer of direct weight averaging ("Why Gradient Subspace?", 2024):
clients fine-tune the full targeted weights with GaLoreAdamW — gradients projected on a rank-r
subspace refreshed every ``update_proj_gap`` steps, so the optimizer state is low-rank — and the
server averages the weights, exactly as ``full`` does."""

from __future__ import annotations

from dataclasses import dataclass

from experiment_schema import choice, require
from finetune.spec import GALORE_PROJ_TYPES, GaLoreSettings
from strategies.full import FullClient, FullConfig, FullFineTuning
from strategies.registry import Family, Rule, register


@dataclass
class GaLoreConfig(FullConfig):
    """The projection rank is ``rank``; the subspace is refreshed every ``galore_update_proj_gap``
    optimizer steps (counted across rounds when ``train.keep_optimizer_state``)."""

    name: str = "galore"
    galore_update_proj_gap: int = 50
    galore_scale: float = 4.0
    galore_proj_type: str = "std"

    def validate(self) -> None:
        super().validate()
        require(self.galore_update_proj_gap >= 1, "method.galore_update_proj_gap must be >= 1")
        require(self.galore_scale > 0, f"method.galore_scale must be > 0, got {self.galore_scale}")
        choice(self.galore_proj_type, GALORE_PROJ_TYPES, "method.galore_proj_type")

    def settings(self) -> GaLoreSettings:
        return GaLoreSettings(
            rank=self.rank,
            update_proj_gap=self.galore_update_proj_gap,
            scale=self.galore_scale,
            proj_type=self.galore_proj_type,
            every_layer=self.full_scope == "all",
        )


class GaLore(FullFineTuning):
    """``full``'s weighted mean; the clients' optimizer is GaLoreAdamW with real projection groups."""

    name = "galore"


class GaLoreClient(FullClient):
    def optimizer(self) -> GaLoreSettings:
        assert isinstance(self.cfg.method, GaLoreConfig)
        return self.cfg.method.settings()


RULE = register(
    Rule(
        "galore",
        Family.FULL,
        "Zhao et al., ICML 2024 (local optimizer of direct weight averaging)",
        GaLoreConfig,
        GaLore,
        GaLoreClient,
    )
)
