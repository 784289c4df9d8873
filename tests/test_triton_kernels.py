"""The hand-written Triton kernels (alexnet/kernels/*.py), checked without a GPU.

Their results are computed in Triton's interpreter (TRITON_INTERPRET=1: the kernels' code executed on
the CPU by numpy, tile by tile) and compared with a float64 reference or the CPU's path, and the tiles
the autotuner may pick are compiled ahead of time for an H100 (sm_90), so a kernel that does not build,
or spills registers to memory, fails here first. tests/test_cuda.py runs the same kernels on a GPU.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import alexnet
import alexnet.kernels
import alexnet.model.lrn as lrn_module
from alexnet.model.lrn import CAFFE_LRN, PAPER_LRN, LocalResponseNorm, LRNSpec, tensorflow_lrn

triton = pytest.importorskip("triton")
PACKAGE = Path(alexnet.__file__).parent
HAS_PTXAS = (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()
SPECS = [PAPER_LRN, CAFFE_LRN, LRNSpec(4, 0.5, 0.75, 1.0, True), LRNSpec(3, 2.0, 0.6, 1.5, False)]


def fresh_copy(monkeypatch: pytest.MonkeyPatch, name: str, interpret: bool):
    """alexnet.kernels.<name> loaded afresh, with Triton's interpreter on or off: Triton looks when a kernel is
    defined (and, interpreted, when it runs), so the setting lasts until the test ends."""
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location(f"alexnet.kernels.{name}", PACKAGE / "kernels" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def without_triton(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """alexnet.kernels.<name> replaced by one whose kernels fail as they do on a GPU older
    than Triton supports, until the test ends."""

    class TooOld:
        def forward(*args, **kwargs):
            raise RuntimeError("Triton only supports GPUs of compute capability 7.0 or newer")

        backward = forward

    monkeypatch.setitem(sys.modules, f"alexnet.kernels.{name}", TooOld)
    monkeypatch.setattr(alexnet.kernels, name, TooOld, raising=False)


def interpreted(monkeypatch: pytest.MonkeyPatch, name: str, **tile: int):
    """alexnet.kernels.<name> in Triton's interpreter, both kernels with the one `tile`
    (the interpreter cannot time tiles to pick one); also what `import alexnet.kernels.<name>` gives while the
    test runs."""
    module = fresh_copy(monkeypatch, name, interpret=True)
    for kernel in (module._forward_kernel, module._backward_kernel):
        kernel.configs = [triton.Config(tile, num_warps=4)]
    monkeypatch.setitem(sys.modules, f"alexnet.kernels.{name}", module)
    monkeypatch.setattr(alexnet.kernels, name, module, raising=False)
    return module


@pytest.fixture
def kernels(request, monkeypatch):
    """LRN's kernels interpreted, tiles of 4 pixels unless parametrized."""
    return interpreted(monkeypatch, "lrn", BLOCK_P=getattr(request, "param", 4))


def formula(a: torch.Tensor, spec: LRNSpec) -> torch.Tensor:
    """LRN written out directly, over dim 1."""
    lo, hi = spec.size // 2, (spec.size - 1) // 2
    padded = torch.nn.functional.pad(a * a, (0, 0, 0, 0, lo, hi))
    window = sum(padded[:, j : j + a.shape[1]] for j in range(spec.size))
    return a / (spec.k + spec.scale * window) ** spec.beta


def reference(x: torch.Tensor, g: torch.Tensor, spec: LRNSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and gradient in float64, by autograd through the formula written out directly."""
    a = x.detach().double().requires_grad_()
    y = formula(a, spec)
    (grad,) = torch.autograd.grad(y, a, g.double())
    return y.detach(), grad


def _inputs(spec: LRNSpec, channels_last: bool, dtype: torch.dtype = torch.float32, c: int = 9):
    gen = torch.Generator().manual_seed(spec.size)
    scale = 3.0 if spec.alpha > 1e-3 else 30.0  # large enough that the normalisation bites
    x = torch.randn(3, c, 5, 7, generator=gen) * scale
    g = torch.randn(x.shape, generator=gen)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype).contiguous(memory_format=layout), g.to(dtype).contiguous(memory_format=layout)


@pytest.mark.parametrize(
    ("spec", "channels_last", "kernels"),
    [(spec, layout, 4) for spec in SPECS for layout in (False, True)] + [(PAPER_LRN, True, 1)],
    ids=[f"{s}-{layout}" for s in ("paper", "caffe", "even", "three") for layout in ("nchw", "channels_last")]
    + ["paper-one_pixel_tiles"],
    indirect=["kernels"],
)
def test_kernels_equal_the_float64_formula(kernels, spec: LRNSpec, channels_last: bool) -> None:
    """9 channels (a tile of 16, partly masked) and 105 pixels per batch (not a whole number of tiles)."""
    x, g = _inputs(spec, channels_last)
    want_y, want_grad = reference(x, g, spec)
    y = kernels.forward(x, spec.size, spec.scale, spec.k, spec.beta)
    grad = kernels.backward(x, g, spec.size, spec.scale, spec.k, spec.beta)
    for got in (y, grad):
        assert got.dtype == x.dtype and got.stride() == x.stride()
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    assert (want_grad - g.double()).abs().max() > 1e-2 * g.abs().max()  # the normalisation's gradient matters


def test_bfloat16_in_and_out(kernels) -> None:
    """Within one bf16 step of the exact value (the interpreter truncates to bf16; GPUs round to nearest,
    which tests/test_cuda.py checks)."""
    x, g = _inputs(PAPER_LRN, channels_last=True, dtype=torch.bfloat16)
    want_y, want_grad = reference(x, g, PAPER_LRN)
    y = kernels.forward(x, 5, PAPER_LRN.scale, PAPER_LRN.k, PAPER_LRN.beta)
    grad = kernels.backward(x, g, 5, PAPER_LRN.scale, PAPER_LRN.k, PAPER_LRN.beta)
    assert y.dtype == grad.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want_y, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-2, atol=1e-2)


def test_gradient_taken_in_another_layout_than_the_input(kernels) -> None:
    x, g = _inputs(PAPER_LRN, channels_last=True)
    grad = kernels.backward(x, g.contiguous(), 5, PAPER_LRN.scale, PAPER_LRN.k, PAPER_LRN.beta)
    torch.testing.assert_close(grad.double(), reference(x, g, PAPER_LRN)[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("towers", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_a_single_column_input_with_an_unusual_stride_is_indexed_right(kernels, layout: str, towers: int) -> None:
    """W = 1: PyTorch calls x contiguous (or channels_last) whatever its column stride, so the kernels
    must not step from pixel to pixel by it (they read and wrote outside the tensor)."""
    base = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(0)) * 30
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    x = base[..., :1].clone()  # (2, 8, 3, 1) in the layout
    x = x.as_strided(x.shape, (*x.stride()[:3], 3 * x.stride(3) + 5))  # the column stride, which W = 1 ignores
    assert x.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).as_strided(x.shape, x.stride())
    halves = [slice(0, 8)] if towers == 1 else [slice(0, 4), slice(4, 8)]
    want = [reference(x[:, h], g[:, h], PAPER_LRN) for h in halves]
    args = (5, PAPER_LRN.scale, PAPER_LRN.k, PAPER_LRN.beta)
    y = kernels.forward(x, *args, towers=towers)
    grad = kernels.backward(x, g, *args, towers=towers)
    torch.testing.assert_close(y.double(), torch.cat([w[0] for w in want], 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), torch.cat([w[1] for w in want], 1), rtol=1e-4, atol=1e-6)


def test_local_response_norm_trains_through_the_kernels(kernels) -> None:
    """LocalResponseNorm(kernels="triton") end to end: autograd saves x, the backward kernel gets it."""
    x, g = _inputs(PAPER_LRN, channels_last=True)
    x.requires_grad_()
    y = LocalResponseNorm(PAPER_LRN, kernels="triton")(x)
    assert "local_response_norm" in type(y.grad_fn).__name__
    y.backward(g)
    want_y, want_grad = reference(x, g, PAPER_LRN)
    torch.testing.assert_close(y.detach().double(), want_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-4, atol=1e-6)


# --- LRN built for an H100 -------------------------------------------------------------------------


def build_for_h100(
    kernel, pointers: dict[str, str] | str, constants: dict, num_warps: int, aligned: tuple[str, ...] = (), sass=False
) -> str:
    """Compile `kernel` (an autotuner's) for sm_90: its `*_ptr` arguments of the types `pointers`
    gives ("*bf16": all; or by name), `constants` fixed, others 32-bit; pointers and the arguments named
    in `aligned` known to be multiples of 16, as Triton specializes them on a GPU where they are.
    Returns cuobjdump's resource usage line (registers, spills), or with `sass` the machine code."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    floats = ("scale", "k", "beta")

    def kind(name: str) -> str:
        if name.endswith("_ptr"):
            return pointers if isinstance(pointers, str) else pointers[name]
        return "constexpr" if name in constants else "fp32" if name in floats else "i32"

    signature = {name: kind(name) for name in fn.arg_names}
    sixteens = [i for i, name in enumerate(fn.arg_names) if name in aligned or (aligned and name.endswith("_ptr"))]
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs=constants, attrs={(i,): [["tt.divisibility", 16]] for i in sixteens}),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps},
    )
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        flag = "-sass" if sass else "--dump-resource-usage"
        out = subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout
    return out if sass else next(line for line in out.splitlines() if "REG:" in line)


