"""What only a GPU can check; skipped without CUDA. benchmarks/gpu_check.sh runs these on an H100/H200."""

import pytest
import torch

from alexnet.data.augment import make_pixel_stats, ten_crop_batch, train_batch
from alexnet.model.lrn import PAPER_LRN, LocalResponseNorm
from alexnet.model.net import build_model
from alexnet.train.step import TrainStep, make_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

STATS = make_pixel_stats(torch.rand(3, 256, 256), torch.eye(3) * 0.02 + 0.01)


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (16, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_gpu_augmentation_equals_cpu(images):
    cpu = train_batch(images, STATS, torch.Generator().manual_seed(3))
    gpu = train_batch(images.cuda(), STATS.to("cuda"), torch.Generator().manual_seed(3))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-4)
    # the same arithmetic, rounded differently (measured on an H200: 1.5e-5 at most, on values up to 5)
    ten_gpu = ten_crop_batch(images.cuda(), STATS.to("cuda")).cpu()
    torch.testing.assert_close(ten_gpu, ten_crop_batch(images, STATS), rtol=1e-5, atol=1e-4)


def test_gpu_augmentation_runs_the_triton_kernel_and_falls_back_to_pytorch(images, monkeypatch):
    """The kernel by default (channels_last out); where it cannot run, PyTorch's operations, said once."""
    import alexnet.data.augment as augment_module
    from alexnet.kernels import augment as augment_triton

    calls = []
    real = augment_triton.train_crops
    monkeypatch.setattr(augment_triton, "train_crops", lambda *a: calls.append(1) or real(*a))
    cpu = train_batch(images, STATS, torch.Generator().manual_seed(4))
    gpu = train_batch(images.cuda(), STATS.to("cuda"), torch.Generator().manual_seed(4))
    assert calls == [1] and gpu.is_contiguous(memory_format=torch.channels_last)

    def too_old(*args):
        raise RuntimeError("Triton only supports GPUs of compute capability 7.0 or newer")

    monkeypatch.setattr(augment_triton, "train_crops", too_old)
    monkeypatch.setattr(augment_module, "_TRITON_FAILED", [])
    with pytest.warns(UserWarning, match="Triton kernel cannot run here.*compute capability") as caught:
        slow = [train_batch(images.cuda(), STATS.to("cuda"), torch.Generator().manual_seed(4)) for _ in range(2)]
    assert len(caught) == 1
    for batch in (gpu, *slow):
        torch.testing.assert_close(batch.cpu(), cpu, rtol=1e-5, atol=1e-4)
    # stored in bf16 for a bf16 step, by the kernel or the fallback: float32's values rounded once
    monkeypatch.setattr(augment_triton, "train_crops", real)
    monkeypatch.setattr(augment_module, "_TRITON_FAILED", [])
    half = train_batch(images.cuda(), STATS.to("cuda"), torch.Generator().manual_seed(4), cuda_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, gpu.to(torch.bfloat16))
    monkeypatch.setattr(augment_module, "_TRITON_FAILED", ["too old"])
    half = train_batch(images.cuda(), STATS.to("cuda"), torch.Generator().manual_seed(4), cuda_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, slow[0].to(torch.bfloat16))


