"""Adapter math (SPEC section 2) against a brute-force computation, for every strategy."""
import math

import pytest
import torch
from torch import nn

from backbone.gate import AdapterGate, GumbelGate
from backbone.lora import LoRAQKV, _DeltaLinear, adapter_norm
from backbone.lora_autograd import FusedLowRank
from backbone.vit import LoRAViT, create_vit

D = 12


def make_layer(targets=("q", "v"), norm="factors", strategy="stacked", ranks=(3, 2, 4), seed=0):
    torch.manual_seed(seed)
    layer = LoRAQKV(nn.Linear(D, 3 * D), targets, norm, strategy)
    for t, r in enumerate(ranks):
        layer.add_adapter(t, r)
        with torch.no_grad():
            layer.lora_B[str(t)].normal_()
    return layer


def brute_force(layer, x, coeff, frozen, current):
    """y = W x + b + sum_i w_i B_i A_i x on each target slice, with d x d products formed explicitly."""
    y = x @ layer.base.weight.T + layer.base.bias
    y = y.clone()
    tasks = list(frozen) + ([current] if current is not None else [])
    for j, t in enumerate(tasks):
        A, B = layer.lora_A[str(t)].detach().double(), layer.lora_B[str(t)].detach().double()
        for p, name in enumerate(layer.targets):
            delta = B[p] @ A[p]
            if t != current:
                if layer.direction_norm == "factors":
                    n = torch.linalg.norm(A[p]) * torch.linalg.norm(B[p])
                else:
                    n = torch.linalg.norm(delta)
                w = coeff[j] / n if n > 0 else 0.0
            else:
                w = coeff[j]
            o = "qkv".index(name) * D
            y[:, o:o + D] += (w * (x.double() @ delta.T)).to(y.dtype)
    return y


@pytest.mark.parametrize("norm", ["factors", "frobenius"])
@pytest.mark.parametrize("strategy", ["stacked", "merged", "fused", "loop"])
@pytest.mark.parametrize("targets", [("q", "v"), ("k",), ("q", "k", "v")])
def test_adapter_sum_matches_brute_force(norm, strategy, targets):
    layer = make_layer(targets, norm, strategy)
    layer.configure(frozen=[0, 1], current=2)
    x = torch.randn(5, D)
    coeff = torch.tensor([0.7, -1.3, 0.4])
    layer.coeff = coeff
    want = brute_force(layer, x, coeff, [0, 1], 2)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["stacked", "merged", "fused", "loop"])
def test_pruned_adapter_is_skipped(strategy):
    layer = make_layer(strategy=strategy)
    layer.configure(frozen=[0, 2], current=None)  # adapter 1 pruned
    layer.coeff = torch.tensor([0.5, 2.0])
    x = torch.randn(4, D)
    want = brute_force(layer, x, layer.coeff, [0, 2], None)
    with torch.no_grad():
        layer.lora_A["1"].fill_(float("nan"))
        layer.lora_B["1"].fill_(float("nan"))
    layer.configure(frozen=[0, 2], current=None)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    # and a NaN in an active adapter does show: the test above could fail
    with torch.no_grad():
        layer.lora_A["0"].fill_(float("nan"))
    layer.configure(frozen=[0, 2], current=None)
    assert torch.isnan(layer(x)).any()


def test_frobenius_norm_from_gram_matches_explicit():
    A, B = torch.randn(2, 5, 30, dtype=torch.float64), torch.randn(2, 30, 5, dtype=torch.float64)
    want = torch.stack([torch.linalg.norm(B[p] @ A[p]) for p in range(2)])
    torch.testing.assert_close(adapter_norm(A, B, "frobenius"), want)
    want_f = torch.stack([torch.linalg.norm(A[p]) * torch.linalg.norm(B[p]) for p in range(2)])
    torch.testing.assert_close(adapter_norm(A, B, "factors"), want_f)


def test_new_adapter_init():
    layer = make_layer(ranks=(10,))
    layer.add_adapter(1, 10)
    A, B = layer.lora_A["1"], layer.lora_B["1"]
    assert A.shape == (2, 10, D) and B.shape == (2, D, 10)
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(D)  # kaiming_uniform(a=sqrt(5)) on fan_in D
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound


def test_delta_linear_gradcheck():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    delta = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d: _DeltaLinear.apply(x, w, b, d, (0, 8)), (x, delta))


