"""The typed config schema: every key, its default and its check, in one place.

A run's config is a JSON file plus ``--key value`` overrides. Unknown keys, ill-typed values,
values outside their choices and keys the chosen method does not use stop the run before any
work, with a message that names the key and the fix. The resolved config is saved with every run.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

GUMBEL = ("gumbel_sdlora",)
KD = ("sdlora_kd",)
LORA_METHODS = ("sdlora", "sdlora_rr", "sdlora_kd", "gumbel_sdlora")
PLAIN_LORA = ("seq_lora", "lora_task_id")  # the explainer's references: plain LoRA, no magnitudes
ANY_LORA = LORA_METHODS + PLAIN_LORA
SUBSPACE = ("sdlora", "sdlora_rr")  # methods whose adapters may train in a random subspace (SubLoRA)


class ConfigError(ValueError):
    """A config that cannot run, with a message that says which key and how to fix it."""


def _key(default: Any, help: str, methods: tuple[str, ...] = (), check=None, default_factory=None):
    """A schema entry: default, one line of help, the methods that use it, an extra value check."""
    meta = {"help": help, "methods": methods, "check": check}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v) -> Optional[str]:
    return None if v is None or v > 0 else "must be > 0"


def _non_negative(v) -> Optional[str]:
    return None if v is None or v >= 0 else "must be >= 0"


def _fraction(v) -> Optional[str]:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _warmup(v) -> Optional[str]:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _holdout(v) -> Optional[str]:
    return None if 0 <= v <= 0.5 else "must be in [0, 0.5]"


def _zero(v) -> Optional[str]:
    return None if not v else "rehearsal is not supported by these methods; set it to 0 (or false)"


def _targets(v) -> Optional[str]:
    bad = [t for t in v if t not in ("q", "k", "v")]
    if bad or not v or len(set(v)) != len(v):
        return 'must be a non-empty list of distinct "q", "k", "v"'
    return None


def _loggers(v) -> Optional[str]:
    if any(n not in ("tensorboard", "wandb", "csv") for n in v) or len(set(v)) != len(v):
        return 'must be a list of distinct "tensorboard", "wandb", "csv"'
    return None


def _task_list(v) -> Optional[str]:
    if any(t < 0 for t in v) or len(set(v)) != len(v):
        return "must be a list of distinct task indices >= 0"
    return None


def _scale(v) -> Optional[str]:
    return None if len(v) == 2 and 0 < v[0] <= v[1] <= 1 else "must be [min, max] with 0 < min <= max <= 1"


def _growth_schedule(v) -> Optional[str]:
    if v is None:
        return None
    ok = isinstance(v, list) and v and all(isinstance(t, int) and t >= 0 for t in v)
    if not ok or v != sorted(set(v)) or v[0] != 0:
        return "must be an increasing list of task indices starting with 0 (task 0 always gets an adapter)"
    return None


def _rank_schedule(v) -> Optional[str]:
    if v is None:
        return None
    ok = all(isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) for i in p) for p in v)
    if not ok or not v or v[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(v, v[1:])) or any(p[1] <= 0 for p in v):
        return "must be [[first_task, rank], ...] starting at task 0, tasks increasing, ranks > 0"
    return None


@dataclass
class Config:
    """Every key a run understands. Familiar keys of the field (PILOT / SD-LoRA) keep their names."""

    # --- run -------------------------------------------------------------------------------
    prefix: str = _key("run", "name prefix of the run folder")
    model_name: str = _key("sdlora", "the method: any name registered in models/ (python main.py --keys lists them)")
    seed: Union[int, list[int]] = _key(1993, "seed, or a list of seeds run one after another")
    device: Union[str, list[str]] = _key(
        "auto", '"auto" (cuda if available), "cpu", "cuda", "cuda:N", or the field\'s ["0"]')
    log_dir: str = _key("logs", "runs are written to log_dir/<prefix>_<dataset>_<model>_<seed>_<time>")
    num_workers: Optional[int] = _key(None, "DataLoader workers (default: the CPU cores this process may use, "
                                      "at most 8)", check=_non_negative)
    progress: Union[bool, Literal["auto"]] = _key("auto", "tqdm progress bars: true, false, or auto (only when "
                                                  "the output is a terminal, not in a redirected log)")
    loggers: list[str] = _key(None, "experiment tracking: any of \"tensorboard\" (RUN_DIR/tb), \"wandb\" (offline), "
                              "\"csv\" (RUN_DIR/epochs.csv, tasks.csv); pip install -e \".[tracking]\"",
                              default_factory=list, check=_loggers)
    save_adapters: bool = _key(True, "save per-task adapter, gate and head tensors (safetensors)")
    max_tasks: Optional[int] = _key(None, "stop after this many tasks (quick runs)", check=_positive)

    # --- data ------------------------------------------------------------------------------
    dataset: Literal["cifar100", "cifar224", "imagenetr", "imageneta", "cub", "domainnet", "synthetic"] = _key(
        "cifar100", "cifar224 is the field's name for CIFAR-100 at 224 px")
    data_path: Optional[str] = _key(None, "dataset folder or .npz file (default data/<dataset>)")
    download: bool = _key(False, "allow torchvision to download CIFAR-100 when data_path has no copy")
    expected_classes: Optional[int] = _key(
        None, "the dataset's class count (the benchmark configs set it: 200, 345, ...); a dataset with another "
        "count stops before training (null: no check)", check=_positive)
    check_images: Literal["open", "decode", "none"] = _key(
        "open", "image-file datasets: before training, open every file's header (\"open\") or decode all its "
        "pixels (\"decode\"), so a missing or broken file is named up front; \"none\" skips it")
    shuffle: bool = _key(True, "shuffle the class order with seed")
    init_cls: int = _key(10, "classes in the first task", check=_positive)
    increment: int = _key(10, "classes per later task", check=_positive)
    train_per_class: Optional[int] = _key(None, "keep this many training images per class", check=_positive)
    test_per_class: Optional[int] = _key(None, "keep this many test images per class", check=_positive)
    synthetic_classes: int = _key(10, "classes of the generated dataset", check=_positive)
    img_size: int = _key(224, "input resolution of the ViT", check=_positive)
    normalize: bool = _key(False, "mean/std normalisation with the backbone's statistics (SD-LoRA: off)")
    crop_scale: list[float] = _key(None, "RandomResizedCrop scale range",
                                   default_factory=lambda: [0.05, 1.0], check=_scale)
    augment_on: Literal["auto", "device", "loader"] = _key(
        "auto", "where images are cropped, resized and flipped: \"device\" (each batch there in one op; in-memory "
        "datasets live on the device, image files are read by the workers and JPEGs decoded on the GPU under "
        "CUDA), \"loader\" (per image in the DataLoader, torchvision), \"auto\" (device when the dataset is "
        "in memory, else loader)")
    shift_tasks: list[int] = _key(
        None, "tasks whose train and test images are shown greyscale and inverted (a stream where some tasks "
        "need new features); [] for none", default_factory=list, check=_task_list)
    memory_size: int = _key(0, "rehearsal memory (not supported: must be 0)", check=_zero)
    memory_per_class: int = _key(0, "rehearsal memory (not supported: must be 0)", check=_zero)
    fixed_memory: bool = _key(False, "rehearsal memory (not supported: must be false)", check=_zero)

    # --- backbone and adapters -------------------------------------------------------------
    backbone_type: str = _key("vit_base_patch16_224.augreg_in21k", "any timm ViT name")
    pretrained: bool = _key(True, "load pretrained weights (timm hub, or pretrained_path)")
    pretrained_path: Optional[str] = _key(None, "local weights file (.safetensors / .pth) for backbone_type")
    backbone_kwargs: dict = _key(None, "extra timm.create_model arguments (depth, patch_size, ...)",
                                 default_factory=dict)
    lora_rank: int = _key(10, "rank of each task's adapter", ANY_LORA, check=_positive)
    growth_schedule: Optional[list] = _key(
        None, "tasks that get an adapter of their own (a fixed growth schedule, e.g. [0, 1, 2, 4, 6, 8]); "
        "null: every task", ("sdlora", "sdlora_rr"), check=_growth_schedule)
    skip_mode: Literal["none", "reuse"] = _key(
        "none", "what a task without an adapter of its own trains besides magnitudes and head: nothing "
        "(\"none\") or the latest earlier adapter, reopened (\"reuse\")", ("sdlora", "sdlora_rr", "gumbel_sdlora"))
    drift_threshold: Optional[float] = _key(
        None, "growth on drift: a task first reuses the latest adapter for trial_epochs and gets its own only if "
        "that moved the earlier classes' logits on its images by more than this (relative); null: off",
        ("sdlora", "sdlora_rr"), check=_positive)
    trial_epochs: int = _key(1, "growth on drift: epochs of the reuse trial before the decision",
                             ("sdlora", "sdlora_rr"), check=_positive)
    probe_images: int = _key(256, "growth on drift: the task's first this many training images (test transform) "
                             "on which the drift is measured", ("sdlora", "sdlora_rr"), check=_positive)
    rank_schedule: Optional[list] = _key(
        None, "SD-LoRA-RR: [[first_task, rank], ...]; sdlora_rr defaults to [[0,10],[4,8],[8,6]]",
        LORA_METHODS, check=_rank_schedule)
    lora_targets: list[str] = _key(None, "slices of attn.qkv that get adapters", ANY_LORA,
                                   default_factory=lambda: ["q", "v"], check=_targets)
    direction_norm: Literal["factors", "frobenius"] = _key(
        "factors", "old adapters divided by ||A||_F*||B||_F or by ||BA||_F", LORA_METHODS)
    alpha_init: Optional[float] = _key(None, "initial magnitude (default 0.8 SD-LoRA, 1.0 Gumbel)", LORA_METHODS,
                                     check=_positive)
    alpha_reset_each_task: bool = _key(True, "re-initialise every alpha at each new task", LORA_METHODS)
    intrinsic_dim: Optional[int] = _key(
        None, "SubLoRA: each task's LoRA factors are theta_0 + P z with z of this many numbers, all that trains "
        "and is stored (null: plain LoRA)", SUBSPACE, check=_positive)
    allocation_mode: Literal["uniform", "fixed", "learned"] = _key(
        "uniform", "SubLoRA: how z feeds A and B: one projection for both, a fixed split (allocation_ratio), or a "
        "split learned per block", SUBSPACE)
    allocation_ratio: float = _key(0.5, "SubLoRA fixed allocation: d_B / intrinsic_dim", SUBSPACE,
                                   check=lambda v: None if 0 < v < 1 else "must be in (0, 1)")
    subspace_lr: Optional[float] = _key(
        None, "SubLoRA: learning rate of z and the split logits (default: lrate); P is an isometry, so an SGD "
        "step moves the factors by lr times the gradient's projection onto the subspace", SUBSPACE, check=_positive)
    adapter_strategy: Literal["auto", "stacked", "merged", "loop"] = _key(
        "auto", "how the adapter sum is computed in training (auto: cost model per shape)", ANY_LORA)

    # --- optimisation ----------------------------------------------------------------------
    optimizer: Literal["sgd", "adam", "adamw"] = _key("sgd", "optimiser")
    momentum: float = _key(0.9, "SGD momentum", check=_non_negative)
    lrate: float = _key(8e-3, "learning rate", check=_positive)
    weight_decay: float = _key(0.0, "weight decay", check=_non_negative)
    scheduler: Literal["constant", "cosine", "multistep", "coda_cosine"] = _key(
        "constant", "learning-rate schedule per task (coda_cosine: CODA-Prompt's / InfLoRA's, lr cos(99 pi e / "
        "(200 (K - 1))) over the K epochs)")
    min_lr: float = _key(0.0, "cosine: final learning rate", check=_non_negative)
    milestones: list[int] = _key(None, "multistep: epochs at which lr *= lrate_decay", default_factory=list)
    lrate_decay: float = _key(0.1, "multistep decay factor", check=_non_negative)
    epochs: int = _key(20, "epochs per task", check=_positive)
    batch_size: int = _key(128, "training batch size", check=_positive)
    eval_batch_size: Optional[int] = _key(None, "evaluation batch size (default 2 x batch_size)", check=_positive)
    init_epoch: Optional[int] = _key(None, "task 0 epochs (default: epochs)", check=_positive)
    init_lr: Optional[float] = _key(None, "task 0 learning rate (default: lrate)", check=_positive)
    init_milestones: Optional[list[int]] = _key(None, "task 0 milestones (default: milestones)")
    init_lr_decay: Optional[float] = _key(None, "task 0 decay (default: lrate_decay)", check=_non_negative)
    init_weight_decay: Optional[float] = _key(None, "task 0 weight decay (default: weight_decay)",
                                              check=_non_negative)
    seed_per_sample: bool = _key(
        False, "training order and each image's augmentation drawn from (seed, task, epoch, image): the same "
        "images whatever num_workers or the number of torchrun processes (required under torchrun)")
    mask_old_logits: bool = _key(True, "tasks > 0: cross-entropy over the current task's logits only")
    amp: bool = _key(False, "bf16 autocast (CUDA only)")
    compile: bool = _key(False, "torch.compile the backbone (CUDA only)")
    tf32: bool = _key(True, "allow TF32 matmuls on CUDA")

    # --- Gumbel CL-LoRA (SPEC section 3) ---------------------------------------------------
    gumbel_tau_init: float = _key(5.0, "initial temperature", GUMBEL, check=_positive)
    gumbel_tau_final: float = _key(0.5, "final temperature", GUMBEL, check=_positive)
    gumbel_tau_schedule: Literal["step", "phase"] = _key(
        "step", "step: tau_final + (tau_init - tau_final) * rate**s over optimiser steps s (the notes'); "
        "phase: geometric from tau_init to tau_final over the phase, whatever its number of steps", GUMBEL)
    gumbel_anneal_rate: float = _key(0.999, "step schedule: tau decays by this factor per optimiser step", GUMBEL,
                                     check=_fraction)
    lambda_sparsity: float = _key(0.1, "weight of the entropy sparsity term", GUMBEL, check=_non_negative)
    sparsity_eps: float = _key(1e-8, "eps inside log(beta + eps)", GUMBEL, check=_positive)
    gate_scope: Literal["all", "previous", "new"] = _key(
        "all", "all: gate every active adapter; previous: only old ones; new: only the new adapter, against a "
        "skip option, old adapters anchored at the gate value their own task ended with", GUMBEL)
    gate_granularity: Literal["task", "layer"] = _key("task", "one beta for all blocks, or one per block", GUMBEL)
    two_phase: bool = _key(True, "phase 1 selection, then phase 2 magnitudes and new adapter", GUMBEL)
    phase1_fraction: float = _key(0.6, "share of epochs in phase 1 (rounded up)", GUMBEL, check=_fraction)
    warmup_fraction: float = _key(0.0, "share of epochs (rounded up) that train the new adapter ungated (g = 1) "
                                  "with alphas and head, before phase 1 judges it", GUMBEL, check=_warmup)
    growth_cost: float = _key(0.0, "phase 1 price of the new adapter: loss += growth_cost * its gate value "
                              "(nats per unit of gate)", GUMBEL, check=_non_negative)
    selection_holdout: float = _key(0.0, "share of each new class's training images kept out of the warm-up "
                                    "and used alone, head frozen, by phase 1 to judge the new adapter "
                                    "(0: phase 1 trains on the task's whole data)", GUMBEL, check=_holdout)
    retrain: Literal["none", "skip", "all"] = _key(
        "none", "after the growth decision, restart the task (head, magnitudes, new adapter as it found them) and "
        "train the chosen structure for all epochs: never, when the new adapter was pruned, or always", GUMBEL)
    cost_by_share: bool = _key(False, "with skip_mode reuse: divide growth_cost by the number of tasks the "
                               "adapter a skip would reopen already serves", GUMBEL)
    gate_lr: Optional[float] = _key(None, "learning rate of the gate logits (default: lrate)", GUMBEL,
                                    check=_positive)
    alpha_lr: float = _key(0.04, "phase 2 learning rate of alpha", GUMBEL, check=_positive)
    lambda_alpha: float = _key(1e-4, "phase 2 weight of sum(alpha^2)", GUMBEL, check=_non_negative)
    prune_rule: Literal["threshold", "frequency"] = _key("threshold", "how the growth decision is made", GUMBEL)
    growth_threshold: float = _key(1e-6, "threshold rule: prune if beta <= this", GUMBEL, check=_non_negative)
    prune_samples: int = _key(10, "frequency rule: Gumbel samples", GUMBEL, check=_positive)
    prune_threshold: float = _key(0.2, "frequency rule: prune if selection frequency < this", GUMBEL,
                                  check=_non_negative)
    prune_scope: Literal["all", "new"] = _key("all", "which adapters may be pruned", GUMBEL)

    # --- SD-LoRA-KD (SPEC section 4) -------------------------------------------------------
    kd_threshold: float = _key(0.5, "drop the new adapter when its direction's least-squares fit onto the "
                               "earlier directions has a relative residual below this", KD, check=_non_negative)

    # --- a method's own keys (declared in its models/ file) ----------------------------------
    method_keys: Any = field(default=None, repr=False, metadata={"help": "", "methods": (), "check": None})

    def __getattr__(self, name: str) -> Any:
        """A method's own keys read as attributes (cfg.lamb), like the shared ones."""
        own = self.__dict__.get("method_keys")
        if own is not None and name in {f.name for f in dataclasses.fields(own)}:
            return getattr(own, name)
        raise AttributeError(f"'Config' has no key '{name}'")

    def to_dict(self) -> dict:
        """Every key, shared and the method's own, flat (as config.json stores it)."""
        d = dataclasses.asdict(self)
        d.update(d.pop("method_keys") or {})
        return d

    @property
    def workers(self) -> int:
        """num_workers, or by default the CPU cores this process may use (at most 8)."""
        if self.num_workers is not None:
            return self.num_workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return min(8, cores)

    @property
    def progress_disabled(self) -> Optional[bool]:
        """tqdm's ``disable``: None lets tqdm switch bars off when the output is not a terminal."""
        return None if self.progress == "auto" else not self.progress

    @property
    def seeds(self) -> list[int]:
        return list(self.seed) if isinstance(self.seed, list) else [self.seed]