def _sm90(kernel, width: int, config, bias: bool = False, fast_log: bool = True, sass: bool = False) -> str:
    """LRN's kernel for sm_90 in bf16; with `bias`, the one that also adds a bias and applies ReLU."""
    constants = {"SIZE": 5, "BIAS": bias, "FAST_LOG": fast_log, "BLOCK_C": width, **config.kwargs}
    pointers = "*bf16"
    if "db_ptr" in kernel.fn.arg_names:  # the backward: db's partial sums are float32
        pointers = {name: "*fp32" if name == "db_ptr" else "*bf16" for name in kernel.fn.arg_names}
        constants["ROWS"] = 1024 if bias else 0
    return build_for_h100(kernel, pointers, constants, config.num_warps, sass=sass)


def test_logarithms_run_in_the_special_function_units(monkeypatch) -> None:
    """The powers d^-beta as 2^(-beta log2 d), both in MUFU instructions: tl.log's polynomial took a third
    of the tile backward's instructions on sm_90 (5 logs per element)."""
    if not HAS_PTXAS:
        pytest.skip("this Triton has no CUDA compiler")
    lrn_triton = fresh_copy(monkeypatch, "lrn", interpret=False)
    assert lrn_triton.FAST_LOG  # outside the interpreter
    config = triton.Config({"BLOCK_P": 4}, num_warps=4)
    counts = {}
    for fast in (True, False):
        sass = _sm90(lrn_triton._backward_kernel, 128, config, fast_log=fast, sass=True)
        counts[fast] = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.MULTILINE)), sass.count("MUFU.LG2")
    (fast_instructions, fast_logs), (exact_instructions, exact_logs) = counts[True], counts[False]
    assert exact_logs == 0 and fast_logs >= 5  # 5 per element, 4 elements a thread (some shared)
    assert fast_instructions < 0.8 * exact_instructions, counts


@pytest.mark.parametrize("bias", [False, True], ids=["lrn", "bias_relu_lrn"])
@pytest.mark.parametrize(  # conv1's and conv2's LRN per tower (48 and 128 channels), and across (96 and 256)
    "width", [64, 128, 256], ids=["conv1_tower", "conv2_tower_or_conv1", "conv2"]
)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_every_tile_the_autotuner_may_pick_builds_for_an_h100_without_spilling(
    width: int, direction: str, bias: bool, monkeypatch
) -> None:
    if not HAS_PTXAS:
        pytest.skip("this Triton has no CUDA compiler")
    lrn_triton = fresh_copy(monkeypatch, "lrn", interpret=False)

    kernel = getattr(lrn_triton, f"_{direction}_kernel")
    tiles = kernel.early_config_prune(kernel.configs, {}, SIZE=5, BLOCK_C=width)
    assert len(tiles) >= 4  # a real choice for the autotuner
    smallest = min(tiles, key=lambda c: c.kwargs["BLOCK_P"] / c.num_warps)
    largest = max(tiles, key=lambda c: c.kwargs["BLOCK_P"] / c.num_warps)
    for config in (smallest, largest):
        usage = _sm90(kernel, width, config, bias)
        assert " STACK:0 " in usage and " LOCAL:0 " in usage, f"{config}: {usage}"


def test_a_tile_that_gives_a_thread_too_much_is_pruned_and_would_spill(monkeypatch) -> None:
    """The pruning rule is what keeps the kernels in registers: a tile it leaves out does spill."""
    if not HAS_PTXAS:
        pytest.skip("this Triton has no CUDA compiler")
    lrn_triton = fresh_copy(monkeypatch, "lrn", interpret=False)

    kernel = lrn_triton._backward_kernel
    too_big = triton.Config({"BLOCK_P": 16}, num_warps=4)  # 16 x 128 / 128 threads = 16 elements each
    kept = kernel.early_config_prune(kernel.configs, {}, SIZE=5, BLOCK_C=128)
    assert all((c.kwargs["BLOCK_P"], c.num_warps) != (16, 4) for c in kept)
    assert " STACK:0 " not in _sm90(kernel, 128, too_big)


