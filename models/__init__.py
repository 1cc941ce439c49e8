"""Method registry: ``@register("name")`` on a Learner subclass makes it a valid ``model_name``.

A method may declare its own config keys (a dataclass of ``utils.config._key`` fields), the shared
method-scoped keys it also uses, and a check of the whole config: they join the schema (utils/config/methods.py)
without a line there. Importing this package imports every method file, so the registry is complete.
"""
from __future__ import annotations

from typing import Callable, Optional, Type

from utils.config.methods import declare_method

REGISTRY: dict[str, Type] = {}


def register(name: str, keys: Optional[type] = None, uses: tuple = (), check: Optional[Callable] = None):
    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        declare_method(name, keys, uses, check)
        return cls
    return deco


def get_learner(name: str) -> Type:
    """The Learner class registered under ``name``."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model_name '{name}'; registered: {sorted(REGISTRY)}")
    return REGISTRY[name]


def _import_methods() -> None:
    """Import every file of this package: the method files register themselves (a new method is one new
    file, no line here)."""
    import importlib
    import pkgutil
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_methods()
