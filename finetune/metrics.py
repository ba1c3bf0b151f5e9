"""Task metrics computed from predicted and true labels (numpy only)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    return float((pred == true).mean()) if len(true) else 0.0


def f1(pred: np.ndarray, true: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    tp = int(((pred == 1) & (true == 1)).sum())
    fp = int(((pred == 1) & (true != 1)).sum())
    fn = int(((pred != 1) & (true == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(pred: np.ndarray, true: np.ndarray) -> float:
    """Matthews correlation (multi-class form), as GLUE reports for CoLA."""
    classes = np.union1d(pred, true)
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    for p, t in zip(pred, true, strict=True):
        confusion[index[t], index[p]] += 1
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    n, correct = confusion.sum(), np.trace(confusion)
    cov_tp = correct * n - t_sum @ p_sum
    denom = np.sqrt((n * n - p_sum @ p_sum) * (n * n - t_sum @ t_sum))
    return float(cov_tp / denom) if denom > 0 else 0.0


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
}


def compute_metrics(names: list[str], pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    return {name: METRICS[name](pred, true) for name in names}