# --- LRN's band kernels (a candidate) ------------------------------------------------------------


@pytest.fixture
def bf16_dots_in_the_interpreter(monkeypatch):
    """Triton 3.8's interpreter multiplies a bf16 tl.dot's raw 16-bit patterns as integers (it keeps
    bf16 as uint16); here it multiplies their values, as a GPU's tensor cores do."""
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_dot

    def as_float32(h):
        if h.dtype.scalar != triton.language.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype("uint32") << 16).view("float32"), triton.language.float32)

    def create_dot(self, a, b, d, *args):
        return real(self, as_float32(a), as_float32(b), d, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


@pytest.fixture
def band_kernels(monkeypatch, bf16_dots_in_the_interpreter):
    """LRN's band kernels interpreted, 16 rows (pixel x W channels) a program."""
    module = interpreted(monkeypatch, "lrn", BLOCK_P=4)
    for kernel in (module._band_forward_kernel, module._band_backward_kernel):
        kernel.configs = [triton.Config({"BLOCK_R": 16}, num_warps=4)]
    return module


BAND_SPECS = {  # windows of 3 to 11: both row widths, and 9, the most that rows of 16 + 2 x 8 take
    "paper": PAPER_LRN,
    "even": LRNSpec(4, 0.5, 0.75, 1.0, True),
    "three": LRNSpec(3, 2.0, 0.6, 1.5, False),
    "nine": LRNSpec(9, 0.5, 0.75, 1.0, True),
    "tensorflow": tensorflow_lrn(depth_radius=5, bias=1.0, alpha=0.2, beta=0.75),
    "k=0": LRNSpec(5, 1.0, 0.75, 0.0, True),  # d = 0 past the channels
}


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")  # k=0
@pytest.mark.parametrize(
    ("spec", "channels_last"),  # every window in channels_last (the model's layout), two in NCHW
    [(spec, True) for spec in BAND_SPECS.values()] + [(PAPER_LRN, False), (BAND_SPECS["tensorflow"], False)],
    ids=[f"{name}-channels_last" for name in BAND_SPECS] + ["paper-nchw", "tensorflow-nchw"],
)
def test_band_kernels_equal_the_float64_formula(band_kernels, spec: LRNSpec, channels_last: bool) -> None:
    """40 channels: rows of 16 channels, the last one partly past the tensor; 105 pixels, so 315 rows,
    not a whole number of programs; the gradient given in the other layout."""
    x, g = _inputs(spec, channels_last, c=40)
    want_y, want_grad = reference(x, g, spec)
    args = (spec.size, spec.scale, spec.k, spec.beta)
    y = band_kernels.forward(x, *args, band=True)
    grad = band_kernels.backward(x, g, *args, band=True)
    other_layout = g.contiguous() if channels_last else g.to(memory_format=torch.channels_last)
    other = band_kernels.backward(x, other_layout, *args, band=True)
    for got in (y, grad, other):
        assert got.dtype == x.dtype and got.stride() == x.stride()
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(other, grad, rtol=0, atol=0)
    assert (want_grad - g.double()).abs().max() > 1e-2 * g.abs().max()  # the normalisation's gradient matters


def test_band_kernels_in_bfloat16_equal_the_tile_kernels(band_kernels) -> None:
    """bf16 in and out, the squares in two bf16 pieces: the tile kernels' values (both interpreted)."""
    x, g = _inputs(PAPER_LRN, channels_last=True, dtype=torch.bfloat16, c=96)
    args = (5, PAPER_LRN.scale, PAPER_LRN.k, PAPER_LRN.beta)
    y, grad = band_kernels.forward(x, *args, band=True), band_kernels.backward(x, g, *args, band=True)
    assert y.dtype == grad.dtype == torch.bfloat16
    want_y, want_grad = reference(x, g, PAPER_LRN)
    torch.testing.assert_close(y.double(), want_y, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, band_kernels.forward(x, *args), rtol=2**-7, atol=0)
    torch.testing.assert_close(grad, band_kernels.backward(x, g, *args), rtol=2**-7, atol=2**-7)


def test_local_response_norm_trains_through_the_band_kernels(band_kernels) -> None:
    x, g = _inputs(PAPER_LRN, channels_last=True)
    x.requires_grad_()
    y = LocalResponseNorm(PAPER_LRN, kernels="triton-band")(x)
    y.backward(g)
    want_y, want_grad = reference(x, g, PAPER_LRN)
    torch.testing.assert_close(y.detach().double(), want_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_band_kernels_with_a_bias_equal_bias_relu_then_band_lrn(band_kernels, bias_relu_kernels, dtype) -> None:
    """lrn(relu(x + b)) in one band kernel each way: the values and x's gradient of bias_relu's kernels
    followed by the band kernels, bit for bit; b's gradient the same sum in another order. 297 pixels:
    programs of 32 (ROWS) in tiles of 16, each with its own partial sums of db. A NaN spreads through the
    product to its rows' channels (16 to 32 here, not just the window's 5), in its own pixel only."""
    s = PAPER_LRN
    x, bias, g = _bias_relu_lrn_inputs(channels_last=True, dtype=dtype)
    args = (s.size, s.scale, s.k, s.beta)
    y = band_kernels.forward(x, *args, bias=bias, band=True)
    dx, db = band_kernels.backward_with_bias(x, bias, g, *args, band=True)
    a = bias_relu_kernels.forward(x, bias)
    want_y = band_kernels.forward(a, *args, band=True)
    want_dx, want_db = bias_relu_kernels.backward(band_kernels.backward(a, g, *args, band=True), a)
    assert y.stride() == dx.stride() == x.stride() and y.dtype == dx.dtype == dtype and db.dtype == torch.float32
    assert torch.equal(y.nan_to_num(-1), want_y.nan_to_num(-1))
    assert torch.equal(dx.nan_to_num(-1), want_dx.nan_to_num(-1))
    torch.testing.assert_close(db, want_db, rtol=1e-4, atol=1e-4, equal_nan=True)
    nan_pixels = y.isnan().any(1)
    assert nan_pixels.sum() == 1 and nan_pixels[1, 3, 4] and 16 <= y[1, :, 3, 4].isnan().sum() <= 32
    # the ReLU and LRN both matter: 0.3-0.7 of relu(x + b) is 0, and LRN scales the rest unevenly
    relu = torch.relu(x.float() + bias.float().view(1, -1, 1, 1))
    ratio = (y.float() / relu)[(relu > 1) & y.isfinite()]
    assert 0.3 < (relu == 0).float().mean() < 0.7 and ratio.max() < 0.7 and ratio.max() - ratio.min() > 0.1


def test_bias_relu_lrn_runs_the_band_kernels_where_lrn_names_them(band_kernels, monkeypatch) -> None:
    """AlexNet.fuse_lrn's operation, given an LRN module with kernels="triton-band"."""
    from alexnet.model.bias_relu import bias_relu_lrn

    calls = []

    def spy(name: str):
        real = getattr(band_kernels, name)

        def record(*args, **kwargs):
            calls.append((name, kwargs.get("band")))
            return real(*args, **kwargs)

        monkeypatch.setattr(band_kernels, name, record)

    spy("forward")
    spy("backward_with_bias")
    x, bias, g = _bias_relu_lrn_inputs(channels_last=True)
    x.requires_grad_()
    y = bias_relu_lrn(x, bias, LocalResponseNorm(PAPER_LRN, kernels="triton-band"), kernels="triton")
    y.backward(g)
    assert calls == [("forward", True), ("backward_with_bias", True)]
    s = PAPER_LRN
    want_dx, _ = band_kernels.backward_with_bias(x.detach(), bias, g, s.size, s.scale, s.k, s.beta, band=True)
    assert torch.equal(x.grad.nan_to_num(-1), want_dx.nan_to_num(-1))


@pytest.mark.parametrize("band", [False, True], ids=["tile", "band"])
def test_kernels_normalise_each_tower_alone(band_kernels, band: bool) -> None:
    """towers=2, the paper's LRN (each GPU's maps alone): a kernel launched on each tower's slice of the
    tensors equals the formula on each half apart, in float64; so does fuse_lrn's operation with a bias
    (x's gradient and the bias's, summed tower by tower). 40 channels: towers of 20, so the tile kernels
    mask 12 of 32 channels and the band kernels' second row of 16 runs past each tower's end."""
    s = LRNSpec(5, 0.5, 0.75, 1.0, True)
    x, g = _inputs(s, channels_last=True, c=40)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(3))
    xd, bd = x.double().requires_grad_(), bias.double().requires_grad_()
    want = {}
    for name, a in (("lrn", xd), ("bias_relu_lrn", torch.relu(xd + bd.view(1, -1, 1, 1)))):
        y = torch.cat([formula(t, s) for t in a.chunk(2, 1)], 1)
        want[name] = (y.detach(), *torch.autograd.grad(y, (xd, bd) if name != "lrn" else (xd,), g.double()))
    args = (s.size, s.scale, s.k, s.beta)
    got = {
        "lrn": (band_kernels.forward(x, *args, band=band, towers=2), band_kernels.backward(x, g, *args, band, 2)),
        "bias_relu_lrn": (
            band_kernels.forward(x, *args, bias=bias, band=band, towers=2),
            *band_kernels.backward_with_bias(x, bias, g, *args, band=band, towers=2),
        ),
    }
    for name, values in got.items():
        assert all(v.stride() == x.stride() for v in values[:2]), name
        for v, w in zip(values, want[name], strict=True):
            torch.testing.assert_close(v.double(), w, rtol=1e-4, atol=1e-5, msg=name)
    across = band_kernels.forward(x, *args, band=band).double()
    differs = ((across - want["lrn"][0]).abs() > 1e-4).flatten(2).any(2).any(0)
    assert differs.tolist() == [c in (18, 19, 20, 21) for c in range(40)]


def test_band_widths_reach_as_far_as_the_backward_needs() -> None:
    from alexnet.kernels import lrn as lrn_triton

    assert [lrn_triton.band_widths(size) for size in (1, 5, 9, 10, 17)] == [(16, 8)] * 3 + [(32, 16)] * 2
    with pytest.raises(ValueError, match="up to 17 channels, not 18"):
        lrn_triton.band_widths(18)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_every_band_tile_builds_for_an_h100_with_wide_loads_and_tensor_cores(direction: str, monkeypatch) -> None:
    """For conv1's LRN in bf16 channels_last (channel stride 1, which Triton specializes on a GPU):
    only 8- and 16-byte loads and stores (the tile kernels' are mostly 2-byte), the sums on tensor
    cores, no spills, in every tile the autotuner may pick, with a bias too; for a window of 11 (rows
    of 32 + 2 x 16) and float32's 3 pieces, no spills."""
    if not HAS_PTXAS:
        pytest.skip("this Triton has no CUDA compiler")
    lrn_triton = fresh_copy(monkeypatch, "lrn", interpret=False)
    kernel = getattr(lrn_triton, f"_band_{direction}_kernel")
    pointers = {name: "*fp32" if name == "db_ptr" else "*bf16" for name in kernel.fn.arg_names if name.endswith("_ptr")}
    aligned = ("stride_n", "stride_p", "channels")
    for size, pieces, bias in ((5, 2, False), (5, 2, True), (11, 3, False)):
        w, halo = lrn_triton.band_widths(size)
        shape = {"stride_c": 1, "SIZE": size, "BIAS": bias, "FAST_LOG": True, "PIECES": pieces, "W": w, "HALO": halo}
        if direction == "backward":
            shape["ROWS"] = 1024 if bias else 0
        tiles = kernel.early_config_prune(kernel.configs, {}, **shape)
        assert len(tiles) >= 3  # a real choice for the autotuner
        for config in tiles if size == 5 else tiles[:1]:
            constants = {**shape, **config.kwargs}
            usage = build_for_h100(kernel, pointers, constants, config.num_warps, aligned)
            assert " STACK:0 " in usage and " LOCAL:0 " in usage, f"{size}, {bias}, {config}: {usage}"
            if size == 5 and not bias:
                sass = build_for_h100(kernel, pointers, constants, config.num_warps, aligned, sass=True)
                memory = re.findall(r"\b(?:LDG|STG)\.[\w.]+", sass)
                assert memory and {m.split(".")[-1] for m in memory} <= {"64", "128"}, f"{config}: {set(memory)}"
                assert re.search(r"\bH(?:G)?MMA\.", sass), f"{config}: no tensor-core instruction"


# --- Falling back -----------------------------------------------------------------------------


def test_default_falls_back_to_compiled_kernels_where_triton_cannot_run(monkeypatch) -> None:
    """A GPU older than Triton supports: the default moves on to torch.compile's kernels, says so once."""
    without_triton(monkeypatch, "lrn")
    monkeypatch.setattr(lrn_module, "_UNUSABLE", {})
    used = []
    monkeypatch.setattr(lrn_module, "_compiled", lambda fn: used.append(fn.__name__) or fn)
    x, g = _inputs(PAPER_LRN, channels_last=True)
    x.requires_grad_()
    args = (x, PAPER_LRN.size, PAPER_LRN.scale, PAPER_LRN.k, PAPER_LRN.beta)
    with pytest.warns(UserWarning, match="triton kernels cannot run here.*compute capability") as caught:
        y = lrn_module._lrn_op(*args, 1, "triton", True)
        y.backward(g)
    assert len(caught) == 1 and used == ["_fused_forward", "_fused_backward"]
    want_y, want_grad = reference(x, g, PAPER_LRN)
    torch.testing.assert_close(y.detach().double(), want_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(RuntimeError, match="compute capability"):  # named explicitly: no fallback
        lrn_module._run("triton", False, args, 1, fall_back=False)


# --- The augmentation's kernel ------------------------------------------------------------------


@pytest.mark.parametrize("per_pixel", [True, False], ids=["mean_image", "mean_colour"])
@pytest.mark.parametrize("crop", [32, 29], ids=["crop32", "crop29"])  # 29: columns masked in a tile of 32
def test_augmentation_kernel_equals_the_cpu_path(monkeypatch, per_pixel: bool, crop: int) -> None:
    from alexnet.data.augment import PixelStats, _crops_by_slicing

    kernels = fresh_copy(monkeypatch, "augment", interpret=True)
    kernels._train_crops_kernel.configs = [triton.Config({"BLOCK_R": 8}, num_warps=4)]
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=g)
    mean = torch.rand(3, 40, 40, generator=g) if per_pixel else torch.rand(3, 1, 1, generator=g)
    stats = PixelStats(mean, torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1), torch.ones(3), torch.eye(3))
    top = torch.randint(0, 40 - crop + 1, (5,), generator=g)
    left = torch.tensor([0, 40 - crop, 3, 7, 40 - crop])  # both edges
    flip = torch.tensor([True, False, True, False, True])
    shift = torch.randn(5, 3, generator=g) * 0.05
    got = kernels.train_crops(images, stats.mean, stats.std, top, left, flip, crop, shift)
    want = _crops_by_slicing(images, stats, top, left, flip, crop, shift)
    assert got.shape == (5, 3, crop, crop) and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # the same arithmetic: rounding at most
    # stored in bf16 (training in bf16): the same values, rounded once (the interpreter truncates)
    half = kernels.train_crops(images, stats.mean, stats.std, top, left, flip, crop, shift, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.is_contiguous(memory_format=torch.channels_last)
    assert ((half.float() - want).abs() <= want.abs() * 2**-7 + 1e-6).all()
    assert (half.float() != got).any()  # rounded, not float32 values in a float32 tensor


POINTERS = {"images_ptr": "*u8", "out_ptr": "*fp32", "top_ptr": "*i64", "left_ptr": "*i64", "flip_ptr": "*u8"}
POINTERS |= {"shift_ptr": "*fp32", "mean_ptr": "*fp32", "scale_ptr": "*fp32"}


def test_augmentation_kernel_builds_for_an_h100_without_spilling(monkeypatch) -> None:
    if not HAS_PTXAS:
        pytest.skip("this Triton has no CUDA compiler")
    kernel = fresh_copy(monkeypatch, "augment", interpret=False)._train_crops_kernel
    for config in kernel.configs:
        for out in ("*fp32", "*bf16"):
            constants = {"BLOCK_W": 256, **config.kwargs}
            usage = build_for_h100(kernel, POINTERS | {"out_ptr": out}, constants, config.num_warps)
            assert " STACK:0 " in usage and " LOCAL:0 " in usage, f"{config}: {usage}"


def test_a_compiled_model_keeps_lrn_in_the_triton_kernels(kernels, monkeypatch) -> None:
    """torch.compile sees LRN as one operator: the compiled model calls the Triton kernels (here
    interpreted, on the CPU) for LRN and its gradient, and trains like the eager model."""
    calls = []
    for name in ("forward", "backward"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 9, 3), torch.nn.ReLU(), LocalResponseNorm(PAPER_LRN, kernels="triton"), torch.nn.Flatten()
    )
    x = torch.rand(2, 3, 7, 7) * 30
    compiled = torch.compile(model)
    got = compiled(x)
    got.square().sum().backward()
    assert calls == ["forward", "backward"]
    got_grad = model[0].weight.grad.clone()
    model.zero_grad()
    model[2].kernels = "eager"
    want = model(x)
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, model[0].weight.grad, rtol=1e-4, atol=1e-4)


