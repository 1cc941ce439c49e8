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


def test_train_log_shows_the_newest_row_past_ten_tasks_and_the_whole_matrix_at_the_end(tmp_path, caplog):
    import logging

    from utils.run_metrics import WHOLE_MATRIX_TASKS, RunMetrics

    book = RunMetrics(tmp_path)
    book.tasks_planned = WHOLE_MATRIX_TASKS + 3
    sizes = []
    for t in range(book.tasks_planned):
        res = {"per_task": [float(t)] * (t + 1), "total": 1.0, "old": None, "new": 1.0, "top5": 1.0, "grouped": {}}
        book.record(res, None, 0, 1.0, 1, 1.0, None)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cl"):
            book.log_task(res, None, t)
        text = "\n".join(r.getMessage() for r in caplog.records if "Accuracy matrix" in r.getMessage())
        sizes.append(len(text.splitlines()) - 1)  # matrix rows in the log line
    assert sizes == list(range(1, WHOLE_MATRIX_TASKS + 1)) + [1, 1, WHOLE_MATRIX_TASKS + 3]
