"""Local response normalization against naive references written here, one per convention
(docs/reference.md §3), and its float32 computation under autocast."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from alexnet.model.lrn import (
    CAFFE_LRN,
    CUDA_CONVNET_LRN,
    PAPER_LRN,
    LocalResponseNorm,
    LRNSpec,
    tensorflow_lrn,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # many small tensor ops: threads only contend


def naive_lrn(a: torch.Tensor, size: int, s: float, k: float, beta: float) -> torch.Tensor:
    """b_i = a_i / (k + s * sum_{j=max(0, i-lo)}^{min(C-1, i+hi)} a_j^2) ^ beta, in float64, loop over channels."""
    a = a.double()
    c = a.shape[1]
    lo, hi = size // 2, (size - 1) // 2
    out = torch.empty_like(a)
    for i in range(c):
        total = torch.zeros_like(a[:, 0])
        for j in range(max(0, i - lo), min(c - 1, i + hi) + 1):
            total += a[:, j] ** 2
        out[:, i] = a[:, i] / (k + s * total) ** beta
    return out


def tf_lrn_reference(x_nchw: torch.Tensor, depth_radius: int, bias: float, alpha: float, beta: float) -> torch.Tensor:
    """TensorFlow's documented formula, on channels-last data:
    sqr_sum[a, b, c, d] = sum(input[a, b, c, d - depth_radius : d + depth_radius + 1] ** 2)
    output = input / (bias + alpha * sqr_sum) ** beta"""
    inp = x_nchw.double().permute(0, 2, 3, 1)  # NHWC
    depth = inp.shape[-1]
    out = torch.empty_like(inp)
    for d in range(depth):
        window = inp[..., max(0, d - depth_radius) : d + depth_radius + 1]  # TF clips the window at 0
        sqr_sum = (window**2).sum(dim=-1)
        out[..., d] = inp[..., d] / (bias + alpha * sqr_sum) ** beta
    return out.permute(0, 3, 1, 2)


def _data(c: int = 16, scale: float = 30.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, c, 3, 4, generator=g) * scale


def _check(spec: LRNSpec, x: torch.Tensor, want: torch.Tensor) -> None:
    got = LocalResponseNorm(spec)(x)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    # the normalisation must actually matter for the comparison to mean something
    assert (want - x.double()).abs().max() > 0.05 * x.abs().max()


CASES = {
    "paper": (PAPER_LRN, 5, 1e-4, 2.0),  # s = alpha, k = 2
    "cuda-convnet": (CUDA_CONVNET_LRN, 5, 1e-4 / 5, 2.0),  # s = alpha / 5, k = 2
    "caffe": (CAFFE_LRN, 5, 1e-4 / 5, 1.0),  # s = alpha / 5, k = 1
    "tensorflow-r5": (tensorflow_lrn(5, 2.0, 1e-4, 0.75), 11, 1e-4, 2.0),  # 11 channels, s = alpha
}


@pytest.mark.parametrize("name", list(CASES))
def test_conventions_against_naive(name: str) -> None:
    spec, size, s, k = CASES[name]
    assert spec.size == size
    assert spec.scale == pytest.approx(s, rel=1e-12)
    assert spec.k == k and spec.beta == 0.75
    x = _data(scale=60.0)
    _check(spec, x, naive_lrn(x, size, s, k, 0.75))


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 11])
@pytest.mark.parametrize("over_size", [True, False])
def test_large_alpha_and_even_windows(size: int, over_size: bool) -> None:
    spec = LRNSpec(size=size, alpha=1e-2, beta=0.75, k=2.0, alpha_over_size=over_size)
    s = 1e-2 / size if over_size else 1e-2
    x = _data(c=9, scale=30.0, seed=size)
    _check(spec, x, naive_lrn(x, size, s, 2.0, 0.75))


def test_window_is_per_channel_not_spatial() -> None:
    # a single non-zero pixel: only channels within the window at that pixel feel it
    x = torch.zeros(1, 12, 3, 3)
    x[0, 6, 1, 1] = 100.0
    x[0, :, 0, 0] = 1.0
    out = LocalResponseNorm(LRNSpec(size=5, alpha=1.0, beta=1.0, k=1.0, alpha_over_size=False))(x)
    # at pixel (1, 1) the only non-zero activation is channel 6: b_6 = 100 / (1 + 1e4)
    assert out[0, 6, 1, 1].item() == pytest.approx(100 / (1 + 1e4), rel=1e-5)
    # at pixel (0, 0): interior channels see 5 ones, edge channel 0 sees 3 (itself, 1 and 2)
    assert out[0, 6, 0, 0].item() == pytest.approx(1 / 6, rel=1e-6)
    assert out[0, 0, 0, 0].item() == pytest.approx(1 / 4, rel=1e-6)
    assert out[0, 11, 0, 0].item() == pytest.approx(1 / 4, rel=1e-6)
    assert out[0, 1, 0, 0].item() == pytest.approx(1 / 5, rel=1e-6)


@pytest.mark.parametrize(
    "depth_radius, bias, alpha, beta", [(5, 2.0, 1e-4, 0.75), (2, 1.0, 1e-3, 0.5), (1, 0.5, 1e-2, 1.0)]
)
def test_tensorflow_convention_against_tf_formula(depth_radius: int, bias: float, alpha: float, beta: float) -> None:
    x = _data(c=14, scale=40.0, seed=depth_radius)
    spec = tensorflow_lrn(depth_radius=depth_radius, bias=bias, alpha=alpha, beta=beta)
    _check(spec, x, tf_lrn_reference(x, depth_radius, bias, alpha, beta))


def test_caffe_equals_torch_local_response_norm() -> None:
    x = _data(c=16, scale=100.0)
    want = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(x)
    got = LocalResponseNorm(CAFFE_LRN)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (want - x).abs().max() > 1.0


@pytest.mark.parametrize("size", [2, 4, 5])
def test_torch_convention_even_sizes(size: int) -> None:
    x = _data(c=10, scale=50.0)
    want = torch.nn.LocalResponseNorm(size, alpha=1e-2, beta=0.75, k=2.0)(x)
    got = LocalResponseNorm(LRNSpec(size=size, alpha=1e-2, beta=0.75, k=2.0, alpha_over_size=True))(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_under_autocast_is_float32_rounded() -> None:
    x32 = _data(c=32, scale=60.0)
    xb = x32.to(torch.bfloat16)
    lrn = LocalResponseNorm(PAPER_LRN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lrn(xb)
    assert got.dtype == torch.bfloat16
    want32 = lrn(xb.float())
    assert want32.dtype == torch.float32
    assert torch.equal(got, want32.to(torch.bfloat16))
    # and the float32 result is right: against the naive float64 reference on the same bf16 values
    torch.testing.assert_close(want32.double(), naive_lrn(xb.float(), 5, 1e-4, 2.0, 0.75), rtol=2e-5, atol=1e-6)


def test_bf16_differs_from_naive_bf16_arithmetic() -> None:
    # guard that the test above can tell: doing the arithmetic in bfloat16 gives other values
    xb = _data(c=32, scale=60.0).to(torch.bfloat16)
    sq = xb.square()
    padded = torch.nn.functional.pad(sq, (0, 0, 0, 0, 2, 2))
    window = sum(padded[:, j : j + 32] for j in range(5))
    in_bf16 = xb / (2.0 + 1e-4 * window).pow(0.75)
    assert in_bf16.dtype == torch.bfloat16
    assert not torch.equal(in_bf16, LocalResponseNorm(PAPER_LRN)(xb.float()).to(torch.bfloat16))


def test_fp16_does_not_overflow() -> None:
    # squares of 300 overflow float16 (max 65504); computed in float32 they do not
    x32 = _data(c=8, scale=300.0)
    xh = x32.half()
    assert torch.isinf(xh.square()).any()
    got = LocalResponseNorm(CAFFE_LRN)(xh)
    assert got.dtype == torch.float16
    assert torch.isfinite(got).all()
    assert torch.equal(got, LocalResponseNorm(CAFFE_LRN)(xh.float()).half())


@pytest.mark.parametrize(
    "spec", [PAPER_LRN, CAFFE_LRN, LRNSpec(4, 0.5, 0.75, 1.0, True), LRNSpec(3, 2.0, 0.6, 1.5, False)]
)
@pytest.mark.parametrize("kernels", ["eager", "compiled"])
def test_gradient_against_autograd_of_the_formula(spec: LRNSpec, kernels: str) -> None:
    """The closed-form backward equals autograd through a direct float64 implementation (odd and even windows),
    eager and in torch.compile's fused kernels (the default when training on the CPU). The Triton
    kernels: tests/test_triton_kernels.py."""
    x = _data(c=9, scale=3.0 if spec.alpha > 1e-3 else 30.0, seed=4).double().requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def direct(a: torch.Tensor) -> torch.Tensor:
        lo, hi = spec.size // 2, (spec.size - 1) // 2
        padded = torch.nn.functional.pad(a * a, (0, 0, 0, 0, lo, hi))
        window = sum(padded[:, j : j + a.shape[1]] for j in range(spec.size))
        return a / (spec.k + spec.scale * window) ** spec.beta

    (want,) = torch.autograd.grad(direct(x), x, g)
    x32 = x.detach().float().requires_grad_()
    lrn = LocalResponseNorm(spec, kernels=kernels)
    y = lrn(x32)  # through the autograd function
    assert y.grad_fn is not None  # through the autograd function; inference gives the same values:
    # to rounding (compiled kernels may differ once other shapes have made the compiler go dynamic)
    torch.testing.assert_close(y.detach(), lrn(x32.detach()), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y.detach().double(), direct(x).detach(), rtol=1e-5, atol=1e-6)
    (got,) = torch.autograd.grad(y, x32, g.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert (want - g).abs().max() > 1e-3 * g.abs().max()  # the normalisation's gradient is not the identity


def test_channels_last_input_gives_channels_last_output_and_gradient() -> None:
    x = _data(c=8).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = LocalResponseNorm(PAPER_LRN)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()
    plain = _data(c=8).requires_grad_()
    LocalResponseNorm(PAPER_LRN)(plain).sum().backward()
    torch.testing.assert_close(x.grad, plain.grad)


def test_default_falls_back_to_the_same_formulas_where_the_compiler_fails(monkeypatch) -> None:
    """No C compiler, or a GPU older than Triton supports: LRN still trains, unfused, and says so once.
    Named explicitly, the compiled kernels fail instead."""
    import alexnet.model.lrn as lrn_module

    def broken(fn):
        def compiled(*args):
            raise torch._dynamo.exc.TorchDynamoException("InvalidCxxCompiler: No working C++ compiler found")

        return compiled

    monkeypatch.setattr(lrn_module, "_compiled", broken)
    monkeypatch.setattr(lrn_module, "_UNUSABLE", {})
    x = _data(c=9, scale=30.0, seed=7).requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    with pytest.warns(UserWarning, match="LRN's compiled kernels cannot run here.*C\\+\\+ compiler") as caught:
        y = LocalResponseNorm(PAPER_LRN)(x)
        (got,) = torch.autograd.grad(y, x, g)
    assert len(caught) == 1  # once, not again in the backward
    want_y = LocalResponseNorm(PAPER_LRN, kernels="eager")(x)
    (want,) = torch.autograd.grad(want_y, x, g)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(torch._dynamo.exc.TorchDynamoException, match="C\\+\\+ compiler"):
        LocalResponseNorm(PAPER_LRN, kernels="compiled")(x)


def test_unknown_kernels_are_refused() -> None:
    with pytest.raises(
        ValueError, match="unknown LRN kernels 'cudnn': choose one of triton-band, triton, compiled, eager"
    ):
        LocalResponseNorm(PAPER_LRN, kernels="cudnn")


def test_default_fuses_training_and_leaves_cpu_inference_eager(monkeypatch) -> None:
    """Compiling pays off over many training steps, not for one prediction on the CPU."""
    import alexnet.model.lrn as lrn_module

    compiled = []
    monkeypatch.setattr(lrn_module, "_compiled", lambda fn: compiled.append(fn.__name__) or fn)
    lrn = LocalResponseNorm(PAPER_LRN)
    x = _data(c=8)
    with torch.no_grad():
        lrn(x)
    assert compiled == []
    y = lrn(x.requires_grad_())
    assert "local_response_norm" in type(y.grad_fn).__name__ and compiled == ["_fused_forward"]
    y.sum().backward()
    assert compiled == ["_fused_forward", "_fused_backward"]


@pytest.mark.parametrize("kernels", [None, "triton", "compiled"])
def test_an_exported_graph_holds_only_pytorch_operations(kernels) -> None:
    """torch.export (and ONNX through it) records the formulas, never the project's own operator, even
    where LRN would run the Triton kernels (CUDA)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), LocalResponseNorm(PAPER_LRN, kernels=kernels))
    x = torch.rand(1, 3, 8, 8) * 30
    exported = torch.export.export(model, (x,))
    code = exported.graph_module.print_readable(print_output=False)
    assert "ops.alexnet" not in code and "aten.exp" in code
    torch.testing.assert_close(exported.module()(x), LocalResponseNorm(PAPER_LRN, "eager")(model[0](x)))


