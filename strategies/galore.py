"""GaLore as the local optimizer of direct weight averaging ("Why Gradient Subspace?", 2024):
clients fine-tune the full targeted weights with GaLoreAdamW — gradients projected on a rank-r
subspace refreshed every ``update_proj_gap`` steps, so the optimizer state is low-rank — and the
server averages the weights, exactly as ``full`` does."""

from __future__ import annotations

from strategies.full import FullFineTuning


class GaLore(FullFineTuning):
    """``full``'s weighted mean; the clients' optimizer is GaLoreAdamW with real projection groups."""

    name = "galore"
    local_optimizer = "galore"