def test_the_operator_passes_torch_library_checks(kernels) -> None:
    """Schema, fake tensors (what torch.compile traces with), autograd registration."""
    x = torch.randn(2, 10, 3, 2, generator=torch.Generator().manual_seed(0)) * 30
    x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()  # small: every check runs the interpreted kernels
    for towers in (1, 2):
        args = (x, 5, PAPER_LRN.scale, PAPER_LRN.k, PAPER_LRN.beta, towers, "triton", False)
        torch.library.opcheck(lrn_module._lrn_op, args)


@pytest.mark.parametrize("kind", ["triton", "eager", "compiled"])
def test_the_operator_returns_the_strides_its_fake_kernels_promise(kernels, kind: str) -> None:
    """torch.compile plans a graph by the fake kernels' strides (empty_like(x)): an x that is dense but
    permuted (which the Triton kernels take as a NCHW copy), and a grad in another layout than x (which
    the formulas' backward follows), come back in x's strides all the same."""
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(1, 4, 3, 2, generator=gen) * 30, torch.randn(1, 4, 3, 2, generator=gen)  # small: interpreted
    permuted = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # dense, neither NCHW nor NHWC
    cases = [(permuted, g), (x.contiguous(memory_format=torch.channels_last), g)]
    for xs, gs in cases:
        for towers in (1, 2):
            rest = (3, PAPER_LRN.scale, PAPER_LRN.k, PAPER_LRN.beta, towers, kind, False)
            assert lrn_module._lrn_op(xs, *rest).stride() == xs.stride()
            assert lrn_module._lrn_backward_op(xs, gs, *rest).stride() == xs.stride()
    torch.library.opcheck(lrn_module._lrn_backward_op, (permuted, g, *rest))  # the checks torch.compile relies on