def per_tower_reference(x: torch.Tensor, spec: LRNSpec, towers: int) -> torch.Tensor:
    """PyTorch's own LRN (s = alpha / size, odd windows) run on each tower's channels apart, in float64:
    what the paper's GPUs computed, each on the maps it held."""
    alpha = spec.scale * spec.size
    return torch.cat(
        [torch.nn.functional.local_response_norm(t, spec.size, alpha, spec.beta, spec.k) for t in x.chunk(towers, 1)],
        1,
    )


PER_TOWER_CASES = [(kernels, layout) for kernels in ("eager", "compiled") for layout in ("nchw", "channels_last")] + [
    (None, "channels_last")
]  # None: compiled when training on the CPU, eager for inference


@pytest.mark.parametrize(("kernels", "layout"), PER_TOWER_CASES)
@pytest.mark.parametrize("spec", [PAPER_LRN, LRNSpec(5, 0.5, 0.75, 1.0, True)], ids=["paper", "strong"])
def test_per_tower_lrn_normalises_each_towers_maps_alone(kernels, layout: str, spec: LRNSpec) -> None:
    """towers=2: values and gradient (training and inference) equal PyTorch's LRN on each half apart; the
    window across both towers differs exactly at the two channels either side of the boundary."""
    x = _data(c=16, scale=30.0 if spec is PAPER_LRN else 3.0, seed=9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(10))
    a = x.double().requires_grad_()
    want = per_tower_reference(a, spec, 2)
    (want_grad,) = torch.autograd.grad(want, a, g.double())

    lrn = LocalResponseNorm(spec, kernels=kernels, towers=2)
    with torch.no_grad():
        inferred = lrn(x)
    x32 = x.clone().requires_grad_()
    y = lrn(x32)
    (got_grad,) = torch.autograd.grad(y, x32, g)
    assert y.grad_fn is not None and y.shape == x.shape
    for got in (inferred, y.detach()):
        torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)

    across = LocalResponseNorm(spec, kernels=kernels)(x).double()
    differs = ((across - want).abs() > 1e-4 * want.abs().max()).flatten(2).any(2).any(0)
    assert differs.tolist() == [c in (6, 7, 8, 9) for c in range(16)]  # a 5-channel window reaches 2 across


