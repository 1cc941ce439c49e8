"""Sparsemax against the definition (Euclidean projection onto the simplex), gradient, schedule."""
import itertools

import numpy as np
import pytest
import torch

from utils.gumbel_utils import gumbel_sparsemax, sample_gumbel, sparsemax, sparsity_loss, temperature


def project_simplex_brute(z: np.ndarray) -> np.ndarray:
    """argmin_p ||p - z||^2 over the simplex, by trying every support set."""
    best, best_d = None, np.inf
    n = len(z)
    for k in range(1, n + 1):
        for S in itertools.combinations(range(n), k):
            S = list(S)
            tau = (z[S].sum() - 1) / k
            p = np.zeros(n)
            p[S] = z[S] - tau
            if (p[S] < -1e-12).any():
                continue
            d = ((p - z) ** 2).sum()
            if d < best_d:
                best, best_d = p, d
    return best


@pytest.mark.parametrize("seed", range(20))
def test_sparsemax_is_the_simplex_projection(seed):
    rng = np.random.RandomState(seed)
    z = rng.normal(scale=rng.choice([0.1, 1, 5]), size=rng.randint(1, 7))
    got = sparsemax(torch.tensor(z)).numpy()
    np.testing.assert_allclose(got, project_simplex_brute(z), atol=1e-10)


def test_known_value_has_exact_zeros():
    p = sparsemax(torch.tensor([2.0, 1.0, 0.5, 0.1]))
    assert p.tolist() == [1.0, 0.0, 0.0, 0.0]  # threshold 1: not the [0.70, 0.23, 0.07, 0] of the notes
    p = sparsemax(torch.tensor([1.0, 0.8, 0.1]))
    torch.testing.assert_close(p, torch.tensor([0.6, 0.4, 0.0]))


def test_stable_for_large_and_equal_logits():
    assert sparsemax(torch.tensor([1e30, 1e30, -1e30])).tolist() == [0.5, 0.5, 0.0]
    torch.testing.assert_close(sparsemax(torch.full((4,), 3.7)), torch.full((4,), 0.25))
    assert torch.isfinite(sparsemax(torch.tensor([1e38, 0.0]))).all()


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    for _ in range(5):
        z = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(sparsemax, (z,))


def test_masked_entries_get_zero_and_no_gradient():
    z = torch.tensor([0.3, 5.0, 0.2, 0.1], requires_grad=True)
    active = torch.tensor([True, False, True, True])
    p = sparsemax(z, active)
    assert p[1] == 0
    torch.testing.assert_close(p[active], sparsemax(z.detach()[active]))
    (p * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert z.grad[1] == 0
    assert z.grad[[0, 2, 3]].abs().sum() > 0


def test_gumbel_noise_statistics_and_noiseless_mode():
    g = sample_gumbel((200000,), generator=torch.Generator().manual_seed(0))
    assert abs(g.mean().item() - 0.5772) < 0.01   # Euler-Mascheroni constant
    assert abs(g.var().item() - np.pi ** 2 / 6) < 0.03
    logits = torch.tensor([0.2, -0.1, 0.4])
    torch.testing.assert_close(gumbel_sparsemax(logits, 0.5, noise=False), sparsemax(logits / 0.5))


def test_sparsity_loss():
    assert sparsity_loss(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-7)
    b = torch.tensor([0.25, 0.25, 0.25, 0.25])
    assert sparsity_loss(b, eps=0).item() == pytest.approx(np.log(4))


def test_temperature_schedule():
    assert temperature(0, 5.0, 0.5, 0.999) == 5.0
    assert temperature(1000, 5.0, 0.5, 0.999) == pytest.approx(0.5 + 4.5 * 0.999 ** 1000)
    assert temperature(10 ** 6, 5.0, 0.5, 0.999) == pytest.approx(0.5)
