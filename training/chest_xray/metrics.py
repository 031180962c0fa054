"""Metrics shared by training and evaluation: Dice, binary-classifier metrics, bootstrap CIs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score, roc_curve


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Return the Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((predicted & truth).sum()) / total


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the score threshold that maximises sensitivity + specificity - 1."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    return float(np.clip(thresholds[int(np.argmax(tpr - fpr))], 0.0, 1.0))


def worst_source_threshold(labels: np.ndarray, scores: np.ndarray, sources: np.ndarray) -> float:
    """Return the threshold that maximises sensitivity + the lowest specificity of any source - 1.

    Every source with negatives counts on its own, so the threshold cannot buy specificity on the
    source the positives came from at the price of another's.
    """
    labels = np.asarray(labels).astype(bool)
    scores, sources = np.asarray(scores), np.asarray(sources)
    candidates = np.unique(scores)
    negatives = [scores[~labels & (sources == s)] for s in np.unique(sources[~labels])]
    positives = scores[labels]
    best, chosen = -np.inf, 0.5
    for threshold in candidates:
        sensitivity = float((positives >= threshold).mean())
        specificity = min(float((group < threshold).mean()) for group in negatives)
        if sensitivity + specificity - 1 > best:
            best, chosen = sensitivity + specificity - 1, float(threshold)
    return chosen


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Return AUROC, accuracy, sensitivity and specificity of ``scores`` at ``threshold``.

    AUROC (and sensitivity or specificity) is NaN when a class is absent.
    """
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) >= threshold
    both = labels.any() and (~labels).any()
    return {
        "auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "accuracy": float((predicted == labels).mean()),
        "sensitivity": float(predicted[labels].mean()) if labels.any() else float("nan"),
        "specificity": float((~predicted[~labels]).mean()) if (~labels).any() else float("nan"),
    }


def bootstrap_ci(
    statistic: Callable[[np.ndarray], dict[str, float]],
    count: int,
    *,
    rounds: int = 1000,
    seed: int = 0,
    strata: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Return the 2.5-97.5 % percentile bootstrap interval of each value ``statistic`` returns.

    ``statistic`` takes an index array into the ``count`` cases; resampling is
    stratified by ``strata`` (e.g. the labels) when given, so every class stays present.
    """
    rng = np.random.default_rng(seed)
    groups = [np.arange(count)] if strata is None else [np.flatnonzero(strata == s) for s in np.unique(strata)]
    draws: dict[str, list[float]] = {}
    for _ in range(rounds):
        index = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        for key, value in statistic(index).items():
            draws.setdefault(key, []).append(value)
    return {
        key: (float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5)))
        for key, values in draws.items()
    }


def with_ci(labels: np.ndarray, scores: np.ndarray, threshold: float, rounds: int = 1000) -> dict[str, dict[str, float]]:
    """Return each binary metric at ``threshold`` as ``{"value", "ci_low", "ci_high"}`` (stratified bootstrap)."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores)
    values = binary_metrics(labels, scores, threshold)
    intervals = bootstrap_ci(lambda i: binary_metrics(labels[i], scores[i], threshold), len(labels), rounds=rounds, strata=labels)
    return {key: {"value": values[key], "ci_low": intervals[key][0], "ci_high": intervals[key][1]} for key in values}


def mean_with_ci(values: np.ndarray, rounds: int = 1000) -> dict[str, float]:
    """Return the mean of ``values`` with its bootstrap 95 % interval as ``{"value", "ci_low", "ci_high"}``."""
    values = np.asarray(values, dtype=float)
    low, high = bootstrap_ci(lambda i: {"mean": float(values[i].mean())}, len(values), rounds=rounds)["mean"]
    return {"value": float(values.mean()), "ci_low": low, "ci_high": high}


def proportion_with_ci(count: int, total: int) -> dict[str, float]:
    """Return ``count / total`` with its exact (Clopper-Pearson) 95 % interval as ``{"value", "ci_low", "ci_high"}``;
    unlike a bootstrap it stays informative at 0 or ``total`` events."""
    if total < 1:
        raise ValueError("A proportion needs at least one case.")
    interval = binomtest(count, total).proportion_ci(confidence_level=0.95, method="exact")
    return {"value": count / total, "ci_low": float(interval.low), "ci_high": float(interval.high)}