# --- Max pooling's kernels (alexnet/kernels/pool.py) ----------------------------------------------


@pytest.fixture
def pool_kernels(request, monkeypatch):
    """kernels/pool.py interpreted, tiles of 16 pixels x 32 channels unless parametrized."""
    block_p, block_c = getattr(request, "param", (16, 32))
    return interpreted(monkeypatch, "pool", BLOCK_P=block_p, BLOCK_C=block_c)


def _pool_inputs(shape, size: int, stride: int, channels_last: bool, dtype=torch.float32):
    """Whole numbers from 0 to 3, so that most windows tie, and a NaN: the cases where which input
    gets the gradient is a rule, not chance."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(0, 4, shape, generator=gen).to(dtype)
    x[0, 1, 2, 3] = float("nan")
    n, c, h, w = shape
    g = torch.randn(n, c, (h - size) // stride + 1, (w - size) // stride + 1, generator=gen).to(dtype)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=layout), g.contiguous(memory_format=layout)


def _pytorch_pool(x: torch.Tensor, g: torch.Tensor, size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    xi = x.detach().clone().requires_grad_()
    y = torch.nn.functional.max_pool2d(xi, size, stride)
    y.backward(g)
    return y.detach(), xi.grad


POOL_CASES = {  # shape, window, stride
    "paper_odd": ((2, 40, 11, 9), 3, 2),  # 40 channels: a second, partly masked tile of 32
    "even_sides": ((2, 7, 10, 8), 3, 2),  # a last row and column that no window reaches
    "touching": ((3, 5, 8, 10), 2, 2),
    "stride_one": ((2, 7, 9, 9), 3, 1),  # each input in up to 9 windows
}


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("case", POOL_CASES.values(), ids=POOL_CASES.keys())
def test_pool_kernels_equal_pytorch_ties_and_nans_included(pool_kernels, case, channels_last: bool) -> None:
    """The same maxima, the same input gets each gradient (the first maximum of a tie, a NaN), and the
    same sums, bit for bit; in the input's layout. 16-pixel tiles: the batch is not a whole number."""
    shape, size, stride = case
    x, g = _pool_inputs(shape, size, stride, channels_last)
    want_y, want_grad = _pytorch_pool(x, g, size, stride)
    y, where = pool_kernels.forward(x, size, stride)
    grad = pool_kernels.backward(g, where, x.shape, x.stride(), size, stride)
    assert where.dtype == torch.int8 and y.stride() == want_y.stride() and grad.stride() == x.stride()
    assert torch.equal(y.nan_to_num(-1), want_y.nan_to_num(-1)) and torch.equal(grad, want_grad)
    assert grad.count_nonzero() < x.numel() / 2  # the tie rule mattered: most inputs get nothing


