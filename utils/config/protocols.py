"""Protocols: a named set of config keys (data subset, image size, epochs, batch...) laid over any method config.

A protocol file is ``{"description": "...", "keys": {...}}`` under ``exps/protocols/``. Precedence, lowest first:
the method config, the protocol, the command line. The resolved config records the protocol's path in
``protocol``; its keys are already in the config, so a resumed or forked run does not apply it twice.
"""
from __future__ import annotations

import json
from pathlib import Path

from utils.config.schema import ConfigError

#: What a protocol file may hold besides its keys.
FILE_FIELDS = {"description", "keys"}


def read_protocol(path: str) -> dict:
    """The keys of a protocol file, checked for shape (the keys themselves are checked by the schema)."""
    from utils.config.reading import read_json_file
    shipped = sorted(str(f) for f in Path("exps/protocols").glob("*.json"))
    raw = read_json_file(path, "protocol file", f"shipped protocols: {', '.join(shipped) or 'none'}")
    if not isinstance(raw, dict) or not isinstance(raw.get("keys"), dict):
        raise ConfigError(f"protocol file '{path}' must be {{\"description\": \"...\", \"keys\": {{...}}}}")
    extra = sorted(set(raw) - FILE_FIELDS)
    if extra:
        raise ConfigError(f"protocol file '{path}' has fields {extra}; config keys go under \"keys\"")
    if "protocol" in raw["keys"] or "model_name" in raw["keys"]:
        raise ConfigError(f"protocol file '{path}' may not set 'protocol' or 'model_name': a protocol applies to "
                          "any method")
    return dict(raw["keys"])


def apply_protocol(raw: dict, overrides: dict) -> dict:
    """The config dict with the protocol (named by the overrides or the config file) between file and overrides."""
    out = dict(raw)
    path = overrides.get("protocol", raw.get("protocol"))
    if path is not None:
        if not isinstance(path, str):
            raise ConfigError(f"config key 'protocol' = {json.dumps(path)} should be the path of a protocol file")
        out.update(read_protocol(path))
    out.update(overrides)
    return out
