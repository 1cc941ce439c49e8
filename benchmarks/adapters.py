"""Adapter cost versus the number of tasks, side by side in one run.

For t adapters (t-1 frozen + the current one) and each way of computing the adapter sum, prints the
training-step time (forward + backward + SGD step on the trainable tensors), the eval-batch time,
peak training memory, and each one's ratio to a plain frozen ViT measured in the same run.

    python benchmarks/adapters.py                                   # vit_tiny @224, small default
    python benchmarks/adapters.py --model vit_base_patch16_224 --tasks 1 10 20 --batch 4
    python benchmarks/adapters.py --device cuda --amp --batch 128   # GPU, bf16

Variants: ``plain`` (frozen ViT, no adapters: the floor; its backward runs through the backbone to
the input, as the adapter runs' does), ``loop`` (the published per-adapter loop, the reference),
``stacked``, ``merged``, ``fused`` and ``auto`` (the framework's default: the cost model's pick).
``--profile VARIANT ...`` adds torch.profiler's top ops of two training steps of each at the last task count.
Eval: the framework merges the adapters into qkv (one cached weight, built once per evaluation and
not timed per batch); ``loop`` evaluates with the per-adapter loop, as the published code does.

Memory. On CUDA: torch.cuda.max_memory_allocated. On CPU, where torch keeps no allocator statistics:
parameters, buffers and the tensors autograd saves for backward (unique storages) + gradients: what the
training step holds at its peak; it is exact for what grows with the number of tasks.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbone.gate import AdapterGate  # noqa: E402
from backbone.vit import LoRAViT, create_vit  # noqa: E402

VARIANTS = ("plain", "loop", "stacked", "merged", "fused", "auto")


def build(args, variant: str, n_tasks: int) -> nn.Module:
    """A ViT with ``n_tasks`` adapters (all but the last frozen), random non-zero B, and a head."""
    torch.manual_seed(0)
    vit = create_vit(args.model, False, None, args.img_size, {})
    strategy = "auto" if variant == "plain" else variant
    net = LoRAViT(vit, AdapterGate(len(vit.blocks)), ("q", "v"), "factors", strategy)
    if variant != "plain":
        for t in range(n_tasks):
            net.add_task(t, args.rank, 0.8)
            with torch.no_grad():
                for layer in net.layers:
                    layer.lora_B[str(t)].normal_(std=0.02)
            net.configure()
            if t < n_tasks - 1:
                net.freeze_current()
    head = nn.Linear(net.num_features, 100)
    return nn.Sequential(net, head).to(args.device)


class SavedBytes:
    """Bytes of the unique storages autograd saves during a forward (the activation memory)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        self.storages[st.data_ptr()] = st.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return 1000 * (time.perf_counter() - t0)


class Case:
    """One variant at one task count: its model, a training step, an eval batch, its peak memory."""

    def __init__(self, args, variant: str, n_tasks: int):
        self.args, self.variant = args, variant
        self.model = build(args, variant, n_tasks)
        self.x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
        self.y = torch.randint(0, 100, (args.batch,), device=args.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=1e-3, momentum=0.9)
        self.amp = (torch.autocast("cuda", dtype=torch.bfloat16) if args.amp
                    else torch.autocast("cpu", enabled=False))
        # the floor's backward must cross the backbone too, as the adapter runs' does
        self.xin = self.x.clone().requires_grad_(variant == "plain")
        self.train_ms: list[float] = []
        self.eval_ms: list[float] = []

    def loss(self):
        self.model.train()
        with self.amp:
            return nn.functional.cross_entropy(self.model(self.xin).float(), self.y)

    def train_step(self) -> None:
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def prepare_eval(self) -> None:
        """Merge once, as an evaluation does once per test set (a training step un-merges)."""
        if self.variant != "loop":
            self.model.eval()
            self.model[0].merge()

    @torch.no_grad()
    def eval_step(self) -> None:
        if self.variant == "loop":   # the published code's eval: the per-adapter loop, no merge
            self.model.train()
        else:
            self.model.eval()
        with self.amp:
            self.model(self.x)

    def peak_mb(self) -> float:
        if self.args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.train_step()
            return torch.cuda.max_memory_allocated() / 2**20
        saved = SavedBytes()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = self.loss()
        del loss
        for t in list(self.model.parameters()) + list(self.model.buffers()):  # unique storages: views count once
            saved.pack(t)
        grads = sum(p.numel() * p.element_size() for p in self.params)
        return (grads + saved.total) / 2**20


