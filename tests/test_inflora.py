"""InfLoRA: A_t from the task's inputs outside the stored subspace, B only trains, merge into W, DualGPM."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from main import main
from models import get_learner
from models.inflora import projected_basis, update_memory
from utils.config import ConfigError, build_config
from utils.data.data_manager import DataManager
from utils.data.datasets import load_dataset

INFLORA = dict(model_name="inflora", lora_targets=["k", "v"], optimizer="adam", lrate=0.003,
               scheduler="coda_cosine", epochs=2)


def _dirs(d: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]


def _cov(dirs: torch.Tensor, seed: int) -> torch.Tensor:
    """The input covariance of a task whose inputs span ``dirs`` (orthonormal columns, equal energy), 1 % noise."""
    g = torch.Generator().manual_seed(seed)
    n, d = 4000, dirs.shape[0]
    x = torch.randn(n, dirs.shape[1], generator=g, dtype=torch.float64) @ dirs.T
    x += 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.T @ x / n


def _used_space(memory: torch.Tensor, retain: bool) -> torch.Tensor:
    """An orthonormal basis of the subspace earlier tasks' inputs use (the complement when M is 'retain')."""
    if not retain:
        return memory
    return torch.linalg.svd(memory)[0][:, memory.shape[1]:]


@pytest.mark.parametrize("k", [5, 20])  # of d = 32: stored as the used space, or (over d / 2) as its complement
def test_a_is_orthogonal_to_the_stored_subspace(k):
    d = 32
    q = _dirs(d)
    memory, retain = update_memory(_cov(q[:, :k], 0), None, False, threshold=0.99)
    assert retain == (k - 1 > d / 2)
    assert torch.allclose(memory.T @ memory, torch.eye(memory.shape[1], dtype=torch.float64), atol=1e-10)
    used = _used_space(memory, retain)
    # the public rule after task 0: the components before the cumulative energy share reaches the threshold
    assert used.shape[1] == k - 1
    assert (q[:, k:].T @ used).abs().max() < 1e-3  # nothing outside the task's own directions
    A = projected_basis(_cov(torch.cat([q[:, :2], q[:, k:k + 4]], 1), 1), memory, retain, rank=3)
    assert A.shape == (3, d)
    assert torch.allclose(A @ A.T, torch.eye(3, dtype=torch.float64) / 3, atol=1e-10)  # orthonormal / sqrt(3)
    assert (A @ used).abs().max() < 1e-10  # float64 here; float32 in the network (below)
    plain = projected_basis(_cov(q[:, :6], 1), None, False, 3)
    assert (plain @ used).abs().max() > 0.1  # without the projection, A lies in the old subspace


def test_memory_grows_with_new_tasks_and_switches_to_the_complement():
    d = 24
    q = _dirs(d)
    m, retain = update_memory(_cov(q[:, :5], 0), None, False, 0.95)
    assert not retain and m.shape[1] == 4
    m2, retain2 = update_memory(_cov(q[:, 5:10], 1), m, retain, 0.95)  # 5 new directions join
    assert not retain2 and m2.shape[1] == 9 and torch.equal(m2[:, :4], m)
    assert (q[:, 5:10].T @ m2[:, 4:]).abs().max() > 0.5 and (q[:, 10:].T @ m2).abs().max() < 1e-3
    m3, retain3 = update_memory(_cov(q[:, 10:16], 2), m2, retain2, 0.95)  # 15 > d / 2: the free complement
    assert retain3 and m3.shape[1] == d - 15
    m4, retain4 = update_memory(_cov(q[:, 16:18], 3), m3, retain3, 0.95)  # retain: the free space loses 2
    assert retain4 and m4.shape[1] == d - 17
    assert (m4.T @ q[:, 16:18]).abs().max() < 1e-3 and (m4.T @ _used_space(m3, True)).abs().max() < 1e-10


def _learner(tiny, tmp_path, **over):
    cfg = build_config(dict(tiny, **INFLORA, **over))
    learner = get_learner("inflora")(cfg, torch.device("cpu"), tmp_path / "run", cfg.seeds[0])
    (tmp_path / "run").mkdir(exist_ok=True)
    return learner, DataManager.for_config(cfg, load_dataset(cfg), cfg.seeds[0])