def tiny_vit(strategy, gate):
    torch.manual_seed(1)
    vit = create_vit("vit_tiny_patch16_224", False, None, 32, dict(patch_size=8, depth=2, embed_dim=48, num_heads=3))
    return LoRAViT(vit, gate, ("q", "v"), "factors", strategy)


def three_task_model(strategy, gate):
    m = tiny_vit(strategy, gate)
    for t in range(3):
        m.add_task(t, 3, 0.8)
        with torch.no_grad():
            for layer in m.layers:
                layer.lora_B[str(t)].normal_(std=0.1)
        m.configure()
        if t < 2:
            m.freeze_current()
    return m


@pytest.mark.parametrize("strategy", ["stacked", "merged", "fused", "loop"])
def test_merged_eval_equals_unmerged_and_grads_reach_exactly_trainables(strategy):
    m = three_task_model(strategy, AdapterGate(2))
    x = torch.randn(2, 3, 32, 32)
    m.train()
    y_train = m(x)
    y_train.square().sum().backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {f"vit.blocks.{i}.attn.qkv.lora_{ab}.2" for i in range(2) for ab in "AB"}
    expected |= {f"gate.alpha.{t}" for t in range(3)}
    assert trainable == expected
    assert with_grad == expected
    m.eval()
    with torch.no_grad():
        y_eval = m(x)
    assert all(layer._merged is not None for layer in m.layers)
    torch.testing.assert_close(y_eval, y_train.detach(), rtol=1e-5, atol=1e-5)
    m.train()
    assert all(layer._merged is None for layer in m.layers)


