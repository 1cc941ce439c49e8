"""SubLoRA: the sparse projection's statistics, the allocation modes, what trains, what is stored, restore."""
import math
from pathlib import Path

import pytest
import torch

from backbone.subspace import NNZ, SparseProjection, SubspaceAdapter, SubspaceSpec
from main import make_data_manager
from models.sdlora import SDLoRA
from utils.config import ConfigError, build_config
from utils.data.datasets import load_dataset
from utils.io import load_tensors


def projection(n: int, d: int, seed: int = 0) -> SparseProjection:
    return SparseProjection(torch.zeros(n, dtype=torch.long), torch.full((n,), d), torch.Generator().manual_seed(seed))


def test_sparse_projection_equals_its_dense_matrix_forward_and_backward():
    P = projection(300, 40)
    P.value = P.value.double()
    D = P.dense(40)
    assert (D != 0).sum(1).le(NNZ).all() and P.index.numel() == 300 * NNZ  # O(n nnz) storage, never n x d
    z = torch.randn(40, dtype=torch.float64, requires_grad=True)
    g = torch.randn(300, dtype=torch.float64)
    out = P(z)
    torch.testing.assert_close(out, D @ z.detach(), rtol=1e-12, atol=1e-12)
    out.backward(g)
    torch.testing.assert_close(z.grad, D.t() @ g, rtol=1e-12, atol=1e-12)  # autograd gives P^T g


@pytest.mark.parametrize("d", [100, 2000])
def test_projection_is_an_isometry_on_average_whatever_d(d):
    """Unit columns: E[P^T P] = I, so ||P z|| ~ ||z|| and the scale of theta does not depend on d."""
    n = 60_000
    P = projection(n, d, seed=d)
    col_norm2 = torch.zeros(d).index_add_(0, P.index.flatten(), P.value.pow(2).flatten())
    assert torch.allclose(col_norm2, torch.ones(d), atol=1e-3)  # every column (float32 sums of ~n nnz / d terms)
    gen = torch.Generator().manual_seed(1)
    ratios = []
    for _ in range(32):
        z = torch.randn(d, generator=gen)
        ratios.append((P(z).norm() / z.norm()).item() ** 2)
    assert abs(sum(ratios) / len(ratios) - 1.0) < 0.02  # E ||P z||^2 = ||z||^2
    # P^T P = I + E: off-diagonal entries ~ N(0, 1/n_per_column-ish), small against the unit diagonal
    small = projection(20_000, 50, seed=3)
    gram = small.dense(50).t() @ small.dense(50)
    off = gram - torch.diag(torch.diag(gram))
    assert torch.allclose(torch.diag(gram), torch.ones(50), atol=0.05) and off.abs().max() < 0.2
    assert abs(off.mean().item()) < 0.01
    # theta's entries: mean 0, spread ||z|| / sqrt(n), the same at every d for a z of the same norm
    z = torch.randn(d, generator=gen)
    theta = P(z / z.norm())
    assert abs(theta.mean().item()) < 3 / n ** 0.5 and abs(theta.std().item() * n ** 0.5 - 1) < 0.05
    counts = torch.bincount(P.index.flatten(), minlength=d).double()  # every column used alike
    expected = n * NNZ / d
    assert abs(counts.mean().item() - expected) < 1e-9 and counts.std().item() < 1.5 * math.sqrt(expected)
    assert abs(P.value.sign().mean().item()) < 0.01


SHAPES = [(torch.Size([2, 4, 48]), torch.Size([2, 48, 4]))] * 3  # 3 blocks, q and v, rank 4, width 48


def test_fixed_allocation_feeds_a_and_b_from_separate_coordinates():
    sub = SubspaceAdapter(SHAPES, SubspaceSpec(100, "fixed", ratio=0.8, seed=3), torch.device("cpu"), torch.float32)
    d_b = sub.b_dims()
    assert d_b == 80
    assert sub.proj_A.index.max() < 100 - d_b and sub.proj_B.index.min() >= 100 - d_b
    with torch.no_grad():
        sub.z[:100 - d_b] = 1.0  # only A's coordinates move: B stays at its zero initialisation
    (A, B), *_ = sub.factors()
    assert torch.count_nonzero(B) == 0 and not torch.equal(A, sub.factors()[0][0] * 0)


def test_uniform_allocation_reads_all_of_z_for_a_and_b():
    sub = SubspaceAdapter(SHAPES, SubspaceSpec(64, "uniform", seed=3), torch.device("cpu"), torch.float32)
    for proj in (sub.proj_A, sub.proj_B):
        assert proj.index.min() == 0 and proj.index.max() == 63