def test_pool_kernels_in_bfloat16(pool_kernels) -> None:
    x, g = _pool_inputs((2, 40, 11, 9), 3, 2, channels_last=True, dtype=torch.bfloat16)
    x = x + torch.rand(x.shape).to(torch.bfloat16)  # fewer ties, values that need bf16's rounding
    want_y, want_grad = _pytorch_pool(x.float(), g.float(), 3, 2)  # adding in float32, as the kernel does
    y, where = pool_kernels.forward(x, 3, 2)
    grad = pool_kernels.backward(g.contiguous(), where, x.shape, x.stride(), 3, 2)  # g in another layout
    assert y.dtype == grad.dtype == torch.bfloat16
    assert torch.equal(y.float().nan_to_num(-1), want_y.nan_to_num(-1))
    # one bf16 step at most: the interpreter truncates the sum to bf16, GPUs round it (test_cuda.py)
    torch.testing.assert_close(grad.float(), want_grad, rtol=2**-7, atol=1e-6)


def test_max_pool_module_trains_through_the_kernels_saving_a_byte_per_output(pool_kernels) -> None:
    from alexnet.model.pool import MaxPool2d

    x, g = _pool_inputs((2, 40, 11, 9), 3, 2, channels_last=True)
    x.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = MaxPool2d(3, 2, kernels="triton")(x)
    y.backward(g)
    assert [t.dtype for t in saved] == [torch.int8] and saved[0].shape == y.shape
    want_y, want_grad = _pytorch_pool(x, g, 3, 2)
    assert torch.equal(y.detach().nan_to_num(-1), want_y.nan_to_num(-1)) and torch.equal(x.grad, want_grad)
    with torch.no_grad():  # inference writes no positions
        assert torch.equal(MaxPool2d(3, 2, kernels="triton")(x).nan_to_num(-1), want_y.nan_to_num(-1))


POOL_POINTERS = {"x_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*bf16", "dx_ptr": "*bf16", "where_ptr": "*i8"}


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_every_pool_tile_builds_for_an_h100_without_spilling(direction: str, monkeypatch) -> None:
    if not HAS_PTXAS:
        pytest.skip("this Triton has no CUDA compiler")
    kernel = getattr(fresh_copy(monkeypatch, "pool", interpret=False), f"_{direction}_kernel")
    assert len(kernel.configs) >= 6
    for config in kernel.configs:
        constants = {"SIZE": 3, "STRIDE": 2, **config.kwargs} | ({"SAVE": True} if direction == "forward" else {})
        pointers = {name: POOL_POINTERS[name] for name in kernel.fn.arg_names if name.endswith("_ptr")}
        usage = build_for_h100(kernel, pointers, constants, config.num_warps)
        assert " STACK:0 " in usage and " LOCAL:0 " in usage, f"{config}: {usage}"


def test_max_pool_falls_back_to_pytorch_where_triton_cannot_run(monkeypatch) -> None:
    import alexnet.model.pool as pool_module

    without_triton(monkeypatch, "pool")
    monkeypatch.setattr(pool_module, "_UNUSABLE", [])
    x, g = _pool_inputs((2, 8, 11, 9), 3, 2, channels_last=True)
    x.requires_grad_()
    pool = pool_module.MaxPool2d(3, 2)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # what the default looks at
    with pytest.warns(UserWarning, match="Triton kernels cannot run here.*compute capability") as caught:
        y = pool(x)
        pool(x)  # said once
    monkeypatch.undo()
    y.backward(g)
    assert len(caught) == 1
    want_y, want_grad = _pytorch_pool(x, g, 3, 2)
    assert torch.equal(y.detach().nan_to_num(-1), want_y.nan_to_num(-1)) and torch.equal(x.grad, want_grad)
    without_triton(monkeypatch, "pool")
    with pytest.raises(RuntimeError, match="compute capability"):  # named explicitly: no fallback
        pool_module.MaxPool2d(3, 2, kernels="triton")(x)


def test_compiled_and_exported_models_pool_with_pytorchs_operation(pool_kernels, monkeypatch) -> None:
    """torch.compile fuses PyTorch's max pooling itself (keeping a byte per output too), and an exported
    graph must hold PyTorch's operations: neither calls the kernels, even named explicitly."""
    from alexnet.model.pool import MaxPool2d

    monkeypatch.setattr(pool_kernels, "forward", lambda *a, **k: pytest.fail("the Triton kernels ran"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), MaxPool2d(3, 2, kernels="triton"))
    x = torch.rand(2, 3, 11, 11)
    want = torch.nn.functional.max_pool2d(model[0](x), 3, 2)
    exported = torch.export.export(model, (x,))
    assert "max_pool2d" in exported.graph_module.print_readable(print_output=False)
    torch.testing.assert_close(exported.module()(x), want)
    torch.testing.assert_close(torch.compile(model)(x), want)


