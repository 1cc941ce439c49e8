"""The floor: backbone frozen, no adapters, only the growing head trains."""
from __future__ import annotations

from models import register
from models.base import Learner


@register("linear_probe")
class LinearProbe(Learner):
    uses_adapters = False
