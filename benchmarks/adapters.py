"""Adapter cost versus the number of tasks, side by side in one run.

For t adapters (t-1 frozen + the current one) and each way of computing the adapter sum, prints the
training-step time (forward + backward + SGD step on the trainable tensors), the eval-batch time,
peak training memory, and each one's ratio to a plain frozen ViT measured in the same run.

    python benchmarks/adapters.py                                   # vit_tiny @224, small default
    python benchmarks/adapters.py --model vit_base_patch16_224 --tasks 1 10 20 --batch 4
    python benchmarks/adapters.py --device cuda --amp --batch 128   # GPU, bf16

Variants: ``plain`` (frozen ViT, no adapters: the floor; its backward runs through the backbone to
the input, as the adapter runs' does), ``loop`` (the published per-adapter loop, the reference),
``stacked``, ``merged`` and ``auto`` (the framework's default: stacked or merged by a cost model).
Eval: the framework merges the adapters into qkv (one cached weight); ``loop`` evaluates with the
per-adapter loop, as the published code does.

Memory. On CUDA: torch.cuda.max_memory_allocated. On CPU, where torch keeps no allocator statistics:
parameters + gradients + the tensors autograd saves for backward (unique storages), i.e. what the
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

VARIANTS = ("plain", "loop", "stacked", "merged", "auto")


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


def time_it(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(args, variant: str, n_tasks: int) -> dict:
    model = build(args, variant, n_tasks)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(0, 100, (args.batch,), device=args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.amp else torch.autocast("cpu", enabled=False)
    xin = x.clone().requires_grad_(variant == "plain")  # the floor's backward must cross the backbone too

    def train_step():
        model.train()
        with amp:
            loss = nn.functional.cross_entropy(model(xin).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    reference_eval = variant == "loop"

    @torch.no_grad()
    def eval_step():
        if reference_eval:   # the published code's eval: the per-adapter loop, no merge
            model.train()
        else:
            model.eval()
        with amp:
            model(x)

    train_ms = time_it(train_step, args.device, args.warmup, args.repeats)
    eval_ms = time_it(eval_step, args.device, args.warmup, args.repeats)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        train_step()
        peak = torch.cuda.max_memory_allocated()
    else:
        saved = SavedBytes()
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            with amp:
                loss = nn.functional.cross_entropy(model(xin).float(), y)
        static = sum(p.numel() * p.element_size() for p in model.parameters())
        static += sum(b.numel() * b.element_size() for b in model.buffers())
        grads = sum(p.numel() * p.element_size() for p in params)
        peak = static + grads + saved.total
        del loss
    return {"train": train_ms, "eval": eval_ms, "peak": peak / 2**20}


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
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.amp and not args.device.startswith("cuda"):
        ap.error("--amp needs --device cuda")

    print(f"# {args.model} img {args.img_size} batch {args.batch} rank {args.rank} device {args.device}"
          f"{' bf16' if args.amp else ''} threads {torch.get_num_threads()} torch {torch.__version__}")
    plain = measure(args, "plain", 0) if "plain" in args.variants else None
    rows = {}
    print(f"{'t':>3} {'variant':8} {'train ms':>9} {'x plain':>8} {'eval ms':>8} {'x plain':>8} "
          f"{'peak MB':>8} {'x t=first':>9}")
    for t in args.tasks:
        for v in args.variants:
            r = plain if v == "plain" else measure(args, v, t)
            rows[(t, v)] = r
            first = rows.get((args.tasks[0], v), r)
            rt = f"{r['train'] / plain['train']:8.3f}" if plain else "       -"
            re_ = f"{r['eval'] / plain['eval']:8.3f}" if plain else "       -"
            print(f"{t:3d} {v:8} {r['train']:9.1f} {rt} {r['eval']:8.1f} {re_} {r['peak']:8.1f} "
                  f"{r['peak'] / first['peak']:9.3f}", flush=True)

    last, first = args.tasks[-1], args.tasks[0]
    if plain and (last, "auto") in rows:
        a = rows[(last, "auto")]
        print(f"\n# targets at t={last} (framework = auto):")
        print(f"train step / plain        {a['train'] / plain['train']:.3f}   (target <= 1.10)")
        worst = max(rows[(t, 'auto')]['eval'] / plain['eval'] for t in args.tasks if (t, 'auto') in rows)
        print(f"eval batch / plain (max)  {worst:.3f}   (target <= 1.02)")
        print(f"peak memory t={last} / t={first}  {a['peak'] / rows[(first, 'auto')]['peak']:.3f}   (target <= 1.05)")
        if (last, "loop") in rows:
            print(f"loop / framework, train   {rows[(last, 'loop')]['train'] / a['train']:.2f}x  (target >= 3)")


if __name__ == "__main__":
    main()
