"""Where a training step's time goes: what each of the paper network's departures from torchvision's costs.

    python benchmarks/step_profile.py [--batch-size 512] [--precision auto] [--steps 10] [--rounds 3] [--only band,...]

In one process, in rounds that alternate between them (the median round kept), the training images/s
of alexnet.train.step.TrainStep (augmentation, forward, backward, SGD) on images already on the device for:
  paper                  the paper preset as `alexnet train` runs it (LRN's Triton kernels on CUDA,
                         torch.compile's on the CPU), but eager: every line below but one is, so that
                         the host's time per step shows
  paper, compiled LRN    on CUDA: LRN in torch.compile's kernels instead of the Triton ones
  paper, band LRN        on CUDA: LRN in the band kernels (window sums on tensor cores), a candidate
  paper, LRN's exact log on CUDA: LRN's kernels with tl.log's polynomial, not lg2 in the special-function unit
  paper, model compiled  on CUDA: the whole model through torch.compile (`alexnet train --compile`)
  paper, CUDA graph      on CUDA: forward, backward and SGD replayed from a CUDA graph (train's default)
  paper, PyTorch's pool  on CUDA: max pooling in PyTorch's kernels instead of the Triton ones
  paper, grouped convs   on CUDA: conv2, conv4, conv5 as cuDNN's grouped convolutions, not dense ones
  paper, conv towers     on CUDA: conv2, conv4, conv5 as a plain convolution per tower, not dense ones
  paper, conv1 3 chans   on CUDA: conv1 as it is written, 3 input channels (cuDNN pads them to 8)
  paper, conv1 8 chans   on CUDA: conv1's input padded to 8 channels by us, not as 4x4 blocks of pixels
  paper, bias+ReLU apart on CUDA: each convolution's bias and ReLU as PyTorch's modules, not one operation
  paper, LRN with bias   on CUDA: conv1 and conv2's bias, ReLU and LRN in LRN's kernels, not LRN apart (fuse_lrn)
  paper, band LRN with bias  the same in the band kernels (a candidate)
  paper, eager LRN       the same with LRN's eager formulas
  paper, no LRN          LRN layers removed
  paper, groups=1        one tower: conv2, conv4 and conv5 see all their input channels
  paper, LRN across towers  LRN's window across both towers' maps (Caffe's; the paper's GPUs each
                         normalised their own): one launch of LRN's kernels each way, not one per tower
  torchvision            the torchvision preset
  augmentation only      alexnet.data.augment.train_batch alone
with the time the host takes to enqueue each step (where it nears the step's time, the host limits
and CUDA graphs would help); then LRN and max pooling alone, forward and backward on the paper
network's activations, by kernels, against the least memory traffic each needs; each convolution
alone in each of its forms, against its arithmetic (on CUDA these layers are replayed from a CUDA
graph, as the training step is by default: their device time, not the host's); and the kernels of
the paper step that take the most device time, its time by PyTorch operation and its copies by shape
(torch.profiler).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from alexnet.data import augment
from alexnet.data.augment import make_pixel_stats, train_batch
from alexnet.errors import first_line
from alexnet.model import bias_relu, lrn, pool
from alexnet.model.lrn import KERNELS as LRN_KERNELS
from alexnet.model.lrn import PAPER_LRN, LocalResponseNorm
from alexnet.model.net import AlexNet, CeilConv2d, Conv2d, GroupedConv2d, build_model
from alexnet.model.pool import KERNELS as POOL_KERNELS
from alexnet.model.pool import MaxPool2d
from alexnet.train.step import TrainStep, make_optimizer, pick_device, resolve_precision, tune_for


def make_step(
    model: nn.Module, device: torch.device, precision: str, batch: int, compile: bool = False, graph: bool = False
):
    model = model.to(device).to(memory_format=torch.channels_last)
    model = torch.compile(model) if compile else model
    optimizer = make_optimizer(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    stats = make_pixel_stats(torch.full((3, 256, 256), 0.45), torch.eye(3) * 0.05, scale="imagenet").to(device)
    step = TrainStep(model, optimizer, stats, 224, 0.1, precision, True, cuda_graph=graph)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    gen = torch.Generator().manual_seed(0)
    dtype = step.dtype if step.autocast else torch.float32  # the batch's type as the step makes it
    return lambda: step(images, labels, gen), lambda: train_batch(images, stats, gen, cuda_dtype=dtype)


def without_lrn(model: nn.Module) -> nn.Module:
    for i, m in enumerate(model.features):
        if isinstance(m, LocalResponseNorm):
            model.features[i] = nn.Identity()
    return model


def set_on(model: nn.Module, kind: type, **attributes) -> nn.Module:
    """The model with `attributes` set on each of its modules of type `kind` (e.g. LRN's kernels)."""
    for m in model.modules():
        if isinstance(m, kind):
            for name, value in attributes.items():
                setattr(m, name, value)
    return model


@contextlib.contextmanager
def exact_lrn_logs():
    """LRN's Triton kernels with tl.log's polynomial instead of the special-function unit's lg2 meanwhile."""
    from alexnet.kernels import lrn as lrn_triton

    fast, lrn_triton.FAST_LOG = lrn_triton.FAST_LOG, False
    try:
        yield
    finally:
        lrn_triton.FAST_LOG = fast


def with_exact_lrn_logs(step):
    def run():
        with exact_lrn_logs():
            return step()

    return run


class BiasReLULRN(nn.Module):
    """A convolution's bias, its ReLU and LRN on the convolution's output: as the model runs them on
    CUDA by default ("apart": bias_relu.bias_relu, then LRN) or as one ("together", fuse_lrn=True); "band
    ...": the same with LRN in the band kernels (a candidate)."""

    def __init__(self, channels: int, kernels: str) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(channels))
        self.lrn = LocalResponseNorm(PAPER_LRN, "triton-band" if kernels.startswith("band") else None)
        self.together = kernels.endswith("together")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.together:
            return bias_relu.bias_relu_lrn(x, self.bias, self.lrn)
        return self.lrn(bias_relu.bias_relu(x, self.bias))