#: Keys of the published configs that mean nothing here, with what to do instead.
RENAMED = {
    "filepath": 'use "log_dir": every run writes masks and beta logs into its own run folder',
    "convnet_type": 'use "backbone_type"',
    "tuned_epoch": 'use "epochs" (and "init_epoch" for task 0)',
    "lr": 'use "lrate"',
}

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
    """Every registered method's spec. The one place the schema asks the registry: importing ``models``
    makes every method register itself."""
    import models  # noqa: F401  (models/__init__ imports the method files)
    return METHOD_SPECS


def _own_fields(name: str) -> dict:
    spec = method_specs().get(name)
    return {f.name: f for f in dataclasses.fields(spec.keys)} if spec and spec.keys else {}


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a JSON value matches a schema type hint (ints are accepted where floats are)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if hint is list:
        return isinstance(value, list)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    raise TypeError(f"unsupported schema type {hint!r}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


HINTS = typing.get_type_hints(Config)
DEFAULTS = Config()


def _unknown_key_message(key: str) -> str:
    if key in RENAMED:
        return f"config key '{key}' is not used here: {RENAMED[key]}"
    owners = [m for m in method_specs() if key in _own_fields(m)]
    if owners:
        return f"config key '{key}' belongs to model_name {', '.join(repr(m) for m in owners)}; remove it"
    near = difflib.get_close_matches(key, list(FIELDS) + sorted({k for m in method_specs() for k in _own_fields(m)}),
                                     n=1, cutoff=0.6)
    hint = f" Did you mean '{near[0]}'?" if near else " See utils/config.py for every key."
    return f"unknown config key '{key}'.{hint}"


def _check_value(key: str, value: Any, f, hint) -> Optional[str]:
    if not _type_ok(value, hint):
        return f"config key '{key}' = {json.dumps(value)} should be {_describe(hint)}"
    problem = f.metadata["check"](value) if f.metadata["check"] else None
    return f"config key '{key}' = {json.dumps(value)} {problem}" if problem else None


def build_config(raw: dict) -> Config:
    """Check a dict of keys against the schema (the shared keys here, the method's own from its file) and
    return the resolved Config, or raise ConfigError."""
    specs = method_specs()
    name = raw.get("model_name", DEFAULTS.model_name)
    if name not in specs:
        raise ConfigError(f"config key 'model_name' = {json.dumps(name)} should be one of "
                          f"{', '.join(json.dumps(m) for m in sorted(specs))}")
    spec, own = specs[name], _own_fields(name)
    own_hints = typing.get_type_hints(spec.keys) if spec.keys else {}
    errors, shared, mine = [], {}, {}
    for key, value in raw.items():
        if key in FIELDS:
            problem = _check_value(key, value, FIELDS[key], HINTS[key])
            shared[key] = value
        elif key in own:
            problem = _check_value(key, value, own[key], own_hints[key])
            mine[key] = value
        else:
            problem = _unknown_key_message(key)
        if problem:
            errors.append(problem)
    if errors:
        raise ConfigError("\n".join(errors))
    cfg = Config(**shared, method_keys=spec.keys(**mine) if spec.keys else None)
    errors = [  # a method key set away from its default would silently do nothing: refuse it
        f"config key '{key}' is not used by model_name '{cfg.model_name}' (it belongs to "
        f"{', '.join(FIELDS[key].metadata['methods'])}); remove it"
        for key in shared
        if FIELDS[key].metadata["methods"] and cfg.model_name not in FIELDS[key].metadata["methods"]
        and key not in spec.uses and shared[key] != getattr(DEFAULTS, key)
    ]
    errors += _cross_checks(cfg, raw)
    if spec.check is not None:
        errors += spec.check(cfg, raw)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def _cross_checks(cfg: Config, raw: dict) -> list[str]:
    errs = []
    if cfg.scheduler != "multistep" and (raw.get("milestones") or raw.get("init_milestones")):
        errs.append("config keys 'milestones'/'init_milestones' only apply to \"scheduler\": \"multistep\"")
    if cfg.scheduler != "cosine" and "min_lr" in raw and cfg.min_lr:
        errs.append("config key 'min_lr' only applies to \"scheduler\": \"cosine\"")
    d = DEFAULTS
    if cfg.optimizer != "sgd" and raw.get("momentum", d.momentum) != d.momentum:
        errs.append("config key 'momentum' only applies to \"optimizer\": \"sgd\"")
    if cfg.pretrained_path and not cfg.pretrained:
        errs.append("config key 'pretrained_path' is set but 'pretrained' is false; set pretrained to true")
    if cfg.model_name == "lora_task_id" and not cfg.mask_old_logits:
        errs.append("model_name 'lora_task_id' trains each task's head among its own classes: set "
                    "mask_old_logits to true")
    drift = cfg.drift_threshold is not None
    if cfg.model_name in ("sdlora", "sdlora_rr") and cfg.skip_mode != "none" and cfg.growth_schedule is None \
            and not drift:
        errs.append("config key 'skip_mode' applies to the tasks a 'growth_schedule' leaves without an adapter; "
                    "set growth_schedule (or drift_threshold) or remove skip_mode")
    if drift and (cfg.skip_mode != "reuse" or cfg.growth_schedule is not None):
        errs.append("config key 'drift_threshold' decides growth by a reuse trial: it needs \"skip_mode\": \"reuse\" "
                    "and no 'growth_schedule'")
    if drift and cfg.trial_epochs >= cfg.epochs:
        errs.append(f"config key 'trial_epochs' = {cfg.trial_epochs} must be below 'epochs' = {cfg.epochs}: the "
                    "trial is the first part of a task")
    for key in ("trial_epochs", "probe_images"):
        if not drift and raw.get(key, getattr(DEFAULTS, key)) != getattr(DEFAULTS, key):
            errs.append(f"config key '{key}' only applies with 'drift_threshold' set; remove it or set drift_threshold")
    errs += _subspace_checks(cfg, raw)
    if cfg.model_name == "gumbel_sdlora":
        if cfg.gumbel_tau_final > cfg.gumbel_tau_init:
            errs.append("config key 'gumbel_tau_final' must be <= 'gumbel_tau_init'")
        if raw.get("prune_samples", d.prune_samples) != d.prune_samples and cfg.prune_rule != "frequency":
            errs.append("config key 'prune_samples' only applies to \"prune_rule\": \"frequency\"")
        if raw.get("prune_threshold", d.prune_threshold) != d.prune_threshold and cfg.prune_rule != "frequency":
            errs.append("config key 'prune_threshold' only applies to \"prune_rule\": \"frequency\"")
        e_w = math.ceil(cfg.warmup_fraction * cfg.epochs)
        e_1 = math.ceil(cfg.phase1_fraction * cfg.epochs)
        # task 0 is single-phase; a kept new adapter must train somewhere: in a warm-up or in phase 2
        if cfg.two_phase and (e_w + e_1 > cfg.epochs or (e_w == 0 and e_1 >= cfg.epochs)):
            errs.append(f"config key 'epochs' = {cfg.epochs} with warmup_fraction {cfg.warmup_fraction} and "
                        f"phase1_fraction {cfg.phase1_fraction} leaves phase 2 no epoch ({e_w} warm-up + {e_1} "
                        "phase 1), so new adapters never train; raise 'epochs' or lower the fractions")
        if cfg.gumbel_tau_schedule == "phase" and \
                raw.get("gumbel_anneal_rate", d.gumbel_anneal_rate) != d.gumbel_anneal_rate:
            errs.append("config key 'gumbel_anneal_rate' only applies to \"gumbel_tau_schedule\": \"step\"")
        if cfg.growth_cost and cfg.gate_scope == "previous":
            errs.append('config key \'growth_cost\' prices the new adapter\'s gate value, but "gate_scope": '
                        '"previous" does not gate it; use "gate_scope": "all" or "new"')
        if cfg.skip_mode == "reuse" and cfg.two_phase and cfg.retrain == "none" and e_w + e_1 >= cfg.epochs:
            errs.append('"skip_mode": "reuse" trains the reopened adapter in phase 2, but the warm-up and '
                        "phase 1 leave phase 2 no epoch; lower warmup_fraction or phase1_fraction, or set retrain")
        if cfg.cost_by_share and (cfg.skip_mode != "reuse" or not cfg.growth_cost):
            errs.append('config key \'cost_by_share\' divides growth_cost by how many tasks share the adapter a '
                        'skip reopens: it needs "skip_mode": "reuse" and a growth_cost > 0')
        if cfg.selection_holdout and cfg.warmup_fraction == 0:
            errs.append("config key 'selection_holdout' keeps images out of the warm-up, but 'warmup_fraction' "
                        "is 0 (no warm-up, phase 1 judges an untrained adapter); set a warmup_fraction or "
                        "remove selection_holdout")
        if cfg.gate_scope == "new" and cfg.gate_granularity == "layer":
            errs.append('"gate_scope": "new" anchors one gate value per adapter: use "gate_granularity": "task"')
        if not cfg.two_phase:
            for key in ("phase1_fraction", "alpha_lr", "lambda_alpha", "warmup_fraction", "selection_holdout",
                        "skip_mode", "retrain"):
                if raw.get(key, getattr(d, key)) != getattr(d, key):
                    errs.append(f"config key '{key}' only applies with \"two_phase\": true; remove it or "
                                "set two_phase to true")
        if cfg.prune_scope == "new" and cfg.gate_scope == "previous":
            errs.append('"prune_scope": "new" with "gate_scope": "previous" can never prune (the new adapter '
                        'is not gated); use "prune_scope": "all" or "gate_scope": "all"')
        if raw.get("growth_threshold", d.growth_threshold) != d.growth_threshold and cfg.prune_rule != "threshold":
            errs.append("config key 'growth_threshold' only applies to \"prune_rule\": \"threshold\"")
    return errs


def _subspace_checks(cfg: Config, raw: dict) -> list[str]:
    """SubLoRA keys: the allocation keys need intrinsic_dim, and a subspace adapter is never reopened."""
    d, errs = DEFAULTS, []
    if cfg.intrinsic_dim is None:
        for key in ("allocation_mode", "allocation_ratio", "subspace_lr"):
            if raw.get(key, getattr(d, key)) != getattr(d, key):
                errs.append(f"config key '{key}' shapes the SubLoRA subspace: set 'intrinsic_dim' or remove it")
        return errs
    if raw.get("allocation_ratio", d.allocation_ratio) != d.allocation_ratio and cfg.allocation_mode != "fixed":
        errs.append('config key \'allocation_ratio\' only applies to "allocation_mode": "fixed"')
    d_b = int(round(cfg.allocation_ratio * cfg.intrinsic_dim))
    if cfg.allocation_mode == "fixed" and not 1 <= d_b <= cfg.intrinsic_dim - 1:
        errs.append(f"allocation_ratio {cfg.allocation_ratio} of intrinsic_dim {cfg.intrinsic_dim} leaves A or B "
                    "no coordinate; pick a ratio nearer 0.5 or a larger intrinsic_dim")
    if cfg.skip_mode == "reuse":
        errs.append('config key \'intrinsic_dim\' with "skip_mode": "reuse": a reopened adapter has no '
                    "subspace of its own; use skip_mode none or plain LoRA")
    return errs


def parse_value(text: str) -> Any:
    """Command-line values are JSON where they parse (numbers, booleans, lists), plain strings otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict:
    """``--key value`` and ``--key=value`` pairs into a dict; raises ConfigError on a stray token."""
    out, i = {}, 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"unexpected argument '{tok}': overrides are written --key value")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{tok}' has no value: write {tok} VALUE")
            key, value = tok[2:], args[i + 1]
            i += 2
        out[key.replace("-", "_")] = parse_value(value)
    return out


def load_config(path: Optional[str], overrides: Optional[dict] = None) -> Config:
    """Read a JSON config file (or none), apply overrides (the command line wins), and check it."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file '{path}' is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a JSON object of keys")
    raw.update(overrides or {})
    return build_config(raw)


def describe_keys() -> str:
    """Every key with its default, its help line and (if not every method) the methods it belongs to;
    then each method's own keys, declared in its file."""
    lines = []
    for name, f in FIELDS.items():
        methods = f.metadata["methods"]
        scope = f" [{', '.join(methods)}]" if methods and methods != LORA_METHODS else ""
        lines.append(f"{name:24s} {json.dumps(getattr(DEFAULTS, name)):38s} {f.metadata['help']}{scope}")
    for method in sorted(method_specs()):
        for name, f in _own_fields(method).items():
            lines.append(f"{name:24s} {json.dumps(f.default):38s} {f.metadata['help']} [{method}]")
    return "\n".join(lines)


def check_device(cfg: Config, device_type: str) -> None:
    """amp and compile are CUDA features: refuse them elsewhere rather than silently run without."""
    if device_type != "cuda" and (cfg.amp or cfg.compile):
        raise ConfigError(f"config keys 'amp' and 'compile' need a CUDA device, but the run is on "
                          f"'{device_type}'; set them to false")