@pytest.mark.parametrize("preset", ["paper", "torchvision"])
def test_bf16_logits_close_to_fp32(images, preset):
    model = build_model(preset, 1000, init="caffe" if preset == "paper" else None).cuda().eval()
    x = train_batch(images.cuda(), STATS.to("cuda"), torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert bf16.dtype == torch.bfloat16
    error = (bf16.float() - fp32).norm() / fp32.norm()
    assert error < 0.02, float(error)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_follows_fp32(images, precision):
    losses = {}
    for p in ("fp32", precision):
        torch.manual_seed(0)
        model = build_model("paper", 10, dropout=0.0, init="caffe").cuda().to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = TrainStep(model, optimizer, STATS.to("cuda"), 224, 0.1, p, True)
        labels = torch.arange(16, device="cuda") % 10
        losses[p] = [float(step(images.cuda(), labels, torch.Generator().manual_seed(i))[0]) for i in range(5)]
    assert losses[precision] == pytest.approx(losses["fp32"], rel=0.03)


LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
LRN_CASES = [  # every Triton case (the band kernels' a candidate); two of torch.compile's, each of which
    # compiles for a minute's part
    *[("triton", d, layout, c) for d in (torch.float32, torch.bfloat16) for layout in LAYOUTS for c in (96, 256)],
    *[("triton-band", d, "channels_last", c) for d in (torch.float32, torch.bfloat16) for c in (96, 256)],
    ("triton-band", torch.bfloat16, "nchw", 96),
    ("compiled", torch.bfloat16, "channels_last", 96),
    ("compiled", torch.float32, "nchw", 256),
]


@pytest.mark.parametrize(("kernels", "dtype", "layout", "channels"), LRN_CASES)
def test_fused_lrn_equals_eager_on_cuda(kernels, dtype, layout, channels):
    """LRN's Triton kernels (the default on CUDA; the band kernels, a candidate) and torch.compile's (the
    fallback where Triton's cannot run) give the eager formulas' values and gradients, for conv1's and
    conv2's numbers of channels. Here the Triton kernels' logs are lg2.approx (FAST_LOG), which the
    CPU tests cannot run: Triton's interpreter takes tl.log."""
    layout = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(8, channels, 27, 27, generator=gen) * 60).to("cuda", dtype).contiguous(memory_format=layout)
    g = torch.randn(x.shape, generator=gen).to("cuda", dtype).contiguous(memory_format=layout)
    got, want = {}, {}
    for name, out in ((kernels, got), ("eager", want)):
        xi = x.clone().requires_grad_()
        y = LocalResponseNorm(PAPER_LRN, kernels=name)(xi)
        (out["grad"],) = torch.autograd.grad(y, xi, g)
        out["y"] = y.detach()
    assert got["y"].dtype == dtype and got["y"].stride() == x.stride() and got["grad"].stride() == x.stride()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(got["y"], want["y"], **tol)
    torch.testing.assert_close(got["grad"], want["grad"], **tol)


@pytest.mark.parametrize("kernels", ["triton", "triton-band"])
@pytest.mark.parametrize(("dtype", "layout"), [(torch.bfloat16, "channels_last"), (torch.float32, "nchw")])
def test_per_tower_lrn_on_cuda_equals_eager(kernels, dtype, layout):
    """towers=2 (the paper preset's LRN): each tower's slice in its own kernel launch gives the eager
    formulas' values and gradients per tower (those checked against PyTorch's LRN on the CPU)."""
    layout = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(2)
    for channels in (96, 256):
        x = (torch.rand(8, channels, 27, 27, generator=gen) * 60).to("cuda", dtype).contiguous(memory_format=layout)
        g = torch.randn(x.shape, generator=gen).to("cuda", dtype).contiguous(memory_format=layout)
        got, want = {}, {}
        for name, out in ((kernels, got), ("eager", want)):
            xi = x.clone().requires_grad_()
            y = LocalResponseNorm(PAPER_LRN, kernels=name, towers=2)(xi)
            (out["grad"],) = torch.autograd.grad(y, xi, g)
            out["y"] = y.detach()
        assert got["y"].stride() == x.stride() and got["grad"].stride() == x.stride()
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
        torch.testing.assert_close(got["y"], want["y"], **tol)
        torch.testing.assert_close(got["grad"], want["grad"], **tol)


