"""torchrun support: one process per device, gradients averaged by DistributedDataParallel.

Outside torchrun (no WORLD_SIZE in the environment) every helper is a no-op for one process, so the
single-process path has no distributed code in it. Rank 0 alone writes files and logs. torch is imported where a
helper needs it, so that the file helpers built on ``is_main`` (utils/io.py) cost a process without torch (the sweep
driver) nothing.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

from utils.config import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


def launched() -> bool:
    """Whether this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _group() -> Optional[Any]:
    """torch.distributed where its process group is up, else None (a process that never imported it has none)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def init(device_type: str) -> None:
    """Join the process group torchrun describes: nccl on GPUs, gloo on CPU."""
    import torch.distributed as dist
    if launched() and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=30))


def shutdown() -> None:
    if (dist := _group()) is not None:
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if (dist := _group()) is not None else 1


def rank() -> int:
    return dist.get_rank() if (dist := _group()) is not None else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if world() > 1:
        _group().barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's value of a picklable object, on every rank (decisions taken once, shared)."""
    if world() == 1:
        return obj
    box = [obj]
    _group().broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list:
    """Every rank's object, in rank order, on every rank."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    _group().all_gather_object(out, obj)
    return out


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor (in place, returned)."""
    if world() > 1:
        dist = _group()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable tensors of ``module`` (the module itself for one process).

    Built anew for each training phase, since what trains changes between phases and tasks.
    ``find_unused_parameters``: a phase may leave some trainable tensors out of a step (a pruned
    adapter's magnitude); buffers are not broadcast, every rank derives them from the same parameters.
    """
    if world() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)


def resolve_device(spec) -> torch.device:
    """'auto', 'cpu', 'cuda', 'cuda:N', or the field's ["0"]; a missing GPU is an error, not a fallback.
    Under torchrun each process takes the GPU of its LOCAL_RANK ('auto' or 'cuda')."""
    import torch
    if launched():
        if spec not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"config key 'device' = {spec!r} under torchrun: use \"auto\", \"cuda\" (each process "
                              "takes the GPU of its LOCAL_RANK) or \"cpu\"")
        if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError("config key 'device' = 'cuda' but no CUDA GPU is visible; use \"cpu\" or \"auto\"")
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    if isinstance(spec, list):
        if len(spec) != 1:
            raise ConfigError(f"config key 'device' = {spec}: one device per run; multi-GPU is not supported")
        spec = spec[0]
    if spec.isdigit():
        spec = f"cuda:{spec}"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"config key 'device' = '{spec}' is not a device (use auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' = '{spec}' but no CUDA GPU is visible; use \"cpu\" or \"auto\"")
    return dev
