"""FedSVD (Lee et al., NeurIPS 2025, 2505.12805; official code seanie12/fed-svd): clients train and
upload only B with A fixed for the round (as FFA-LoRA); the server averages B, then re-factors the
round's update by the SVD of ``B̄ A``: the new A is its top-r right singular vectors (orthonormal
rows), the new B is ``U_r Σ_r``. ``B̄ A`` has rank at most r, so the SVD only re-parametrises:
``s B_new A_new = s B̄ A`` exactly, with ``s = α/r`` untouched. Every ``method.svd_period`` rounds
(default 1, as the code's ``--recalculate-svd-period``); 0 never re-factors (FFA-LoRA with A sent).

Differences from the official code, documented: the code freezes RoBERTa's classification head
(and ``attention.output.dense``); here the head trains and is averaged, as for every other rule.
The code's clients run SGD at lr 0.5; ours run the configured local optimizer (AdamW).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from experiment_schema import MethodConfig, require
from finetune.lora import is_lora_a, lora_layers
from strategies.averaging import finite_inputs, weighted_mean
from strategies.ffa_lora import FFALoRAClient
from strategies.lowrank import compact_svd, factors_from_svd
from strategies.registry import Family, Rule, register
from strategies.rule import ServerRule
from strategies.traffic import Traffic, every_round


@dataclass
class FedSVDConfig(MethodConfig):
    """``svd_period``: re-factor every this many rounds (0: never)."""

    name: str = "fedsvd"
    svd_period: int = 1

    def validate(self) -> None:
        super().validate()
        require(self.svd_period >= 0, f"method.svd_period must be >= 0, got {self.svd_period}")
        require(
            self.server_optimizer == "none" or self.svd_period == 0,
            f"method.server_optimizer={self.server_optimizer} with fedsvd needs method.svd_period=0: the SVD "
            "rotates B's coordinates every period, and the optimizer's moments would mix bases",
        )

    uploads_are_global = False  # clients upload B, the global state holds A too


@finite_inputs
def fedsvd_refactor(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A_new, B_new)``: ``A_new`` the top-r right singular vectors of ``B A`` (orthonormal rows),
    ``B_new = U_r Σ_r``, so that ``B_new A_new = B A`` (rank of ``B A`` ≤ r). Through the QR-compact
    SVD: no dense d_out × d_in matrix."""
    A_new, B_new = factors_from_svd(*compact_svd([B], [A]), A.shape[0], 1.0)
    return A_new, B_new


def uploads(key: str) -> bool:
    """B and the head go up; A is the server's for the round."""
    return not is_lora_a(key)


class FedSVD(ServerRule):
    """FFA-LoRA's mean of B (and the head), then the SVD re-factoring of every LoRA layer."""

    name = "fedsvd"
    streamable = True
    method: FedSVDConfig
    traffic = Traffic(uploads=every_round(uploads))
    rule = staticmethod(weighted_mean)

    def finalize(self, server_round: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        period = self.method.svd_period
        if not period or server_round % period:
            return state
        out = dict(state)
        for a_key, b_key in lora_layers(state).values():
            A, B = fedsvd_refactor(state[a_key], state[b_key])
            out[a_key], out[b_key] = A.astype(np.float32), B.astype(np.float32)
        return out


RULE = register(
    Rule("fedsvd", Family.LORA, "Lee et al., NeurIPS 2025, 2505.12805", FedSVDConfig, FedSVD, FFALoRAClient)
)