def test_strategies_agree_on_outputs_and_gradients():
    results = {}
    for s in ("loop", "stacked", "merged", "fused", "auto"):
        gate = GumbelGate(2)
        m = three_task_model(s, gate)
        with torch.no_grad():
            for k in gate.logits:
                gate.logits[k].fill_(float(k))
        gate.noise, gate.tau = False, 1.0
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        y = m(x)
        y.square().sum().backward()
        results[s] = (y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    ref_y, ref_g = results["loop"]
    for s, (y, g) in results.items():
        torch.testing.assert_close(y, ref_y, rtol=1e-4, atol=1e-5)
        assert g.keys() == ref_g.keys()
        for n in g:
            torch.testing.assert_close(g[n], ref_g[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [3, 10])  # total rank 9 (3R < d = 48: from X and dY) and 30 (through dY^T X)
def test_fused_gradients_equal_the_merged_path_at_1e_6(rank):
    """The step's new backward against the one it replaced, in float64: every gradient within 1e-6."""
    grads = {}
    for s in ("merged", "fused"):
        m = tiny_vit(s, AdapterGate(2)).double()
        for t in range(3):
            m.add_task(t, rank, 0.8)
            with torch.no_grad():
                for layer in m.layers:
                    layer.lora_B[str(t)].normal_(std=0.1, generator=torch.Generator().manual_seed(t))
            m.configure()
            if t < 2:
                m.freeze_current()
        m.train()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        m(x).square().sum().backward()
        grads[s] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads["fused"].keys() == grads["merged"].keys() and len(grads["fused"]) == 4 + 3
    for n, g in grads["merged"].items():
        torch.testing.assert_close(grads["fused"][n], g, rtol=1e-6, atol=1e-9)


def test_frozen_backbone_is_shared_not_copied():
    m = three_task_model("auto", AdapterGate(2))
    n_backbone = sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n and "gate" not in n)
    n_plain = sum(p.numel() for p in create_vit("vit_tiny_patch16_224", False, None, 32,
                                                 dict(patch_size=8, depth=2, embed_dim=48, num_heads=3)).parameters())
    assert n_backbone == n_plain
    assert all(not p.requires_grad for n, p in m.named_parameters() if "lora_" not in n and "gate" not in n)


@pytest.mark.parametrize("strategy", ["stacked", "merged", "fused", "loop"])
def test_untrained_frozen_adapter_adds_zero_not_nan(strategy):
    layer = make_layer(strategy=strategy)
    with torch.no_grad():
        layer.lora_B["1"].zero_()
    layer.configure(frozen=[0, 1], current=None)
    layer.coeff = torch.tensor([0.5, 2.0])
    x = torch.randn(3, D)
    want = brute_force(layer, x, torch.tensor([0.5, 0.0]), [0, 1], None)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_frozen_adapters_are_stored_once():
    layer = make_layer()
    layer.configure(frozen=[0, 1, 2], current=None)
    stack = layer._A_old.untyped_storage().data_ptr()
    assert all(layer.lora_A[k].untyped_storage().data_ptr() == stack for k in "012")
    layer.configure(frozen=[0, 2], current=None)  # adapter 1 pruned: it no longer pins the old stack
    assert layer.lora_A["1"].untyped_storage().data_ptr() != layer._A_old.untyped_storage().data_ptr()
    x = torch.randn(3, D)
    layer.coeff = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(layer(x), brute_force(layer, x, layer.coeff, [0, 2], None), rtol=1e-5, atol=1e-5)


def test_auto_strategy():
    from backbone.lora import auto_strategy
    assert auto_strategy(cuda=False) == "fused" and auto_strategy(cuda=True) == "merged"  # H200 measurement


@pytest.mark.parametrize("rank, first", [(3, 1), (3, 0), (20, 12), (20, 20)])  # 3R < d: from X and dY; else dY^T X
def test_fused_low_rank_gradcheck_and_frozen_rows_get_no_factor_gradient(rank, first):
    d = 8
    g = torch.Generator().manual_seed(rank + first)
    x = torch.randn(6, d, dtype=torch.float64, generator=g, requires_grad=True)
    w, b = torch.randn(3 * d, d, dtype=torch.float64, generator=g), torch.randn(3 * d, dtype=torch.float64, generator=g)
    A, B = torch.randn(2, rank, d, dtype=torch.float64, generator=g), \
        torch.randn(2, d, rank, dtype=torch.float64, generator=g)
    s = torch.randn(2, rank, dtype=torch.float64, generator=g)
    A.requires_grad_(), B.requires_grad_(), s.requires_grad_()
    # rows before ``first``: the frozen stack (no gradient); from it on: the current adapter (None: there is none)
    A_old, B_old = A[:, :first].detach(), B[..., :first].detach()
    A_cur, B_cur = (A[:, first:], B[..., first:]) if first < rank else (None, None)
    y = FusedLowRank.apply(x, w, b, A_old, B_old, A_cur, B_cur, s, (0, 2 * d))
    want = x @ w.t() + b
    for p, o in enumerate((0, 2 * d)):
        want = torch.cat([want[:, :o], want[:, o:o + d] + x @ (B[p] * s[p] @ A[p]).t(), want[:, o + d:]], 1)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    wa, wb, ws, wx = torch.autograd.grad(want, (A, B, s, x), gy)
    if A_cur is None:
        gs, gx = torch.autograd.grad(y, (s, x), gy)
    else:
        ga, gb, gs, gx = torch.autograd.grad(y, (A, B, s, x), gy)
        torch.testing.assert_close(ga[:, first:], wa[:, first:])
        torch.testing.assert_close(gb[..., first:], wb[..., first:])
        assert not ga[:, :first].any() and not gb[..., :first].any()  # frozen rows: their factors take no gradient
    torch.testing.assert_close(gs, ws)
    torch.testing.assert_close(gx, wx)
    if first == 0:
        empty_A, empty_B = A[:, :0].detach(), B[..., :0].detach()
        assert torch.autograd.gradcheck(
            lambda x, A, B, s: FusedLowRank.apply(x, w, b, empty_A, empty_B, A, B, s, (0, 2 * d)), (x, A, B, s))


@pytest.mark.parametrize("strategy", ["merged", "fused"])
def test_a_training_step_saves_no_copy_that_grows_with_the_adapters(strategy):
    """What autograd keeps for the backward, besides the inputs, parameters and buffers it refers to, grows from 2
    frozen adapters to 40 by the per-row scales alone (P numbers a rank row), never by a copy of the frozen factors
    (P d numbers a rank row): the stack is not copied per step (issue 42)."""
    kept = {}
    for n_frozen in (2, 40):
        layer = make_layer(strategy=strategy, ranks=(3,) * (n_frozen + 1))
        layer.configure(frozen=list(range(n_frozen)), current=n_frozen)
        layer.coeff = torch.ones(n_frozen + 1, requires_grad=True)
        x = torch.randn(7, D, requires_grad=True)
        owned = {t.untyped_storage().data_ptr() for t in [x, layer.coeff, *layer.parameters(), *layer.buffers()]}
        saved: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in owned:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.sum().backward()  # and the backward runs on what was kept
        kept[n_frozen] = sum(saved.values())
    rows = 3 * (40 - 2)
    assert kept[40] - kept[2] <= 2 * rows * 4, kept  # (q, v) x the added rank rows x one float32 scale