def test_lrn_on_cuda_uses_the_triton_kernels_by_default(monkeypatch):
    from alexnet.kernels import lrn as lrn_triton

    calls = []
    for name in ("forward", "backward"):
        real = getattr(lrn_triton, name)
        monkeypatch.setattr(lrn_triton, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    x = torch.rand(4, 96, 13, 13, device="cuda", requires_grad=True)
    LocalResponseNorm(PAPER_LRN)(x).sum().backward()
    with torch.no_grad():
        LocalResponseNorm(PAPER_LRN)(x)
    assert calls == ["forward", "backward", "forward"]


POOLS = {"pool1": (8, 96, 55, 55), "pool2": (8, 256, 27, 27), "pool5": (8, 256, 13, 13)}


@pytest.mark.parametrize("shape", POOLS.values(), ids=POOLS.keys())
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_max_pool_equals_pytorchs_on_cuda(dtype, layout, shape):
    """The paper's three pools: the same maxima, the gradient to the same inputs (ties included: bf16
    values from 0 to 1 tie often), summed in float32 as PyTorch's CUDA kernels do."""
    from alexnet.model.pool import MaxPool2d

    gen = torch.Generator().manual_seed(2)
    x = torch.rand(shape, generator=gen).to("cuda", dtype).contiguous(memory_format=layout)
    g = torch.randn(x.shape[:2] + ((x.shape[2] - 3) // 2 + 1,) * 2, generator=gen).to("cuda", dtype)
    got, want = {}, {}
    for name, out in (("triton", got), ("eager", want)):
        xi = x.clone().requires_grad_()
        y = MaxPool2d(3, 2, kernels=name)(xi)
        (out["grad"],) = torch.autograd.grad(y, xi, g.contiguous(memory_format=layout))
        out["y"] = y.detach()
    assert got["y"].stride() == want["y"].stride() and got["grad"].stride() == x.stride()
    assert torch.equal(got["y"], want["y"])
    # a wrongly routed gradient is off by a whole value; adding up to 4 windows in another order, by an ulp
    tol = {"rtol": 1.3e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-5}
    torch.testing.assert_close(got["grad"], want["grad"], **tol)


def test_max_pool_on_cuda_uses_the_triton_kernels_by_default(monkeypatch):
    from alexnet.kernels import pool as pool_triton

    calls = []
    for name in ("forward", "backward"):
        real = getattr(pool_triton, name)
        spy = lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k)  # noqa: E731
        monkeypatch.setattr(pool_triton, name, spy)
    model = build_model("paper", 10).cuda()
    model(torch.rand(2, 3, 224, 224, device="cuda")).sum().backward()
    assert calls == ["forward"] * 3 + ["backward"] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_grouped_convs_equal_cudnns_grouped_ones(dtype, monkeypatch):
    """conv2 of the paper preset as CUDA runs it by default (one dense convolution, block-diagonal
    weight), and as a convolution per tower, against cuDNN's grouped convolution: values and
    gradients, in channels_last."""
    from alexnet.model.net import GroupedConv2d

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the same arithmetic for all
    conv = build_model("paper").named_layers()["conv2"].cuda()
    assert isinstance(conv, GroupedConv2d) and conv.form is None
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 96, 27, 27, generator=gen).cuda().contiguous(memory_format=torch.channels_last)
    g = torch.randn(8, 256, 27, 27, generator=gen).cuda()
    results = {}
    for form in (None, "towers", "grouped"):
        conv.form = form
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = conv(xi)
        y.backward(g.to(y.dtype))
        assert y.is_contiguous(memory_format=torch.channels_last)
        results[form] = (y.detach().float(), xi.grad, conv.weight.grad, conv.bias.grad)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for form in (None, "towers"):
        for got, want in zip(results[form], results["grouped"], strict=True):
            scale = want.abs().max()  # the weight gradient sums 5832 products per element
            torch.testing.assert_close(got / scale, want / scale, **tol)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_steps_train_as_eager_steps_do(images, precision, monkeypatch):
    """8 steps replayed from a CUDA graph (after 3 eager ones) against 8 eager steps: the same losses and
    weight updates, with dropout reseeded each step as `alexnet train` does, a learning-rate change and
    a smaller batch (run eagerly) between the replays."""
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or replay(self))
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build_model("paper", 10, init="caffe").cuda().to(memory_format=torch.channels_last)
        start = [p.detach().clone() for p in model.parameters()]
        optimizer = make_optimizer(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        step = TrainStep(model, optimizer, STATS.to("cuda"), 224, 0.1, precision, True, cuda_graph=graphed)
        labels = torch.arange(16, device="cuda") % 10
        losses = []
        for i in range(8):
            torch.manual_seed(100 + i)  # this step's dropout masks
            if i == 6:
                optimizer.param_groups[0]["lr"] = 0.003
            n = 8 if i == 5 else 16
            losses.append(float(step(images[:n].cuda(), labels[:n], torch.Generator().manual_seed(i))[0]))
        updates = [p.detach() - p0 for p, p0 in zip(model.parameters(), start, strict=True)]
        runs[graphed] = losses, updates
    assert len(replays) == 4  # steps 4, 5, 7, 8: three warm up, the 6th is smaller
    assert isinstance(optimizer.param_groups[0]["lr"], float)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-3 if precision == "fp32" else 1e-2)
    for graphed, eager in zip(runs[True][1], runs[False][1], strict=True):
        assert (graphed - eager).norm() <= 1e-2 * eager.norm()