def test_learned_soft_mask_splits_each_block_at_gamma():
    sub = SubspaceAdapter(SHAPES, SubspaceSpec(100, "learned", seed=3), torch.device("cpu"), torch.float32)
    sizes = [34, 33, 33]
    gammas = torch.tensor([0.3, 0.5, 0.9])
    with torch.no_grad():
        sub.split.copy_(torch.log(gammas / (1 - gammas)))
    m = sub.mask().detach()
    start = 0
    for size, g in zip(sizes, gammas.tolist()):
        j = torch.arange(size, dtype=torch.float32)
        ref = torch.sigmoid(10 * (g * size - j))  # m_j = sigmoid(C (gamma_l d_l - j))
        torch.testing.assert_close(m[start:start + size], ref)
        cut = g * size
        block = m[start:start + size]
        assert (block[j < cut - 0.5] > 0.99).all() and (block[j > cut + 0.5] < 0.01).all()
        start += size
    # block i's factors read only block i's coordinates
    starts = [0, 34, 67]
    rows_a, rows_b = SHAPES[0][0].numel(), SHAPES[0][1].numel()
    for i, (s, size) in enumerate(zip(starts, sizes)):
        ia = sub.proj_A.index[i * rows_a:(i + 1) * rows_a]
        ib = sub.proj_B.index[i * rows_b:(i + 1) * rows_b]
        assert ia.min() >= s and ia.max() < s + size and ib.min() >= s and ib.max() < s + size
    assert sub.n_stored() == 100 + 3


def tiny_learner(tiny, tmp_path, **over):
    cfg = build_config(dict(tiny, **{"intrinsic_dim": 64, **over}))
    return SDLoRA(cfg, torch.device("cpu"), Path(tmp_path), seed=7), make_data_manager(cfg, load_dataset(cfg), 7)


@pytest.mark.parametrize("mode", ["uniform", "fixed", "learned"])
def test_only_z_and_split_train_among_adapter_tensors(tiny, tmp_path, mode):
    learner, dm = tiny_learner(tiny, tmp_path, allocation_mode=mode)
    learner.begin_task(0, 2)
    sub = learner.net.backbone.subspace
    with torch.no_grad():
        sub.z.normal_()  # at z = 0 the split logits have no gradient yet (z m = 0 whatever m)
    x = torch.randn(4, 3, 32, 32)
    learner.net.train()
    learner.net(x).sum().backward()
    trained = {n for n, p in learner.net.named_parameters() if p.grad is not None}
    expect = {"backbone.subspace.z", "backbone.gate.alpha.0", "head.weight", "head.bias"}
    if mode == "learned":
        expect.add("backbone.subspace.split")
        assert sub.split.grad.abs().sum() > 0
    assert trained == expect and sub.z.grad.abs().sum() > 0


def test_subspace_run_stores_z_and_restores_bit_for_bit(tiny, tmp_path):
    learner, dm = tiny_learner(tiny, tmp_path / "a", allocation_mode="learned", max_tasks=2, epochs=2)
    metrics = learner.run(dm)
    assert metrics["adapter_params"] == [64 + 2, 2 * (64 + 2)]  # d + L per task, not the factors
    assert len(metrics["subspace_gamma"]) == 2 and len(metrics["subspace_gamma"][0]) == 2
    ck = load_tensors(Path(learner.run_dir) / "task_1.safetensors")
    assert not any(k.startswith("adapter.0.") for k in ck) and ck["subspace.z"].shape == (64,)
    assert sorted(k for k in ck if k.startswith("subspace.")) == ["subspace.seed", "subspace.split", "subspace.z"]

    again, _ = tiny_learner(tiny, learner.run_dir, allocation_mode="learned", max_tasks=2, epochs=2)
    again.restore(dm, 1)
    for a, b in zip(learner.net.backbone.layers, again.net.backbone.layers):
        for t in ("0", "1"):
            assert torch.equal(a.lora_A[t], b.lora_A[t]) and torch.equal(a.lora_B[t], b.lora_B[t])
    x = torch.randn(3, 3, 32, 32)
    learner.net.eval(), again.net.eval()
    with torch.no_grad():
        assert torch.equal(learner.net(x), again.net(x))


