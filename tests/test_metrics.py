"""Metric formulas on a hand-made accuracy matrix."""
import pytest
import torch

from utils.metrics import average_incremental, forgetting, summarize, topk_correct

ACC = [[90.0], [80.0, 70.0], [60.0, 75.0, 50.0]]


def test_forgetting_by_hand():
    # task 0: max(90, 80) - 60 = 30; task 1: max(70) - 75 = -5  -> mean 12.5
    assert forgetting(ACC) == pytest.approx(12.5)
    assert forgetting([[50.0]]) == 0.0


def test_summary():
    s = summarize(ACC, [90.0, 76.0, 61.0])
    assert s == {"A_last": 61.0, "A_avg": pytest.approx(75.6666667), "forgetting": pytest.approx(12.5)}
    assert average_incremental([]) == 0.0


def test_topk():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05]])
    assert topk_correct(logits, torch.tensor([1, 2]), 1) == 1
    assert topk_correct(logits, torch.tensor([1, 2]), 2) == 1
    assert topk_correct(logits, torch.tensor([1, 2]), 5) == 2
