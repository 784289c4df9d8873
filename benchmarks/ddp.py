"""What all-reducing AlexNet's gradients costs under DDP, and whether bucket size or compression helps.

    python benchmarks/ddp.py [--processes 2] [--batch 32] [--steps 4]

Starts N processes (gloo on the CPU; NCCL with --cuda, one GPU each) and measures, in the same run:
  all-reduce of the fc6-fc8 gradients (58.6M floats) and of the conv gradients (2.3M) alone;
  a DDP training step of the paper preset (global batch --batch) with 25 MB buckets (DDP's default),
  100 MB buckets, each with gradients as views into the buckets (no copy into them), fp16 and bf16
  compression hooks, and without communication (no_sync) as the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from alexnet.model.net import build_model


def timed(fn, steps: int, device: torch.device) -> float:
    """Median seconds of one call, over `steps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(rank: int, world: int, store: str, args: argparse.Namespace, results: dict) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    device = torch.device("cuda", rank) if args.cuda else torch.device("cpu")
    dist.init_process_group("nccl" if args.cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = build_model("paper", 1000, init="caffe").to(device)
    fc = torch.zeros(sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier")), device=device)
    conv = torch.zeros(sum(p.numel() for n, p in model.named_parameters() if n.startswith("features")), device=device)
    out = {
        f"all-reduce fc grads ({fc.numel() / 1e6:.1f}M floats)": timed(lambda: dist.all_reduce(fc), args.steps, device),
        f"all-reduce conv grads ({conv.numel() / 1e6:.1f}M floats)": timed(
            lambda: dist.all_reduce(conv), args.steps, device
        ),
    }
    x = torch.randn(args.batch // world, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch // world,), device=device)
    for name, bucket_mb, views, hook in (
        ("DDP step, 25 MB buckets (default)", 25, False, None),
        ("DDP step, 100 MB buckets", 100, False, None),
        ("DDP step, 25 MB buckets, bucket views", 25, True, None),
        ("DDP step, 100 MB buckets, bucket views", 100, True, None),
        ("DDP step, fp16 compression hook", 25, False, default_hooks.fp16_compress_hook),
        ("DDP step, bf16 compression hook", 25, False, default_hooks.bf16_compress_hook),
        ("step without communication (no_sync)", 25, False, "no_sync"),
    ):
        ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_mb, gradient_as_bucket_view=views)
        if callable(hook):
            ddp.register_comm_hook(None, hook)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.001, momentum=0.9)

        def step(ddp=ddp, optimizer=optimizer, hook=hook) -> None:
            optimizer.zero_grad(set_to_none=True)
            if hook == "no_sync":
                with ddp.no_sync():
                    F.cross_entropy(ddp(x), y).backward()
            else:
                F.cross_entropy(ddp(x), y).backward()
            optimizer.step()

        out[name] = timed(step, args.steps, device)
    if rank == 0:
        results.update(out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="global batch of the DDP steps")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, (args.processes, os.path.join(tmp, "store"), args, results), nprocs=args.processes)
        results = dict(results)
    floor = results["step without communication (no_sync)"]
    print(f"{args.processes} processes, {'NCCL' if args.cuda else 'gloo, CPU'}, global batch {args.batch}")
    print(f"{'measure':<44} {'seconds':>9} {'vs no_sync':>11}")
    for name, seconds in results.items():
        ratio = f"{seconds / floor:.2f}x" if name.startswith(("DDP", "step")) else ""
        print(f"{name:<44} {seconds:>9.3f} {ratio:>11}")


if __name__ == "__main__":
    main()
