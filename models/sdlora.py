"""SD-LoRA (Wu et al., ICLR 2025): decoupled magnitudes and directions, one adapter per task.

On task t, A_t, B_t, every alpha and the head train; old adapters are frozen and normalised
(SPEC section 4). SD-LoRA-RR shrinks the rank with the task index.
"""
from __future__ import annotations

from models import register
from models.base import Learner


@register("sdlora")
class SDLoRA(Learner):
    """The base learner already is SD-LoRA: gate g = 1, alpha per task, one training phase."""

    default_alpha = 0.8


@register("sdlora_rr")
class SDLoRARR(SDLoRA):
    """SD-LoRA-RR: rank 10 for tasks 0-3, 8 for 4-7, 6 after (public default), or ``rank_schedule``."""

    default_schedule = [[0, 10], [4, 8], [8, 6]]

    def rank(self, task: int) -> int:
        sched = self.cfg.rank_schedule or self.default_schedule
        return [r for first, r in sched if first <= task][-1]