def test_only_b_trains_merged_equals_unmerged_and_old_inputs_are_untouched(tiny, tmp_path):
    learner, dm = _learner(tiny, tmp_path, max_tasks=3)
    layers = learner.net.backbone.layers
    w0 = [layer.base.weight.detach().clone() for layer in layers]
    x = torch.stack([dm.test_set(0, learner.test_tf)[i][0] for i in range(6)])
    seen = {}
    end_task = learner.end_task

    def check_end_task(task):
        A0 = {i: layer.lora_A[str(task)].detach().clone() for i, layer in enumerate(layers)}
        trainable = {n for n, p in learner.net.named_parameters() if p.requires_grad}
        assert trainable == {f"backbone.vit.blocks.{i}.attn.qkv.lora_B.{task}" for i in range(len(layers))} | {
            "head.weight", "head.bias"}
        learner.net.train()  # the adapter unmerged: W_{t-1} x + B_t A_t x
        with torch.no_grad():
            unmerged = learner.net(x)
        end_task(task)
        with torch.no_grad():
            merged = learner.net(x)  # W_t = W_{t-1} + B_t A_t, no adapter in the forward pass
        assert all(layer.n_active == 0 for layer in layers)
        assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-5)
        seen[task] = A0
    learner.end_task = check_end_task
    learner.run(dm)
    for i, layer in enumerate(layers):  # W = W_0 + sum_t B_t A_t on the k and v slices, q untouched
        expect = w0[i].clone()
        for t in range(3):
            for p, o in enumerate(layer.offsets):
                expect[o:o + layer.dim] += layer.lora_B[str(t)][p].detach() @ layer.lora_A[str(t)][p].detach()
        assert torch.allclose(layer.base.weight, expect, atol=1e-6)
        assert torch.equal(layer.base.weight[:layer.dim], w0[i][:layer.dim])
        assert all(torch.equal(layer.lora_A[str(t)].detach(), seen[t][i]) for t in range(3))  # A never moved


def test_saved_a_is_orthogonal_to_the_earlier_tasks_inputs(tiny, tmp_path):
    """From the run folder: task 1's A (float32) against the input subspace stored after task 0, and what
    B_1 A_1 does to inputs in that subspace."""
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(dict(tiny, **INFLORA, max_tasks=2)))
    assert main([f"--config={p}"]) == 0
    rd = next(Path(tiny["log_dir"]).iterdir())
    t0, t1 = load_file(str(rd / "task_0.safetensors")), load_file(str(rd / "task_1.safetensors"))
    blocks = sum(1 for k in t0 if k.startswith("inflora.memory."))
    assert blocks == 2
    for i in range(blocks):
        used = _used_space(t0[f"inflora.memory.{i}"], bool(t0["inflora.retain"][i]))
        A, B = t1[f"adapter.{i}.A"].double(), t1[f"adapter.{i}.B"].double()
        assert torch.equal(A[0], A[1])  # the same A for k and v
        assert (A[0] @ used).abs().max() < 1e-5 * A.abs().max() * used.shape[0]
        x = used @ torch.randn(used.shape[1], 8, dtype=torch.float64)  # inputs in task 0's subspace
        assert (B[0] @ (A[0] @ x)).norm() <= 1e-4 * (B[0].norm() * A[0].norm() * x.norm())
    m = json.loads((rd / "metrics.json").read_text())
    assert m["active_adapters"] == [1, 2] and len(m["memory_numbers"]) == 2 and m["memory_numbers"][0] > 0


