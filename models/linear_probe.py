"""The floor: backbone frozen, no adapters, only the growing head trains."""
from __future__ import annotations

from models import register
from models.base import Learner


@register("linear_probe")
class LinearProbe(Learner):
    """A task grows the head and adds no adapter: the backbone stays the pretrained one."""

    def begin_task(self, task: int, n_new_classes: int) -> None:
        self.net.head.expand(n_new_classes)
        self.net.head.to(self.device)