def layers_alone(device: torch.device, dtype: torch.dtype, batch: int, steps: int) -> None:
    """ms per forward + backward of LRN and of max pooling on the paper network's activations, by
    kernels, and the bandwidth that implies for the least traffic each needs: LRN reads x and writes y,
    then reads x and the gradient and writes dx; a pool reads x, writes y, reads y's gradient, writes dx.
    On CUDA also bias, ReLU and LRN together and apart (the least traffic: LRN's). A multiplication by
    1.5, forward and backward, on conv1's output is the reference: what bandwidth such a layer can reach."""
    print(f"\nLayers alone, forward + backward, {dtype}, channels_last, batch {batch}:")
    cuda = device.type == "cuda"
    exact = ", exact log"  # kernels named so run with tl.log (exact_lrn_logs)
    lrn_kinds = [*LRN_KERNELS, "triton" + exact]
    layers = [  # name, input shape, the layer with given kernels, its kernels, least bytes per unit of x
        ("lrn1 (conv1)", (batch, 96, 55, 55), lambda k: LocalResponseNorm(PAPER_LRN, k), lrn_kinds, 5.0),
        ("lrn2 (conv2)", (batch, 256, 27, 27), lambda k: LocalResponseNorm(PAPER_LRN, k), lrn_kinds, 5.0),
        # a reference for the GB/s an elementwise layer gets here: y = 1.5 x, dx = 1.5 g, in PyTorch's kernels
        ("x * 1.5", (batch, 96, 55, 55), lambda k: lambda x: x * 1.5, ["pytorch"], 4.0),
        ("pool1", (batch, 96, 55, 55), lambda k: MaxPool2d(3, 2, k), POOL_KERNELS, 2 * (1 + 27**2 / 55**2)),
        ("pool2", (batch, 256, 27, 27), lambda k: MaxPool2d(3, 2, k), POOL_KERNELS, 2 * (1 + 13**2 / 27**2)),
        ("pool5", (batch, 256, 13, 13), lambda k: MaxPool2d(3, 2, k), POOL_KERNELS, 2 * (1 + 6**2 / 13**2)),
    ]
    if cuda:
        ways = ("together", "apart", "band together", "band apart")
        layers += [
            ("b+r+lrn1", (batch, 96, 55, 55), lambda k: BiasReLULRN(96, k).to(device), ways, 5.0),
            ("b+r+lrn2", (batch, 256, 27, 27), lambda k: BiasReLULRN(256, k).to(device), ways, 5.0),
        ]
    for name, shape, layer, kinds, per_x in layers:
        x = torch.rand(shape, device=device).mul(60).to(dtype).contiguous(memory_format=torch.channels_last)
        least = per_x * x.numel() * x.element_size()
        for kernels in kinds if cuda else [k for k in kinds if not k.startswith("triton")]:
            with exact_lrn_logs() if kernels.endswith(exact) else contextlib.nullcontext():
                seconds = seconds_per_pass(layer(kernels.removesuffix(exact)), x, steps, device)
            print(f"  {name:<13} {kernels:<18} {seconds * 1e3:8.2f} ms  {least / seconds / 1e9:7.0f} GB/s")


