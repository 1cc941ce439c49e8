"""Configs: the typed schema of the shared keys (schema.py), the methods' own keys as they register
(methods.py), cross-checks (checks.py), protocols laid over a config (protocols.py) and the reading of a
config file with its overrides (reading.py). Everything a caller needs is importable from here."""
from utils.config.methods import FIELDS, METHOD_SPECS, MethodSpec, declare_method, method_specs  # noqa: F401
from utils.config.reading import (  # noqa: F401
    RENAMED, build_config, check_device, describe_keys, load_config, parse_overrides)
from utils.config.schema import (  # noqa: F401
    ANY_LORA, DEFAULTS, KD, LORA_METHODS, PLAIN_LORA, SUBSPACE, Config, ConfigError, _fraction, _key,
    _non_negative, _positive)
