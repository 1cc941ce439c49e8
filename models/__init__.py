"""Method registry: ``@register("name")`` on a Learner subclass makes it a valid ``model_name``."""
from __future__ import annotations

from typing import Type

REGISTRY: dict[str, Type] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


def get_learner(name: str) -> Type:
    """The Learner class registered under ``name`` (importing the method modules on first use)."""
    from models import gumbel_sdlora, linear_probe, lora_baselines, sdlora  # noqa: F401  (they register themselves)
    if name not in REGISTRY:
        raise KeyError(f"unknown model_name '{name}'; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]