def convolutions_alone(device: torch.device, precision: str, batch: int, steps: int) -> None:
    """ms per forward + backward of each of the paper network's convolutions, in each form the model can
    give it (conv1's input layouts; towers as cuDNN's grouped convolutions or dense ones), and the rate
    of the layer's own arithmetic that implies (2 flops per product; not the zeros a form adds)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    print(f"\nConvolutions alone, forward + backward, {precision}, channels_last, batch {batch}:")

    def towers(i: int, o: int, k: int, pad: int) -> dict[str, nn.Module]:
        return {form: GroupedConv2d(i, o, k, 1, pad, groups=2, form=form) for form in GroupedConv2d.FORMS}

    convs = [  # name, input shape, its forms, whether its input's gradient is computed (not for images)
        ("conv1", (3, 224, 224), {f: CeilConv2d(3, 96, 11, 4, layout=f) for f in CeilConv2d.LAYOUTS}, False),
        ("conv2", (96, 27, 27), towers(96, 256, 5, 2), True),
        ("conv3", (256, 13, 13), {"full": Conv2d(256, 384, 3, 1, 1)}, True),
        ("conv4", (384, 13, 13), towers(384, 384, 3, 1), True),
        ("conv5", (384, 13, 13), towers(384, 256, 3, 1), True),
    ]
    for name, shape, forms, input_grad in convs:
        x = torch.randn(batch, *shape, device=device).to(dtype or torch.float32)
        x = x.contiguous(memory_format=torch.channels_last)
        for form, conv in forms.items():
            conv = conv.to(device, memory_format=torch.channels_last)
            seconds = seconds_per_pass(conv, x, steps, device, dtype, input_grad)
            with torch.no_grad():  # per image: outputs x (inputs / groups x k x k)
                products = conv(torch.zeros(1, *shape, device=device)).numel() * conv.weight[0].numel()
            flops = 2 * products * batch * (3 if input_grad else 2)  # forward, weight gradient, input gradient
            print(f"  {name:<6} {form:<15} {seconds * 1e3:8.2f} ms  {flops / seconds / 1e12:7.1f} TFLOP/s")


def seconds_per_pass(
    module: nn.Module,
    x: torch.Tensor,
    steps: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
    input_grad: bool = True,
) -> float:
    """Seconds per forward + backward of `module` on `x`, after 3 passes to warm up (compiling, autotuning).

    On CUDA the pass is replayed from a CUDA graph, as the training step runs by default: the device's
    time alone. Launched from Python, a small layer's time is the host's (pool5 in the Triton kernels
    took 0.63 ms per pass so on an H100, its kernels a fraction of that)."""

    def in_autocast() -> contextlib.AbstractContextManager:
        dtype, on = autocast or torch.bfloat16, autocast is not None
        return torch.autocast(device.type, dtype, enabled=on, cache_enabled=False)  # casts inside a capture

    def one_pass() -> None:
        with in_autocast():
            y = module(leaf)
        y.backward(g)

    with in_autocast():
        g = torch.randn_like(module(x))
    leaf = x.detach().requires_grad_(input_grad)
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    if cuda:
        side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side) if cuda else contextlib.nullcontext():  # a side stream, as captures ask
        for _ in range(3):
            one_pass()
    run = one_pass
    if cuda:
        torch.cuda.current_stream(device).wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                one_pass()
            run = graph.replay
        except Exception as e:  # time it as launched from Python, and say so
            print(f"  (not from a CUDA graph, so the host's time counts: {first_line(e)})")
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return (time.perf_counter() - start) / steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=10, help="steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kernels", type=int, default=15, help="how many of the costliest kernels to list")
    p.add_argument(
        "--only",
        help="the candidates whose names hold one of these, comma-separated (e.g. 'band,exact log'); paper always",
    )
    args = p.parse_args()
    device = pick_device(args.device)
    tune_for(device)
    precision = resolve_precision(args.precision, device)
    batch = args.batch_size
    torch.manual_seed(0)

    def paper_model() -> nn.Module:
        return build_model("paper", init="caffe")

    paper, augment_only = make_step(paper_model(), device, precision, batch)

    def paper_step(model: nn.Module, compile: bool = False, graph: bool = False):
        return make_step(model, device, precision, batch, compile, graph)[0]

    # built only where asked for (--only): some take a minute to compile
    makers: dict[str, Callable[[], Callable[[], object]]] = {"paper": lambda: paper}
    if device.type == "cuda":
        makers |= {
            "paper, compiled LRN": lambda: paper_step(set_on(paper_model(), LocalResponseNorm, kernels="compiled")),
            "paper, band LRN": lambda: paper_step(set_on(paper_model(), LocalResponseNorm, kernels="triton-band")),
            "paper, LRN's exact log": lambda: with_exact_lrn_logs(paper_step(paper_model())),
            "paper, model compiled": lambda: paper_step(paper_model(), compile=True),
        }
        if precision != "fp16":
            makers["paper, CUDA graph"] = lambda: paper_step(paper_model(), graph=True)
        makers |= {
            "paper, PyTorch's pool": lambda: paper_step(set_on(paper_model(), MaxPool2d, kernels="eager")),
            "paper, grouped convs": lambda: paper_step(set_on(paper_model(), GroupedConv2d, form="grouped")),
            "paper, conv towers": lambda: paper_step(set_on(paper_model(), GroupedConv2d, form="towers")),
            "paper, conv1 3 chans": lambda: paper_step(set_on(paper_model(), CeilConv2d, layout="plain")),
            "paper, conv1 8 chans": lambda: paper_step(set_on(paper_model(), CeilConv2d, layout="pad8")),
            "paper, bias+ReLU apart": lambda: paper_step(set_on(paper_model(), AlexNet, bias_relu_kernels="modules")),
            "paper, LRN with bias": lambda: paper_step(set_on(paper_model(), AlexNet, fuse_lrn=True)),
            "paper, band LRN with bias": lambda: paper_step(
                set_on(set_on(paper_model(), LocalResponseNorm, kernels="triton-band"), AlexNet, fuse_lrn=True)
            ),
        }
    makers |= {
        "paper, eager LRN": lambda: paper_step(set_on(paper_model(), LocalResponseNorm, kernels="eager")),
        "paper, no LRN": lambda: paper_step(without_lrn(paper_model())),
        "paper, groups=1": lambda: paper_step(build_model("paper", groups=1, init="caffe")),
        # LRN's window across both towers (Caffe's), one kernel launch each way instead of one per tower
        "paper, LRN across towers": lambda: paper_step(build_model("paper", init="caffe", lrn_per_tower=False)),
        "torchvision": lambda: paper_step(build_model("torchvision")),
        "augmentation only": lambda: augment_only,
    }
    only = [part.strip() for part in args.only.split(",")] if args.only else []
    candidates = {
        name: make()
        for name, make in makers.items()
        if name == "paper" or not only or any(part in name for part in only)
    }
    for name, step in list(candidates.items()):  # warm up: compilation, autotuning, the CUDA graph's capture
        try:
            for _ in range(5):
                step()
        except Exception as e:  # one candidate that fails should not cost the others' figures
            if name == "paper":  # the one the others are compared with
                raise
            print(f"{name}: failed, {type(e).__name__}: {(str(e) or '-').splitlines()[0]}")
            del candidates[name]
    rates: dict[str, list[float]] = {name: [] for name in candidates}
    host: dict[str, list[float]] = {name: [] for name in candidates}  # seconds per step to enqueue
    for _ in range(args.rounds):
        for name, step in candidates.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            host[name].append((time.perf_counter() - start) / args.steps)
            sync(device)
            rates[name].append(args.steps * batch / (time.perf_counter() - start))
    print(f"device {device}, batch {batch}, precision {precision}, torch {torch.__version__}")
    print("(host: the time the CPU takes to hand a step to the device; near the step's time, it limits)")
    base = statistics.median(rates["paper"])
    for name, r in rates.items():
        rate, enqueue = statistics.median(r), statistics.median(host[name]) * 1e3
        step_ms = batch / rate * 1e3
        print(f"{name:<25} {rate:>9.0f} images/s  {rate / base:5.2f}x paper  host {enqueue:6.1f} of {step_ms:6.1f} ms")
    # said in words without "Warning" (gpu_check.sh filters such lines): a kernel that fell back was not measured
    fell_back = {
        "LRN": list(lrn._UNUSABLE.items()),
        "max pool": pool._UNUSABLE,
        "bias and ReLU": bias_relu._UNUSABLE,
        "bias, ReLU and LRN": bias_relu._UNUSABLE_WITH_LRN,
        "augmentation": augment._TRITON_FAILED,
    }
    fell_back = {layer: why for layer, why in fell_back.items() if why}
    print(f"kernels that could not run here, so their fallbacks ran instead: {fell_back or 'none'}")

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    layers_alone(device, dtype, batch, args.steps)
    convolutions_alone(device, precision, batch, args.steps)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(3):
            paper()
        sync(device)
    events = prof.key_averages()
    spent = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if device.type == "cuda":
        print("\nthe paper step's kernels that take the most device time, over 3 steps:")
        print(events.table(sort_by=spent, row_limit=args.kernels, max_name_column_width=60))
    by_operation(events, spent, args.kernels)
    copies(prof.key_averages(group_by_input_shape=True), spent, args.kernels)


def copies(events, time: str, rows: int) -> None:
    """The step's copies (aten::copy_: casts, layout changes, the space-to-depth blocks) by the shapes
    they copy, costliest first: what the copies that by_operation adds up are of."""
    found = sorted(
        (e for e in events if e.key == "aten::copy_" and getattr(e, time) > 0), key=lambda e: -getattr(e, time)
    )
    print(f"\nthe paper step's copies by shape ({time.replace('_total', '')}, per step):")
    for e in found[:rows]:
        print(f"  {getattr(e, time) / 3e3:8.3f} ms  {e.count / 3:5.1f} calls  {e.input_shapes}")


def by_operation(events, time: str, rows: int) -> None:
    """Time per step by the PyTorch operation that launched it, each kernel counted once (self time):
    names what an anonymous kernel such as `elementwise_kernel<128, 2, ...>` computes."""
    ops = [e for e in events if e.key.startswith(("aten::", "alexnet::")) and getattr(e, time) > 0]
    ops.sort(key=lambda e: getattr(e, time), reverse=True)
    print(f"\nthe paper step by operation ({time.replace('_total', '')}, per step):")
    for e in ops[:rows]:
        print(f"  {e.key:<40} {getattr(e, time) / 3e3:8.3f} ms  {e.count / 3:5.1f} calls")


if __name__ == "__main__":
    main()
