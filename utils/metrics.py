"""Continual-learning metrics from an accuracy matrix (SPEC section 5). Pure math."""
from __future__ import annotations

import numpy as np


def forgetting(acc: list[list[float]]) -> float:
    """Mean over tasks j < T-1 of max_{t < T-1} a[t][j] - a[T-1][j]; 0.0 with a single task.

    ``acc`` is ragged: row t holds the accuracy on tasks 0..t after training task t.
    """
    last = len(acc) - 1
    if last < 1:
        return 0.0
    drops = [max(acc[t][j] for t in range(j, last)) - acc[last][j] for j in range(last)]
    return float(np.mean(drops))


def average_incremental(curve: list[float]) -> float:
    """A_avg: the mean of the accuracy curve A_t over the tasks seen so far."""
    return float(np.mean(curve)) if curve else 0.0


def topk_correct(logits, targets, k: int) -> int:
    """How many rows have their target among the top-k logits (k clipped to the class count)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return int((top == targets[:, None]).any(dim=1).sum())


def summarize(acc: list[list[float]], curve: list[float]) -> dict:
    """The scalar summaries that go with the accuracy matrix."""
    return {
        "A_last": float(curve[-1]) if curve else 0.0,
        "A_avg": average_incremental(curve),
        "forgetting": forgetting(acc),
    }
