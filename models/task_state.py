"""What a task trains, copied and put back: a trial that is undone or a task that restarts (growth rules)."""
from __future__ import annotations

import torch


@torch.no_grad()
def snapshot(learner, adapter: int) -> dict[str, torch.Tensor]:
    """Copies of the head, every alpha and adapter ``adapter``'s factors in every block."""
    state = {f"head.{n}": p.detach().clone() for n, p in learner.net.head.named_parameters()}
    state.update({f"alpha.{k}": a.detach().clone() for k, a in learner.gate.alpha.items()})
    for i, layer in enumerate(learner.net.backbone.layers):
        state[f"A.{i}"] = layer.lora_A[str(adapter)].detach().clone()
        state[f"B.{i}"] = layer.lora_B[str(adapter)].detach().clone()
    return state


@torch.no_grad()
def restore(learner, adapter: int, state: dict[str, torch.Tensor]) -> None:
    """Write a ``snapshot`` back in place (the optimiser's tensors stay the same objects)."""
    for n, p in learner.net.head.named_parameters():
        p.copy_(state[f"head.{n}"])
    for k, a in learner.gate.alpha.items():
        a.copy_(state[f"alpha.{k}"])
    for i, layer in enumerate(learner.net.backbone.layers):
        layer.lora_A[str(adapter)].copy_(state[f"A.{i}"])
        layer.lora_B[str(adapter)].copy_(state[f"B.{i}"])
