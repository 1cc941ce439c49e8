"""A linear classifier that grows by ``n`` outputs per task; old rows are kept."""
from __future__ import annotations

import torch
from torch import nn


class GrowingHead(nn.Module):
    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.zeros(0, in_features))
        self.bias = nn.Parameter(torch.zeros(0))

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def expand(self, n: int) -> None:
        """Append n outputs initialised like nn.Linear; existing rows are copied unchanged."""
        fresh = nn.Linear(self.in_features, n, device=self.weight.device, dtype=self.weight.dtype)
        self.weight = nn.Parameter(torch.cat([self.weight.detach(), fresh.weight.detach()]))
        self.bias = nn.Parameter(torch.cat([self.bias.detach(), fresh.bias.detach()]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


class CosineHead(GrowingHead):
    """A cosine classifier: logit_c = cos(x, w_c), features and rows normalised (SimpleCIL's prototypes). The bias
    is kept at zero and never used, so checkpoints hold the same tensors as the linear head's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.normalize(x, dim=-1), nn.functional.normalize(self.weight, dim=-1))
