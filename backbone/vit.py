"""Build a frozen timm ViT (hub, local file or random init) and put per-task adapters into it."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import timm
import torch
from torch import nn

from backbone.gate import AdapterGate
from backbone.lora import LoRAQKV, adapter_norm
from backbone.subspace import SubspaceAdapter, SubspaceSpec, stored_numbers


#: What ``adapter_tensors`` writes into a task's checkpoint (and ``load_adapter_tensors`` reads): keys with these
#: prefixes (plain factors and the owner, or SubLoRA's z, seed and split).
ADAPTER_KEYS = ("adapter.", "subspace.")


class BackboneError(ValueError):
    """A backbone that cannot be built: unknown name, missing or unreadable weights."""


def check_weights_file(path: str) -> None:
    """A ``pretrained_path`` must be a weights file timm can read: a safetensors file (named .safetensors) or a
    torch.save file; found out from its first bytes, before anything is built or written."""
    p = Path(path)
    fix = "give a .safetensors or .pth weights file of backbone_type, or null to load its weights from the hub"
    if not p.exists():
        raise BackboneError(f"config key 'pretrained_path' = '{path}' does not exist; {fix}")
    if not p.is_file():
        raise BackboneError(f"config key 'pretrained_path' = '{path}' is a folder, not a weights file; {fix}")
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise BackboneError(f"config key 'pretrained_path' = '{path}' cannot be read "
                            f"({e.strerror or e}); {fix}") from None
    if p.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            with safe_open(str(p), "pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for a bad header or a short file
            raise BackboneError(f"config key 'pretrained_path' = '{path}' is not a readable safetensors file "
                                f"({e}); {fix}") from None
    elif not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip, or a legacy pickle
        kind = "empty" if not head else "neither a safetensors file (named .safetensors) nor a torch.save file"
        raise BackboneError(f"config key 'pretrained_path' = '{path}' is {kind}; {fix}")


def check_backbone_inputs(name: str, pretrained: bool, pretrained_path: Optional[str]) -> None:
    """What can be told without building anything: the timm name exists, the weights file is one."""
    if not timm.is_model(name):
        near = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:5]
        raise BackboneError(f"unknown timm model '{name}' (config key backbone_type); similar: {near}")
    if pretrained and pretrained_path:
        check_weights_file(pretrained_path)


def create_vit(name: str, pretrained: bool, pretrained_path: Optional[str], img_size: int,
               kwargs: Optional[dict] = None) -> nn.Module:
    """A timm ViT with no classifier (num_classes=0): weights from the hub, a local file, or random."""
    check_backbone_inputs(name, pretrained, pretrained_path)
    args = dict(pretrained=pretrained, num_classes=0, img_size=img_size, **(kwargs or {}))
    if pretrained and pretrained_path:
        args["pretrained_cfg_overlay"] = dict(file=str(pretrained_path), custom_load=False)
    try:
        model = timm.create_model(name, **args)
    except TypeError as e:
        raise BackboneError(f"timm could not build '{name}' with {kwargs or {}} (config key backbone_kwargs): {e}")
    except Exception as e:  # a weights file timm cannot read raises KeyError, UnpicklingError, SafetensorError, ...
        where = pretrained_path or "the hub (needs internet; or set pretrained_path / pretrained false)"
        if not pretrained:
            raise BackboneError(f"timm could not build '{name}' with {kwargs or {}} (config key backbone_kwargs): "
                                f"{type(e).__name__}: {e}") from None
        raise BackboneError(f"could not load weights for '{name}' from {where}: {type(e).__name__}: {e}") from None
    if not hasattr(model, "blocks") or not len(model.blocks):
        raise BackboneError(f"'{name}' with {kwargs or {}} has no transformer blocks (config key backbone_kwargs): "
                            "a depth of at least 1 is needed")
    if not hasattr(getattr(model.blocks[0], "attn", None), "qkv"):
        raise BackboneError(f"'{name}' is not a ViT with fused attn.qkv layers")
    return model


def check_backbone(name: str, pretrained: bool, pretrained_path: Optional[str], img_size: int,
                   kwargs: Optional[dict] = None) -> None:
    """Build the backbone once and throw it away: an unknown name, bad kwargs or unreadable weights stop a run
    here, before its run folder exists. The random state is left as it was (a random-init build draws from it)."""
    with torch.random.fork_rng(devices=[]):
        create_vit(name, pretrained, pretrained_path, img_size, kwargs)


class LoRAViT(nn.Module):
    """A frozen ViT whose blocks' qkv carry per-task adapters weighted by a gate.

    ``forward`` returns pooled features. Each training forward asks the gate for the coefficients
    once (one Gumbel sample per step) and hands every block its row. In eval mode the adapters
    are merged into the qkv weights on the first forward and stay merged until ``train()``.
    """

    def __init__(self, vit: nn.Module, gate: AdapterGate, targets: Sequence[str] = ("q", "v"),
                 direction_norm: str = "factors", strategy: str = "auto"):
        super().__init__()
        self.vit = vit
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.layers: list[LoRAQKV] = []  # views into vit.blocks (a plain list: no duplicate state keys)
        for blk in self.vit.blocks:
            blk.attn.qkv = LoRAQKV(blk.attn.qkv, targets, direction_norm, strategy)
            self.layers.append(blk.attn.qkv)
        self.gate = gate
        self.subspace: Optional[SubspaceAdapter] = None  # the current adapter's z, when it trains in a subspace
        self.subspace_stored: dict[int, dict[str, torch.Tensor]] = {}  # finished subspace tasks: z, seed, split
        self.served_by: dict[int, int] = {}  # task -> the earlier adapter that trained on it (reopened, shared)
        self.last_beta: Optional[torch.Tensor] = None
        self._merged = False
        self._configure_later = False  # inside configure_once: configure() waits for the way out

    @property
    def num_features(self) -> int:
        return self.vit.num_features

    def add_task(self, task: int, rank: int, alpha_init: float, subspace: Optional[SubspaceSpec] = None) -> None:
        """Add task ``task``'s adapter to every block and make it the current, trainable one; with
        ``subspace``, its factors are theta_0 + P z and only z (and the split logits) train."""
        self.gate.add_task(task, alpha_init)
        for layer in self.layers:
            layer.add_adapter(task, rank)
        if subspace is not None:
            ref = self.layers[0].lora_A[str(task)]
            shapes = [(layer.lora_A[str(task)].shape, layer.lora_B[str(task)].shape) for layer in self.layers]
            self.subspace = SubspaceAdapter(shapes, subspace, ref.device, ref.dtype)
            self.subspace.task = task
        self.configure()

    def configure(self) -> None:
        """Push the gate's active set (mask, current) to every block; call after any change of it."""
        if self._configure_later:
            return
        frozen = self.gate.frozen_active()
        cur = self.gate.current if self.gate._current_active() else None
        for layer in self.layers:
            layer.configure(frozen, cur)
            layer.current_override = None
            if self.subspace is not None and cur == self.subspace.task:  # z trains, not the factors
                layer.lora_A[str(cur)].requires_grad_(False)
                layer.lora_B[str(cur)].requires_grad_(False)
        self.unmerge()

    @contextmanager
    def configure_once(self) -> Iterator[None]:
        """Inside, ``configure`` waits: the blocks are configured once, on the way out. For replaying many structure
        changes at once (restoring t tasks replays t of them; configuring after each, every one restacking every
        frozen adapter, made a restore quadratic in t)."""
        self._configure_later = True
        try:
            yield
        finally:
            self._configure_later = False
        self.configure()

    def freeze_current(self) -> None:
        """End of a task: the current adapter joins the frozen ones (norms computed once, here)."""
        self.materialize_subspace()
        self.gate.current = None
        self.configure()

    @torch.no_grad()
    def materialize_subspace(self) -> None:
        """A subspace adapter becomes plain factors (theta_0 + P z, written once); z, seed and split are kept
        for the checkpoint, the projection is freed."""
        sub = self.subspace
        if sub is None:
            return
        for layer, (A, B) in zip(self.layers, sub.factors()):
            layer.lora_A[str(sub.task)].data = A.clone()
            layer.lora_B[str(sub.task)].data = B.clone()
            if sub.spec.norm == "none":
                layer.norm_kind[sub.task] = "none"
        self.subspace_stored[sub.task] = {k: v.clone() for k, v in sub.stored().items()}
        self.subspace = None

    def reopen(self, task: int) -> None:
        """Make frozen adapter ``task`` the trainable one again (it serves the task now running).

        Its B is divided by the direction norm first, so the unnormalised product the current adapter
        uses equals the normalised direction it had while frozen: the network is unchanged by the switch.
        """
        with torch.no_grad():
            for layer in self.layers:
                A, B = layer.lora_A[str(task)], layer.lora_B[str(task)]
                norm = adapter_norm(A, B, layer.norm_of(task))
                A.data = A.data.clone()  # out of the frozen stack, which configure() rebuilds without it
                B.data = B.data / torch.where(norm > 0, norm, torch.ones_like(norm))[:, None, None]
        self.gate.current = task
        self.configure()

    # ---- adapter state: which adapter serves which task, a task's tensors and their loading -----------
    def serve(self, task: int, adapter: int) -> None:
        """Record that adapter ``adapter`` (an earlier one) trains on, and is saved with, task ``task``."""
        self.served_by[task] = adapter

    def owner(self, task: int) -> int:
        """The adapter that trained on task ``task``: its own, or the earlier one it reopened."""
        return self.served_by.get(task, task)

    def tasks_served(self, adapter: int) -> int:
        """How many tasks an adapter has trained on: its own and those that reopened it."""
        return 1 + sum(1 for k in self.served_by.values() if k == adapter)

    def has_adapter(self, task: int) -> bool:
        return bool(self.layers) and str(task) in self.layers[0].lora_A

    def adapter_tensors(self, task: int) -> dict[str, torch.Tensor]:
        """The tensors of the adapter that served task ``task``: plain factors per block, or (SubLoRA) the z,
        seed and split that rebuild them; {} for a task without adapters (the head-only probe)."""
        owner = self.owner(task)
        if owner in self.subspace_stored:
            t = dict(self.subspace_stored[owner])
        elif self.has_adapter(owner):
            t = {}
            for i, layer in enumerate(self.layers):
                t[f"adapter.{i}.A"] = layer.lora_A[str(owner)]
                t[f"adapter.{i}.B"] = layer.lora_B[str(owner)]
        else:
            return {}
        t["adapter.owner"] = torch.tensor(owner)
        return t

    @torch.no_grad()
    def load_adapter_tensors(self, task: int, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``adapter_tensors`` saved for task ``task`` (its adapter was added by add_task)."""
        if not self.has_adapter(task):
            return
        owner = int(tensors["adapter.owner"]) if "adapter.owner" in tensors else task
        if owner != task:
            self.serve(task, owner)
        if ("subspace.z" in tensors) != (self.subspace is not None):
            raise KeyError("subspace.z: the checkpoint and the config disagree on intrinsic_dim")
        if self.subspace is not None:  # the factors are rebuilt from z and the seed, as training wrote them
            self.subspace.load_stored(tensors)
            self.materialize_subspace()
            return
        for i, layer in enumerate(self.layers):
            layer.lora_A[str(owner)].copy_(tensors[f"adapter.{i}.A"])
            layer.lora_B[str(owner)].copy_(tensors[f"adapter.{i}.B"])

    def subspace_split(self, task: int) -> Optional[torch.Tensor]:
        """SubLoRA's learned split logits of task ``task``'s adapter (None: plain factors, or no split)."""
        return self.subspace_stored.get(task, {}).get("subspace.split")

    def _push_coefficients(self) -> None:
        w, beta = self.gate.coefficients()
        self.last_beta = beta
        for i, layer in enumerate(self.layers):
            layer.coeff = w[i if w.shape[0] > 1 else 0] if w is not None else None
        self._push_subspace()

    def _push_subspace(self) -> None:
        """The current subspace adapter's factors for this step, computed once for every block."""
        if self.subspace is not None and self.gate.current == self.subspace.task:
            for layer, factors in zip(self.layers, self.subspace.factors()):
                layer.current_override = factors

    @torch.no_grad()
    def _eval_rows(self) -> list[Optional[torch.Tensor]]:
        """Each block's coefficient row as evaluation uses it (deterministic gate; None: no adapter takes part)."""
        was = self.gate.training
        self.gate.eval()
        w, _ = self.gate.coefficients()
        self._push_subspace()
        self.gate.train(was)
        return [w[i if w.shape[0] > 1 else 0] if w is not None else None for i in range(len(self.layers))]

    def merge(self) -> None:
        """Fold the adapters into per-block qkv weights for inference (deterministic gate)."""
        with torch.no_grad():
            for layer, row in zip(self.layers, self._eval_rows()):
                layer.merge(row)
        self._merged = True

    def unmerge(self) -> None:
        for layer in self.layers:
            layer.unmerge()
        self._merged = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.unmerge()
        return self

    @contextmanager
    def pretrained_only(self) -> Iterator[None]:
        """The ViT as loaded, every adapter left out of the forward pass while inside (features in a space that
        does not move as adapters train: growth on novelty compares tasks there)."""
        for layer in self.layers:
            layer.bypass = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer.bypass = False

    def snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The adapters as the network evaluates them now, one low-rank triple per block, copied: ``viewing`` gives
        this backbone back later, whatever the adapters and magnitudes become (the first-session features)."""
        return [layer.snapshot(row) for layer, row in zip(self.layers, self._eval_rows())]

    @contextmanager
    def viewing(self, snapshot: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """Inside, every block computes with ``snapshot`` (from ``snapshot()``) instead of its live adapters."""
        for layer, view in zip(self.layers, snapshot, strict=True):
            layer.view = view
        try:
            yield
        finally:
            for layer in self.layers:
                layer.view = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._push_coefficients()
        elif not self._merged:
            self.merge()
        return self.vit(x)

    def adapter_param_count(self, tasks: Sequence[int]) -> int:
        """Stored parameters of the given adapters: LoRA factors over every block and slice, or, for a
        subspace adapter, its z and split logits."""
        def count(t: int) -> int:
            if t in self.subspace_stored:
                return stored_numbers(self.subspace_stored[t])
            return sum(layer.lora_A[str(t)].numel() + layer.lora_B[str(t)].numel() for layer in self.layers)
        return sum(count(t) for t in tasks)
