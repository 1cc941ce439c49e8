"""Where the config schema and the method registry meet: each method's declared keys, shared keys and check.

``models.register`` writes here when a method file is imported; the schema (reading.py) reads from here.
Neither imports the other: whoever reads a config first imports ``models`` (main.py does; so do the tests'
conftest and the benchmarks), and a config read before that is refused with a message that says so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from utils.config.schema import Config

#: The shared keys (the schema's fields), by name.
FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "method_keys"}


@dataclass(frozen=True)
class MethodSpec:
    """What a method declares when it registers (models/__init__.py ``register``): a dataclass of its own
    keys (made with ``_key`` fields: default, help, check), the shared method-scoped keys it also uses, and a
    check of the whole config returning error messages."""
    keys: Optional[type] = None
    uses: frozenset = frozenset()
    check: Optional[Any] = None


METHOD_SPECS: dict[str, MethodSpec] = {}


def declare_method(name: str, keys: Optional[type] = None, uses: tuple = (), check=None) -> None:
    """Called by ``models.register``: the method's keys and checks join the schema."""
    bad = [k for k in uses if k not in FIELDS]
    if bad:
        raise ValueError(f"method '{name}' declares unknown shared keys {bad}")
    METHOD_SPECS[name] = MethodSpec(keys, frozenset(uses), check)


def method_specs() -> dict[str, MethodSpec]:
    """Every registered method's spec; refuses to answer before any method has registered."""
    if not METHOD_SPECS:
        raise RuntimeError("no method is registered yet: import models (which imports every method file) before "
                           "reading a config; main.py and the benchmarks do")
    return METHOD_SPECS