def test_resumed_inflora_equals_uninterrupted(tiny, tmp_path):
    cfg = dict(tiny, **INFLORA)
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    assert main([f"--config={p}"]) == 0
    p.write_text(json.dumps(dict(cfg, max_tasks=1)))
    assert main([f"--config={p}"]) == 0
    full_dir, part_dir = sorted(Path(cfg["log_dir"]).iterdir())
    assert main(["--resume", str(part_dir), "--max_tasks", "3"]) == 0
    a = json.loads((full_dir / "metrics.json").read_text())
    b = json.loads((part_dir / "metrics.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["memory_numbers"] == b["memory_numbers"]
    x, y = load_file(str(full_dir / "task_2.safetensors")), load_file(str(part_dir / "task_2.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_inflora_keys_are_checked(tiny):
    with pytest.raises(ConfigError, match="'lamb' = 0.99 must be <= 'lame' = 0.9"):
        build_config(dict(tiny, **INFLORA, lamb=0.99, lame=0.9))
    with pytest.raises(ConfigError, match="'lamb' belongs to model_name 'inflora'"):
        build_config(dict(tiny, lamb=0.9))
    with pytest.raises(ConfigError, match="'lame' = 1.5 must be in"):
        build_config(dict(tiny, **INFLORA, lame=1.5))
    assert build_config(dict(tiny, **INFLORA)).to_dict()["lamb"] == 0.95
    with pytest.raises(ConfigError, match="inflora_energy"):
        build_config(dict(tiny, **INFLORA, inflora_energy="cubed"))
    with pytest.raises(ConfigError, match="'inflora_a_scale' = 0 must be > 0"):
        build_config(dict(tiny, **INFLORA, inflora_a_scale=0))


def test_plain_spectrum_counts_eigenvalues_against_a_brute_force_share():
    """inflora_energy 'plain': the fewest directions whose eigenvalues hold the threshold's share of the trace,
    after task 0 and on top of a stored basis, where the squared spectrum keeps fewer."""
    d = 16
    q = _dirs(d)
    energies = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25] + [0.0] * (d - 6), dtype=torch.float64)
    cov = q @ torch.diag(energies) @ q.T
    share = torch.cumsum(energies, 0) / energies.sum()
    m, retain = update_memory(cov, None, False, 0.9, plain=True)
    assert m.shape[1] == int((share < 0.9).sum()) == 3 and not retain  # the public rule's count, on eigenvalues
    assert update_memory(cov, None, False, 0.9)[0].shape[1] == 1  # squared: 64 / 85.3 = 0.75, 80 / 85.3 = 0.94
    # task 1's inputs: 4 of their 7.5 in the stored space, the rest on new directions 6, 7, 8 (2, 1, 0.5)
    e1 = torch.zeros(d, dtype=torch.float64)
    e1[0], e1[6], e1[7], e1[8] = 4.0, 2.0, 1.0, 0.5
    cov1 = q @ torch.diag(e1) @ q.T
    m1, _ = update_memory(cov1, m, False, 0.85, plain=True)
    # brute force: stored 4 / 7.5 = 0.533; + direction 6 -> 0.8; + 7 -> 0.933 >= 0.85, stop
    assert m1.shape[1] == 3 + 2 and torch.equal(m1[:, :3], m)
    assert (q[:, [6, 7]].T @ m1[:, 3:]).norm(dim=1).min() > 1 - 1e-8 and (q[:, 8] @ m1).abs().max() < 1e-8


def test_a_scale_and_the_centred_covariance(tiny, tmp_path):
    cov = _cov(_dirs(12)[:, :4], 0)
    assert torch.allclose(projected_basis(cov, None, False, 3, scale=0.12).norm(dim=1),
                          torch.full((3,), 0.12, dtype=torch.float64), atol=1e-12)
    learner, dm = _learner(tiny, tmp_path, max_tasks=1)
    centred, _ = _learner(tiny, tmp_path, max_tasks=1, inflora_centre=True)
    centred.net.load_state_dict(learner.net.state_dict())
    loader = learner.train_loader(dm, 0)
    seen = []  # brute force: every token entering block 0's qkv
    h = learner.net.backbone.layers[0].register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    data = [(x, y) for x, y in loader]
    plain = learner.input_covariance(data)
    h.remove()
    x = torch.cat(seen)
    assert torch.allclose(plain[0], x.T @ x / len(x), atol=1e-6)
    assert torch.allclose(centred.input_covariance(data)[0], torch.cov(x.T, correction=0), atol=1e-6)
