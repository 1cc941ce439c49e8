"""RanPAC (McDonnell et al., NeurIPS 2023): no training; the frozen backbone's features f go through a fixed
random projection and a ReLU, h = relu(f W), W (d x M) ~ N(0, 1) drawn from the run's seed, and a ridge
classifier over the statistics of every image seen so far, G = sum h h^T (M x M) and Q = sum h y^T, gives the
logits h W_o with W_o = (G + lambda I)^-1 Q. Lambda is chosen per task as the paper's code does: on the task's
own images, shuffled, fitted on the first 80 % and scored (mean squared error) on the last 20 %, over
10^-8 .. 10^8; the fit is solved in its n x n dual form (the same solution, Woodbury), so only the final
solve is M x M.

This is SimpleCIL's learner (no training, or task 0's adapter with ``first_session_adapt``) under the ``"ridge"``
statistics head of models/heads.py, where the maths lives; any learner takes the same head with
``"head": "ridge"``. Memory: G is M^2 float64 numbers (800 MB at M = ``ranpac_dim`` = 10,000).
"""
from __future__ import annotations

from models import register
from models.heads import RIDGES, accumulate, choose_ridge, solve  # noqa: F401  (RanPAC's maths, re-exported)
from models.simplecil import PrototypeKeys, SimpleCIL, check_adapt_keys


@register("ranpac", keys=PrototypeKeys, uses=("lora_rank", "lora_targets"), check=check_adapt_keys)
class RanPAC(SimpleCIL):
    """SimpleCIL's learner; its own head (``head: null``) is the ridge one (utils/config/schema.py METHOD_HEADS)."""