def test_train_with_cuda_graphs_equals_eager_training(imagenette_ci, tmp_path, capsys):
    """`alexnet train` on one GPU (CUDA graphs by default) end to end, epochs with a smaller last batch
    and validation between them: the same training losses and validation errors as without graphs."""
    import json

    from alexnet.train.config import TrainConfig
    from alexnet.train.loop import train

    metrics = {}
    for graphs in (False, None):
        cfg = TrainConfig(
            data=str(imagenette_ci),
            run_dir=str(tmp_path / f"graphs-{graphs}"),
            init="caffe",
            epochs=2,
            batch_size=64,
            workers=1,
            precision="fp32",
            cuda_graphs=graphs,
        )
        run = train(cfg, progress=False)
        said = capsys.readouterr().out
        assert ("CUDA graphs" in said) == (graphs is None), said
        metrics[graphs] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "val_loss"):
        assert [m[key] for m in metrics[None]] == pytest.approx([m[key] for m in metrics[False]], rel=5e-3)


def test_conv1_takes_its_input_as_blocks_of_pixels_on_cuda_under_autocast(monkeypatch):
    """The default on CUDA in bf16: conv1 runs as a 3x3 convolution over 48 channels of 4x4 pixel
    blocks, with the values and gradients of the plain one; "pad8" gives it 8 channels."""
    conv1 = build_model("paper").features[0].cuda().to(memory_format=torch.channels_last)
    shapes = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda x, w, *a: shapes.append(tuple(w.shape)) or real(x, w, *a))
    x = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    results = {}
    for layout in (None, "pad8", "plain"):
        conv1.layout = layout
        conv1.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = conv1(x)
        y.float().square().sum().backward()
        results[layout] = y.detach().float(), conv1.weight.grad.clone(), conv1.bias.grad.clone()
    assert shapes == [(96, 48, 3, 3), (96, 8, 11, 11), (96, 3, 11, 11)]
    for layout in (None, "pad8"):
        for got, want in zip(results[layout], results["plain"], strict=True):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2 * max(want.abs().max().item(), 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_band_kernels_with_a_bias_equal_pytorchs_operations_on_cuda(dtype):
    """fuse_lrn's operation with LRN in the band kernels (a candidate): relu(x + b) then the eager LRN's
    values and gradients (x's and b's), for conv1's and conv2's numbers of channels."""
    from alexnet.model.bias_relu import bias_relu_lrn

    gen = torch.Generator().manual_seed(2)
    for channels in (96, 256):
        x = (torch.randn(8, channels, 27, 27, generator=gen) * 40).to("cuda", dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        bias = (torch.randn(channels, generator=gen) * 20).to("cuda", dtype)
        g = torch.randn(x.shape, generator=gen).to("cuda", dtype).contiguous(memory_format=torch.channels_last)
        got, want = {}, {}
        for out, band in ((got, True), (want, False)):
            xi, bi = x.clone().requires_grad_(), bias.clone().requires_grad_()
            if band:
                y = bias_relu_lrn(xi, bi, LocalResponseNorm(PAPER_LRN, kernels="triton-band"), kernels="triton")
            else:
                y = LocalResponseNorm(PAPER_LRN, kernels="eager")(torch.relu(xi + bi.view(1, -1, 1, 1)))
            out["y"], (out["dx"], out["db"]) = y.detach(), torch.autograd.grad(y, (xi, bi), g)
        assert got["y"].stride() == x.stride() and got["dx"].stride() == x.stride()
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
        torch.testing.assert_close(got["y"], want["y"], **tol)
        torch.testing.assert_close(got["dx"], want["dx"], **tol)
        scale = want["db"].abs().max().item()  # a sum over 5,832 pixels
        torch.testing.assert_close(got["db"], want["db"], rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_and_relu_run_in_the_triton_kernels_by_default(dtype, monkeypatch):
    """On CUDA each convolution's bias and ReLU go through bias_relu_triton (once each way per
    convolution) and conv1's and conv2's LRN through lrn_triton's kernels after them; with fuse_lrn,
    the three through lrn_triton's kernels with a bias. The values and gradients of the modules one
    by one, in each case."""
    from collections import Counter

    from alexnet.kernels import bias_relu as bias_relu_triton
    from alexnet.kernels import lrn as lrn_triton

    calls = []

    def spy(module, name: str) -> None:
        real = getattr(module, name)

        def record(*args, **kwargs):
            with_bias = " with bias" if kwargs.get("bias") is not None else ""
            calls.append(f"{module.__name__.rsplit('.', 1)[-1]}.{name}{with_bias}")
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, record)

    spy(bias_relu_triton, "forward")
    spy(bias_relu_triton, "backward")
    spy(lrn_triton, "forward")
    spy(lrn_triton, "backward")
    spy(lrn_triton, "backward_with_bias")
    torch.manual_seed(0)
    model = build_model("paper", 10, init="caffe").cuda().eval().to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    expected = {
        "default": {
            "bias_relu_triton.forward": 5,
            "bias_relu_triton.backward": 5,
            "lrn_triton.forward": 2,
            "lrn_triton.backward": 2,
        },
        "fuse_lrn": {
            "lrn_triton.forward with bias": 2,
            "lrn_triton.backward_with_bias": 2,
            "bias_relu_triton.forward": 3,
            "bias_relu_triton.backward": 3,
        },
        "modules": {"lrn_triton.forward": 2, "lrn_triton.backward": 2},  # LRN alone, in its Triton kernels
    }
    results = {}
    for mode in expected:
        model.bias_relu_kernels = "modules" if mode == "modules" else None
        model.fuse_lrn = mode == "fuse_lrn"
        model.zero_grad()
        calls.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(x)
        logits.float().square().sum().backward()
        assert Counter(calls) == expected[mode], mode
        results[mode] = [logits.detach().float()] + [p.grad.clone() for p in model.parameters()]
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    for mode in ("default", "fuse_lrn"):
        for got, want in zip(results[mode], results["modules"], strict=True):
            torch.testing.assert_close(got, want, **{**tol, "atol": tol["atol"] * max(want.abs().max().item(), 1)})


def test_the_model_falls_back_to_pytorchs_bias_and_relu_where_triton_cannot_run(monkeypatch):
    """The model's default on CUDA, on a GPU Triton cannot build for: one warning, then PyTorch's
    operations, with the modules' values (kernels named explicitly would raise instead)."""
    import alexnet.model.bias_relu as bias_relu_module
    from alexnet.kernels import bias_relu as bias_relu_triton

    def too_old(*args):
        raise RuntimeError("Triton only supports GPUs of compute capability 7.0 or newer")

    monkeypatch.setattr(bias_relu_triton, "forward", too_old)
    monkeypatch.setattr(bias_relu_module, "_UNUSABLE", [])
    model = build_model("paper", 10, init="caffe").cuda().eval()
    x = torch.rand(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        with pytest.warns(UserWarning, match="Triton kernels cannot run here.*compute capability") as caught:
            got = model(x)
        model.bias_relu_kernels = "modules"
        want = model(x)
    assert len(caught) == 1
    torch.testing.assert_close(got, want)