def test_subspace_forward_merged_equals_unmerged(tiny, tmp_path):
    learner, dm = tiny_learner(tiny, tmp_path, allocation_mode="fixed", allocation_ratio=0.25)
    learner.begin_task(0, 2)
    with torch.no_grad():
        learner.net.backbone.subspace.z.normal_(std=0.3)
    x = torch.randn(3, 3, 32, 32)
    learner.net.train()
    with torch.no_grad():
        train_out = learner.net(x)
    learner.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(learner.net(x), train_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("over, fragment", [
    (dict(allocation_mode="fixed"), "set 'intrinsic_dim'"),
    (dict(intrinsic_dim=100, allocation_ratio=0.3), 'only applies to "allocation_mode": "fixed"'),
    (dict(intrinsic_dim=10, allocation_mode="fixed", allocation_ratio=0.01), "leaves A or B no coordinate"),
    (dict(intrinsic_dim=100, growth_schedule=[0, 2], skip_mode="reuse"), "a reopened adapter has no subspace"),
    (dict(intrinsic_dim=100, model_name="gumbel_sdlora"), "is not used by model_name 'gumbel_sdlora'"),
    (dict(intrinsic_dim=0), "must be > 0"),
])
def test_subspace_config_rejections(tiny, over, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build_config(dict(tiny, **over))


@pytest.mark.parametrize("over, fragment", [
    (dict(intrinsic_dim=10 ** 6), "exceeds the 1,536 LoRA parameters"),  # 2 blocks x q, v x (A + B) x 4 x 48
    (dict(intrinsic_dim=1, allocation_mode="learned"), "must be >= 2"),
])
def test_intrinsic_dim_the_backbone_cannot_take_is_refused_up_front(tiny, tmp_path, over, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_learner(tiny, tmp_path, **over)


def test_subspace_lr_is_the_learning_rate_of_z_and_split_only(tiny, tmp_path):
    learner, _ = tiny_learner(tiny, tmp_path, allocation_mode="learned", subspace_lr=0.5)
    learner.begin_task(0, 2)
    rest, own = learner.param_groups()
    sub = learner.net.backbone.subspace
    assert {id(p) for p in own["params"]} == {id(sub.z), id(sub.split)} and own["lr"] == 0.5
    assert "lr" not in rest and len(rest["params"]) == 3  # alpha, head weight and bias: at lrate


def _fit_split(target: str, split_lr: float, steps: int = 200) -> tuple[list[float], float]:
    """z (lr 0.05) and the split logits (``split_lr``) fitted to a target only B (or only A) can reach."""
    shapes = [(torch.Size([2, 4, 16]), torch.Size([2, 16, 4]))] * 3
    sub = SubspaceAdapter(shapes, SubspaceSpec(60, "learned", seed=3), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    goal = [torch.randn(b if target == "B" else a, generator=g) for a, b in shapes]
    start = [A.detach().clone() for A, _ in sub.factors()]  # theta_0's A: the target is a move away from it
    opt = torch.optim.SGD([{"params": [sub.z], "lr": 0.05}, {"params": [sub.split], "lr": split_lr}])
    for _ in range(steps):
        loss = sum((((B if target == "B" else A - a0) - t) ** 2).sum()
                   for (A, B), a0, t in zip(sub.factors(), start, goal))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(sub.split).tolist(), float(loss.detach())


def test_split_lr_moves_the_learned_split_towards_the_side_that_matters():
    """A target only B can reach pulls every block's gamma (share of z on B) up, one only A can reach pulls it
    down; a frozen split stays at 0.5 and fits worse."""
    up, loss_up = _fit_split("B", split_lr=1.0)
    frozen, loss_frozen = _fit_split("B", split_lr=0.0)
    down, _ = _fit_split("A", split_lr=1.0)
    assert min(up) > 0.6 and max(down) < 0.4 and frozen == [0.5, 0.5, 0.5]
    assert loss_up < 0.95 * loss_frozen


def test_split_lr_is_the_split_logits_own_group(tiny, tmp_path):
    learner, _ = tiny_learner(tiny, tmp_path, allocation_mode="learned", split_lr=2.0)
    learner.begin_task(0, 2)
    rest, split = learner.param_groups()
    sub = learner.net.backbone.subspace
    assert [id(p) for p in split["params"]] == [id(sub.split)] and split["lr"] == 2.0
    assert id(sub.z) in {id(p) for p in rest["params"]} and "lr" not in rest
    learner, _ = tiny_learner(tiny, tmp_path, allocation_mode="learned", split_lr=2.0, subspace_lr=0.5)
    learner.begin_task(0, 2)
    _, own, split = learner.param_groups()
    assert [id(p) for p in own["params"]] == [id(learner.net.backbone.subspace.z)] and own["lr"] == 0.5
    with pytest.raises(ConfigError, match="'split_lr' only applies to \"allocation_mode\": \"learned\""):
        build_config(dict(tiny, intrinsic_dim=64, split_lr=1.0))
    with pytest.raises(ConfigError, match="'subspace_norm' shapes the SubLoRA subspace"):
        build_config(dict(tiny, subspace_norm="none"))


@pytest.mark.parametrize("norm", ["direction_norm", "none"])
def test_subspace_norm_none_keeps_the_trained_scale_at_freeze(norm, tiny, tmp_path):
    """With "none" the frozen adapter's coefficient stays alpha (n = 1): freezing leaves the network as it was;
    SD-LoRA's normalisation divides the direction by ||A|| ||B|| and changes it."""
    learner, dm = tiny_learner(tiny, tmp_path, subspace_norm=norm)
    learner.begin_task(0, 2)
    sub = learner.net.backbone.subspace
    with torch.no_grad():
        sub.z.normal_(std=0.5)
    x = torch.stack([dm.test_set(0, learner.test_tf)[i][0] for i in range(4)])
    learner.net.train()
    with torch.no_grad():
        before = learner.net(x)
    learner.end_task(0)
    with torch.no_grad():
        after = learner.net(x)
    layer = learner.net.backbone.layers[0]
    assert layer.norm_of(0) == ("none" if norm == "none" else "factors")
    assert torch.allclose(after, before, atol=1e-5) == (norm == "none")
