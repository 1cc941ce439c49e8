"""The gate: coefficients w = g * alpha, one beta sample per step, scopes, granularity, eval."""
import pytest
import torch

from backbone.gate import AdapterGate, GumbelGate
from utils.gumbel_utils import sparsemax


def gate_with(tasks, cls=GumbelGate, **kw):
    g = cls(4, **kw)
    for t in range(tasks):
        g.current = None
        g.add_task(t, 1.0)
    return g


def test_sdlora_gate_is_alpha():
    g = gate_with(3, AdapterGate)
    w, beta = g.coefficients()
    assert beta is None and w.shape == (1, 3)
    torch.testing.assert_close(w, torch.ones(1, 3))


def test_one_sample_per_step_shared_and_eval_deterministic():
    g = gate_with(3)
    g.tau = 5.0
    w1, b1 = g.coefficients()
    w2, b2 = g.coefficients()
    assert b1.shape == (1, 3)                 # one row: shared by every block
    assert not torch.equal(b1, b2)            # a fresh Gumbel sample per call (per step)
    with torch.no_grad():
        g.logits["0"].fill_(1.0)
    g.eval()
    g.tau_eval.fill_(0.5)
    _, e1 = g.coefficients()
    _, e2 = g.coefficients()
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, sparsemax(torch.tensor([[1.0, 0.0, 0.0]]) / 0.5))


def test_layer_granularity_gives_a_row_per_block():
    g = gate_with(2, granularity="layer")
    w, beta = g.coefficients()
    assert w.shape == (4, 2) and beta.shape == (4, 2)


def test_scope_previous_does_not_gate_the_current_adapter():
    g = gate_with(3, scope="previous")
    with torch.no_grad():
        g.alpha["2"].fill_(0.3)
    w, beta = g.coefficients()
    assert beta.shape == (1, 2)
    assert w.shape == (1, 3)
    assert w[0, 2].item() == pytest.approx(0.3)  # g_t = 1: just alpha_t


def test_pruned_adapters_leave_the_projection():
    g = gate_with(4)
    g.prune([1])
    w, beta = g.coefficients()
    assert g.gated_tasks() == [0, 2, 3]
    assert beta.shape == (1, 3)
    torch.testing.assert_close(beta.sum(), torch.tensor(1.0))