@pytest.mark.parametrize("kernels", [None, "eager", "compiled"])
def test_one_image_without_a_batch_axis_splits_its_channels_into_towers(kernels) -> None:
    """(C, H, W): the towers split C, as for a batch, not H."""
    x = _data(c=8, scale=30.0, seed=2)[0].requires_grad_()  # (8, H, W), H not 8
    lrn = LocalResponseNorm(PAPER_LRN, kernels, towers=2)
    y = lrn(x)
    torch.testing.assert_close(y, lrn(x[None])[0])
    torch.testing.assert_close(y[:4], LocalResponseNorm(PAPER_LRN, "eager")(x[None, :4])[0])


def test_towers_must_divide_the_channels() -> None:
    with pytest.raises(ValueError, match="towers must be at least 1, not 0"):
        LocalResponseNorm(PAPER_LRN, towers=0)
    with pytest.raises(ValueError, match="9 channels do not split into 2 towers"):
        LocalResponseNorm(PAPER_LRN, towers=2)(_data(c=9))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is about a CUDA runtime that is missing")
def test_compiling_lrn_on_a_machine_without_cuda_prints_nothing(tmp_path) -> None:
    """Training on the CPU compiles LRN; inductor's C++ build would log 'No CUDA runtime is found' on stderr."""
    code = (
        "import torch\nfrom alexnet.model.lrn import PAPER_LRN, LocalResponseNorm\n"
        "x = torch.randn(2, 8, 5, 5, requires_grad=True)\n"
        "LocalResponseNorm(PAPER_LRN, 'compiled')(x).sum().backward()\n"
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}  # a cold cache: the C++ build runs
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_compiled_kernels_are_compiled_once_for_every_shape():
    """Training on the CPU compiles LRN's forward and backward once each per process, whatever the shapes
    that come (lrn1's, lrn2's, a smaller last batch), not once a shape (12-33 s each on 2 cores)."""
    from torch._dynamo.utils import counters

    import alexnet.model.lrn as lrn_module

    torch._dynamo.reset()
    lrn_module._compiled.cache_clear()
    counters.clear()
    for towers, graphs in [(2, 2), (1, 4)]:  # 1 tower has no tower axis: graphs of another rank
        for shape in [(3, 8, 5, 5), (2, 8, 5, 5), (3, 16, 4, 4), (2, 4, 3, 7)]:
            x = torch.rand(shape, requires_grad=True)
            y = LocalResponseNorm(PAPER_LRN, kernels="compiled", towers=towers)(x)
            y.backward(torch.ones_like(y))
            want = torch.cat([naive_lrn(t, 5, 1e-4, 2.0, 0.75) for t in x.detach().chunk(towers, 1)], 1)
            torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
        assert counters["stats"]["unique_graphs"] == graphs, (towers, dict(counters["stats"]))
