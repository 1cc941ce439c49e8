"""The shared config keys: each with its default, one line of help, the methods that use it and a value check.

The machinery that reads a config against this schema (types, cross-checks, method keys) is utils/config/reading.py.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

KD = ("sdlora_kd",)
LORA_METHODS = ("sdlora", "sdlora_rr", "sdlora_kd", "gumbel_sdlora")
PLAIN_LORA = ("seq_lora", "lora_task_id")  # the explainer's references: plain LoRA, no magnitudes
ANY_LORA = LORA_METHODS + PLAIN_LORA
SUBSPACE = ("sdlora", "sdlora_rr")  # methods whose adapters may train in a random subspace (SubLoRA)


#: The methods whose own classifier is a statistics head (``head: null`` means this one for them).
METHOD_HEADS = {"simplecil": "ncm", "ranpac": "ridge"}


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


def _positive_finite(v) -> Optional[str]:
    return None if v is None or 0 < v < float("inf") else "must be a number > 0 (and finite)"


def _non_negative(v) -> Optional[str]:
    return None if v is None or v >= 0 else "must be >= 0"


def _fraction(v) -> Optional[str]:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _open_unit(v) -> Optional[str]:
    return None if 0 < v < 1 else "must be in (0, 1)"


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
    protocol: Optional[str] = _key(None, "a protocol file (exps/protocols/*.json) whose keys are laid over this "
                                   "config, under the command line (--protocol FILE); recorded in config.json")

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
        None, "tasks whose train and test images are shown changed, as shift_kind says (a stream where some "
        "tasks need new features); [] for none", default_factory=list, check=_task_list)
    shift_kind: Literal["grey_invert", "rot180", "patch_shuffle"] = _key(
        "grey_invert", "what the shift_tasks show: \"grey_invert\" (greyscale, inverted: the colour statistics "
        "change), \"rot180\" (upside down: every pixel value kept, only the layout changes) or \"patch_shuffle\" "
        "(a 4 x 4 grid of tiles in a fixed shuffled order: pixel values kept, the object's layout lost)")
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
    need_threshold: Optional[float] = _key(
        None, "growth on need: a task trains a reuse trial and a new-adapter trial (trial_epochs each, on all but "
        "need_holdout of its images) and keeps the new adapter only if its held-out loss is lower by more than "
        "this (nats; may be negative); null: off", ("sdlora", "sdlora_rr"))
    need_signal: Literal["gain", "fit"] = _key(
        "gain", "growth on need: what need_threshold is compared with: \"gain\" (nats by which a new-adapter trial's "
        "held-out loss is below a reuse trial's; two trials) or \"fit\" (the reuse trial's held-out loss over "
        "ln(the task's classes), 1 = chance; one trial, and a task that grows trains its new adapter every epoch)",
        ("sdlora", "sdlora_rr"))
    novelty_threshold: Optional[float] = _key(
        None, "growth on novelty: a task gets its own adapter only if its images' mean middle-block token, in the "
        "pretrained backbone, is shifted from that of the tasks the latest adapter served by more than this (mean "
        "squared shift over their variance); else it reuses that adapter; no trial; null: off",
        ("sdlora", "sdlora_rr"), check=_positive)
    novelty_reference: Literal["latest", "nearest"] = _key(
        "latest", "growth on novelty: whose tasks a task's images are compared with: \"latest\" (the latest "
        "adapter's) or \"nearest\" (every adapter's, the least novelty counts: a task like any earlier adapter's "
        "tasks, e.g. a return to an earlier domain, is not novel); which adapter a task that does not grow reuses: "
        "novelty_reopen", ("sdlora", "sdlora_rr"))
    novelty_reopen: Literal["latest", "nearest"] = _key(
        "latest", "growth on novelty: the adapter a task that does not grow reopens and trains: \"latest\" (as "
        "every reuse rule) or \"nearest\" (the one its novelty was least against, so a return to an earlier "
        "domain trains that domain's adapter; needs novelty_reference \"nearest\"); max_share bounds the "
        "reopened adapter", ("sdlora", "sdlora_rr"))
    max_share: Optional[int] = _key(
        None, "growth on novelty: a task also gets its own adapter when the adapter it would reopen already serves "
        "this many tasks (a bound on reuse); null: no bound", ("sdlora", "sdlora_rr"), check=_positive)
    need_holdout: float = _key(0.2, "growth on need: share of each class's training images held out of the "
                               "trials to judge them", ("sdlora", "sdlora_rr"), check=_open_unit)
    trial_epochs: int = _key(1, "growth on drift or need: epochs of each trial before the decision",
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
    train_old_alphas: bool = _key(True, "the earlier adapters' magnitudes train on every later task (SD-LoRA); false: "
                                  "each alpha trains on its own task only, so an old class's features move only by "
                                  "the adapters added after it (less drift for a statistics head)", ("sdlora",))
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
    split_lr: Optional[float] = _key(
        None, "SubLoRA learned allocation: learning rate of the split logits alone (default: as z); the split only "
        "moves by the coordinates at each block's cut, so it may need a rate of its own", SUBSPACE, check=_positive)
    subspace_norm: Literal["direction_norm", "none"] = _key(
        "direction_norm", "SubLoRA: a frozen subspace adapter's direction divided by its norm as direction_norm says "
        "(SD-LoRA's normalise-at-freeze), or not at all (\"none\": it keeps its trained scale, n_i = 1)", SUBSPACE)
    adapter_strategy: Literal["auto", "fused", "stacked", "merged", "loop"] = _key(
        "auto", "how the adapter sum is computed in training (auto: fused on the CPU, merged on CUDA; "
        "backbone/lora.py)", ANY_LORA)

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

    # --- classifier heads from feature statistics (models/heads.py) ------------------------
    head: Optional[Literal["linear", "ncm", "ridge", "feature_ridge", "aligned"]] = _key(
        None, "the classifier a test image meets: \"linear\" (the learner's SGD-trained head), \"ncm\" (nearest "
        "class mean, cosine), \"ridge\" (RanPAC's ridge over a random ReLU projection, ranpac_dim wide), "
        "\"feature_ridge\" (ridge over the features themselves, from class means and one pooled scatter) or "
        "\"aligned\" (the linear head trained again after each task on samples of every class's Gaussian, SLCA); "
        "the statistics are taken after each task through that task's backbone, no image kept; null: the "
        "method's own (linear; simplecil ncm; ranpac ridge)")
    ranpac_dim: int = _key(10000, "head \"ridge\": M, the random projection's width (RanPAC's default 10,000); "
                           "G is M x M float64", check=_positive)
    ranpac_ridge: Optional[float] = _key(
        None, "head \"ridge\" (or first_session_head \"ridge\"): the ridge l at every task; null: each task's "
        "own, chosen as RanPAC does on that task's images (80 % fit, 20 % scored, 1e-8 .. 1e8), which on long "
        "streams of small tasks picks ridges that dent A_t (docs/long_streams.md)", check=_positive_finite)
    drift_compensation: Literal["none", "sdc", "linear"] = _key(
        "none", "heads \"ncm\", \"feature_ridge\" and \"aligned\": move the old classes' statistics by the drift the "
        "current task's images show between the backbone before the task and after it: \"sdc\" (each old mean by the "
        "Gaussian-weighted mean drift of the images near it, SDC) or \"linear\" (means and covariances through "
        "the least-squares affine map from old to new features, LDC)")
    sdc_sigma: float = _key(1.0, "drift_compensation \"sdc\": the bandwidth, in units of the root mean squared "
                            "distance from the task's images to the class means", check=_positive)
    align_samples: int = _key(256, "head \"aligned\": samples per class per epoch (SLCA's 256)", check=_positive)
    align_epochs: int = _key(5, "head \"aligned\": alignment epochs after each task (SLCA's 5)", check=_positive)
    align_lr: float = _key(0.01, "head \"aligned\": SGD learning rate of the alignment (cosine over its epochs)",
                           check=_positive)
    align_temperature: float = _key(0.1, "head \"aligned\": SLCA's logit normalisation temperature (0: off)",
                                    check=_non_negative)
    first_session_head: Optional[Literal["ridge", "feature_ridge"]] = _key(
        None, "a second statistics head over the features of the backbone as task 0 left it (a copy of its adapter "
        "sum: one adapter's numbers), whose old classes' statistics never drift; its logits add to those of "
        "\"head\" (which must be \"ridge\" or \"feature_ridge\": both regress one-hot targets, so one scale); "
        "evaluation runs the backbone twice; null: none")

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
    def head_kind(self) -> str:
        """The classifier in force: ``head``, or the method's own when it is null."""
        return self.head or METHOD_HEADS.get(self.model_name, "linear")

    @property
    def seeds(self) -> list[int]:
        return list(self.seed) if isinstance(self.seed, list) else [self.seed]


DEFAULTS = Config()