# --- A convolution's bias and ReLU (kernels/bias_relu.py) ------------------------------------------


@pytest.fixture
def bias_relu_kernels(request, monkeypatch):
    """kernels/bias_relu.py interpreted, tiles of 8 pixels x 32 channels unless parametrized."""
    block_p, block_c = getattr(request, "param", (8, 32))
    module = interpreted(monkeypatch, "bias_relu", BLOCK_P=block_p, BLOCK_C=block_c)
    monkeypatch.setattr(module, "ROWS", 64)  # 3 x 9 x 11 pixels: four programs, the last one partly filled
    return module


def _bias_relu_inputs(channels_last: bool, dtype=torch.float32):
    """40 channels (a second tile of 32, partly masked), values that ReLU cuts about half of, a NaN."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 9, 11, generator=gen)
    x[1, 2, 3, 4] = float("nan")
    bias, g = torch.randn(40, generator=gen), torch.randn(x.shape, generator=gen)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype).contiguous(memory_format=layout), bias.to(dtype), g.to(dtype).contiguous(memory_format=layout)


def _pytorch_bias_relu(x, bias, g):
    """nn.Conv2d's bias add then an in-place nn.ReLU, as the model's modules compute them."""
    xi, bi = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y = torch.relu_(xi + bi.view(1, -1, 1, 1))
    y.backward(g)
    return y.detach(), xi.grad, bi.grad


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_bias_relu_kernels_equal_pytorch(bias_relu_kernels, channels_last: bool) -> None:
    """Values and the input's gradient bit for bit, NaN included, in the input's layout; the bias's
    gradient the same sum in another order."""
    x, bias, g = _bias_relu_inputs(channels_last)
    want_y, want_dx, want_db = _pytorch_bias_relu(x, bias, g)
    y = bias_relu_kernels.forward(x, bias)
    dx, db = bias_relu_kernels.backward(g, y)
    assert y.stride() == x.stride() and dx.stride() == x.stride() and db.dtype == torch.float32
    assert torch.equal(y.nan_to_num(-1), want_y.nan_to_num(-1)) and torch.equal(dx, want_dx)
    assert 0.3 < (dx == 0).float().mean() < 0.7  # ReLU's gradient mask mattered
    torch.testing.assert_close(db, want_db, rtol=1e-5, atol=1e-5)
    dx_other_layout, _ = bias_relu_kernels.backward(g.contiguous(memory_format=torch.contiguous_format), y)
    assert torch.equal(dx_other_layout, want_dx)


def test_bias_relu_kernels_in_bfloat16(bias_relu_kernels) -> None:
    x, bias, g = _bias_relu_inputs(channels_last=True, dtype=torch.bfloat16)
    want_y, want_dx, want_db = _pytorch_bias_relu(x.float(), bias.float(), g.float())  # sums in float32
    y = bias_relu_kernels.forward(x, bias)
    dx, db = bias_relu_kernels.backward(g, y)
    assert y.dtype == dx.dtype == torch.bfloat16
    # one bf16 step at most: the interpreter truncates to bf16, GPUs round (as PyTorch does: test_cuda.py)
    torch.testing.assert_close(y.float().nan_to_num(-1), want_y.nan_to_num(-1), rtol=2**-7, atol=0)
    mask = want_y.to(torch.bfloat16).float() > 0  # where PyTorch's rounded output passes the gradient
    torch.testing.assert_close(dx.float(), torch.where(mask | want_y.isnan(), g.float(), 0.0), rtol=0, atol=0)
    torch.testing.assert_close(db, want_db, rtol=1e-4, atol=1e-4)


def test_bias_relu_trains_through_the_kernels_saving_only_its_output(bias_relu_kernels) -> None:
    from alexnet.model.bias_relu import bias_relu

    x, bias, g = _bias_relu_inputs(channels_last=True)
    x.requires_grad_()
    bias = bias.double().requires_grad_()  # a parameter of another type: cast, and its gradient cast back
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = bias_relu(x, bias, kernels="triton")
    y.backward(g)
    assert len(saved) == 1 and saved[0] is y
    want_y, want_dx, want_db = _pytorch_bias_relu(x, bias.float(), g)
    assert torch.equal(y.detach().nan_to_num(-1), want_y.nan_to_num(-1)) and torch.equal(x.grad, want_dx)
    assert bias.grad.dtype == torch.float64
    torch.testing.assert_close(bias.grad.float(), want_db, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_every_bias_relu_tile_builds_for_an_h100_without_spilling(direction: str, monkeypatch) -> None:
    if not HAS_PTXAS:
        pytest.skip("this Triton has no CUDA compiler")
    module = fresh_copy(monkeypatch, "bias_relu", interpret=False)
    kernel = getattr(module, f"_{direction}_kernel")
    assert len(kernel.configs) >= 5
    pointers = {name: "*fp32" if name == "db_ptr" else "*bf16" for name in kernel.fn.arg_names if name.endswith("_ptr")}
    for config in kernel.configs:
        usage = build_for_h100(kernel, pointers, {"ROWS": module.ROWS, **config.kwargs}, config.num_warps)
        assert " STACK:0 " in usage and " LOCAL:0 " in usage, f"{config}: {usage}"


def test_bias_relu_falls_back_to_pytorch_where_triton_cannot_run(monkeypatch) -> None:
    import alexnet.model.bias_relu as bias_relu_module

    without_triton(monkeypatch, "bias_relu")
    monkeypatch.setattr(bias_relu_module, "_UNUSABLE", [])
    x, bias, g = _bias_relu_inputs(channels_last=True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # what the default looks at
    with pytest.warns(UserWarning, match="Triton kernels cannot run here.*compute capability") as caught:
        y = bias_relu_module.bias_relu(x, bias)
        bias_relu_module.bias_relu(x, bias)  # said once
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: t.device.type == "cuda"))
    assert len(caught) == 1
    want_y, _, _ = _pytorch_bias_relu(x, bias, g)
    assert torch.equal(y.nan_to_num(-1), want_y.nan_to_num(-1))
    with pytest.raises(RuntimeError, match="compute capability"):  # named explicitly: no fallback
        bias_relu_module.bias_relu(x, bias, kernels="triton")


# --- A convolution's bias, ReLU and LRN as one operation (kernels/lrn.py with a bias) -----------------


def _bias_relu_lrn_inputs(channels_last: bool, dtype=torch.float32):
    """_bias_relu_inputs large enough that LRN bites (its window sums reach k's size)."""
    x, bias, g = _bias_relu_inputs(channels_last, dtype)
    return x * 40, bias * 40, g


def _apart(x, bias, g):
    """bias_relu's kernels, then LRN's: values, x's gradient and bias's."""
    from alexnet.kernels import bias_relu as bias_relu_triton
    from alexnet.kernels import lrn as lrn_triton

    s = PAPER_LRN
    a = bias_relu_triton.forward(x, bias)
    y = lrn_triton.forward(a, s.size, s.scale, s.k, s.beta)
    da = lrn_triton.backward(a, g, s.size, s.scale, s.k, s.beta)
    dx, db = bias_relu_triton.backward(da, a)
    return y, dx, db


@pytest.mark.parametrize(
    ("channels_last", "dtype", "kernels"),
    [(False, torch.float32, 8), (True, torch.float32, 8), (True, torch.bfloat16, 8)],
    ids=["nchw", "channels_last", "bf16"],
    indirect=["kernels"],
)
def test_bias_relu_lrn_kernels_equal_bias_relu_then_lrn(kernels, bias_relu_kernels, channels_last, dtype) -> None:
    """The same values and x's gradient as the two operations apart, bit for bit, the NaN's spread
    through LRN's window included; bias's gradient the same sum in another order. 297 pixels: ten
    programs of 32, the last partly filled, each with its own partial sum of db."""
    s = PAPER_LRN
    x, bias, g = _bias_relu_lrn_inputs(channels_last, dtype)
    y = kernels.forward(x, s.size, s.scale, s.k, s.beta, bias=bias)
    dx, db = kernels.backward_with_bias(x, bias, g, s.size, s.scale, s.k, s.beta)
    want_y, want_dx, want_db = _apart(x, bias, g)
    assert y.stride() == dx.stride() == x.stride() and y.dtype == dx.dtype == dtype and db.dtype == torch.float32
    assert y.isnan().sum() == PAPER_LRN.size  # the NaN reached the channels whose window holds it, no others
    assert torch.equal(y.nan_to_num(-1), want_y.nan_to_num(-1))
    assert torch.equal(dx.nan_to_num(-1), want_dx.nan_to_num(-1))
    torch.testing.assert_close(db, want_db, rtol=1e-5, atol=1e-5, equal_nan=True)
    # LRN and the ReLU both matter here: the output is neither relu(x + b) nor its scaled copy
    a = torch.relu(x.float() + bias.float().view(1, -1, 1, 1))
    assert 0.3 < (a == 0).float().mean() < 0.7
    ratio = (y.float() / a)[(a > 1) & y.isfinite()]
    assert ratio.max() < 0.7 and ratio.max() - ratio.min() > 0.1


@pytest.mark.parametrize("kernels", [8], indirect=True)
def test_bias_relu_lrn_trains_through_the_kernels_saving_its_input_and_bias(kernels, bias_relu_kernels) -> None:
    from alexnet.model.bias_relu import bias_relu_lrn

    x, bias, g = _bias_relu_lrn_inputs(channels_last=True)
    x.requires_grad_()
    bias = bias.double().requires_grad_()  # a parameter of another type: cast, and its gradient cast back
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = bias_relu_lrn(x, bias, LocalResponseNorm(PAPER_LRN), kernels="triton")
    y.backward(g)
    assert len(saved) == 2 and saved[0] is x and saved[1].shape == bias.shape
    want_y, want_dx, want_db = _apart(x.detach(), bias.detach().float(), g)
    assert torch.equal(y.detach().nan_to_num(-1), want_y.nan_to_num(-1))
    assert torch.equal(x.grad.nan_to_num(-1), want_dx.nan_to_num(-1))
    assert bias.grad.dtype == torch.float64
    torch.testing.assert_close(bias.grad.float(), want_db, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_bias_relu_lrn_falls_back_to_the_operations_apart_where_triton_cannot_run(monkeypatch) -> None:
    import alexnet.model.bias_relu as bias_relu_module

    without_triton(monkeypatch, "lrn")
    monkeypatch.setattr(bias_relu_module, "_UNUSABLE_WITH_LRN", [])
    x, bias, g = _bias_relu_lrn_inputs(channels_last=True)
    lrn = LocalResponseNorm(PAPER_LRN, kernels="eager")
    with pytest.warns(UserWarning, match="bias, ReLU and LRN.*cannot run here.*compute capability") as caught:
        y = bias_relu_module.bias_relu_lrn(x, bias, lrn)
        bias_relu_module.bias_relu_lrn(x, bias, lrn)  # said once
    assert len(caught) == 1
    assert torch.equal(y.nan_to_num(-1), lrn(torch.relu(x + bias.view(1, -1, 1, 1))).nan_to_num(-1))
    with pytest.raises(RuntimeError, match="compute capability"):  # named explicitly: no fallback
        bias_relu_module.bias_relu_lrn(x, bias, lrn, kernels="triton")


@pytest.mark.long
@pytest.mark.parametrize(("kernels", "pool_kernels"), [(32, (64, 64))], indirect=True)  # big tiles: fewer to interpret
@pytest.mark.parametrize("bias_relu_kernels", [(64, 32)], indirect=True)
def test_the_paper_network_through_every_triton_kernel_equals_pytorch(kernels, pool_kernels, bias_relu_kernels) -> None:
    """The paper model as CUDA runs it (LRN, pools, biases and ReLUs in the Triton kernels, here
    interpreted; the grouped convolutions dense, conv1 over blocks of pixels) against PyTorch's
    operations: logits and every parameter's gradient."""
    from alexnet.model.net import CeilConv2d, GroupedConv2d, build_model
    from alexnet.model.pool import MaxPool2d

    torch.manual_seed(0)
    model = build_model("paper", 10, init="caffe").to(memory_format=torch.channels_last)
    model.eval()  # no dropout: both passes see the same network
    x = torch.rand(1, 3, 224, 224).contiguous(memory_format=torch.channels_last) * 3
    grads = {}
    for mode in ("triton", "pytorch"):
        for m in model.modules():
            if isinstance(m, (LocalResponseNorm, MaxPool2d)):
                m.kernels = "triton" if mode == "triton" else "eager"
            if isinstance(m, GroupedConv2d):
                m.form = "dense" if mode == "triton" else "grouped"
            if isinstance(m, CeilConv2d):
                m.layout = "space_to_depth" if mode == "triton" else "plain"
        model.bias_relu_kernels = "triton" if mode == "triton" else "modules"
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        grads[mode] = [logits.detach()] + [p.grad.clone() for p in model.parameters()]
    for got, want in zip(grads["triton"], grads["pytorch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