def measure_all(args, cases: list[Case]) -> None:
    """Warm up every case, then time them interleaved, round after round, so that the machine's
    drift (other load, clocks, caches) falls on every variant alike."""
    for c in cases:
        for _ in range(args.warmup):
            c.train_step()
            c.eval_step()
    for _ in range(args.repeats):
        for c in cases:
            c.train_ms.append(_timed(c.train_step, args.device))
        for c in cases:
            c.prepare_eval()
            c.eval_ms.append(_timed(c.eval_step, args.device))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name (random init)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 5, 10, 20])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", nargs="*", default=[], choices=VARIANTS, metavar="VARIANT",
                    help="after the table: torch.profiler's top ops of two training steps of these variants at "
                         "the last --tasks")
    ap.add_argument("--profile-rows", type=int, default=15)
    args = ap.parse_args(argv)
    if args.amp and not args.device.startswith("cuda"):
        ap.error("--amp needs --device cuda")

    print(f"# {args.model} img {args.img_size} batch {args.batch} rank {args.rank} device {args.device}"
          f"{' bf16' if args.amp else ''} threads {torch.get_num_threads()} torch {torch.__version__}")
    print(f"{'t':>3} {'variant':8} {'train ms':>9} {'(min)':>7} {'x plain':>8} {'eval ms':>8} {'x plain':>8} "
          f"{'peak MB':>8} {'x t=first':>9}")
    rows = {}
    for t in args.tasks:
        cases = [Case(args, v, t) for v in args.variants]
        measure_all(args, cases)
        by = {c.variant: c for c in cases}
        base = by.get("plain")
        for c in cases:
            r = {"train": statistics.median(c.train_ms), "train_min": min(c.train_ms),
                 "eval": statistics.median(c.eval_ms), "peak": c.peak_mb()}
            rows[(t, c.variant)] = r
            first = rows.get((args.tasks[0], c.variant), r)
            rt = f"{r['train'] / statistics.median(base.train_ms):8.3f}" if base else "       -"
            re_ = f"{r['eval'] / statistics.median(base.eval_ms):8.3f}" if base else "       -"
            print(f"{t:3d} {c.variant:8} {r['train']:9.1f} {r['train_min']:7.1f} {rt} {r['eval']:8.1f} {re_} "
                  f"{r['peak']:8.1f} {r['peak'] / first['peak']:9.3f}", flush=True)
        if base:
            for c in cases:
                rows[(t, c.variant)]["train_ratio"] = rows[(t, c.variant)]["train"] / statistics.median(base.train_ms)
                rows[(t, c.variant)]["eval_ratio"] = rows[(t, c.variant)]["eval"] / statistics.median(base.eval_ms)
        del cases, by, base

    last, first = args.tasks[-1], args.tasks[0]
    if (last, "plain") in rows and (last, "auto") in rows:
        a = rows[(last, "auto")]
        print(f"\n# targets at t={last} (framework = auto), ratios to plain measured in the same rounds:")
        print(f"train step / plain        {a['train_ratio']:.3f}   (target <= 1.10)")
        worst = max(rows[(t, 'auto')]['eval_ratio'] for t in args.tasks)
        print(f"eval batch / plain (max)  {worst:.3f}   (target <= 1.02)")
        print(f"peak memory t={last} / t={first}  {a['peak'] / rows[(first, 'auto')]['peak']:.3f}   (target <= 1.05)")
        if (last, "loop") in rows:
            print(f"loop / framework, train   {rows[(last, 'loop')]['train'] / a['train']:.2f}x  (target >= 3)")
    for variant in args.profile:
        profile(args, variant, last)


def profile(args, variant: str, n_tasks: int) -> None:
    """torch.profiler's table of the ops that take the most time in two training steps (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    case = Case(args, variant, n_tasks)
    for _ in range(args.warmup):
        case.train_step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    with torch_profile(activities=acts) as prof:
        for _ in range(2):
            case.train_step()
        _sync(args.device)
    key = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    print(f"\n# profile: {variant}, t={n_tasks}, two training steps, top ops by {key}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.profile_rows))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.cli import run
    sys.exit(run(main))
