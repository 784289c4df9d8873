"""The presets against docs/reference.md: parameter counts, layer shapes, conv1's output size rule,
torchvision equivalence, the paper's initialisation, argument checks and the two-tower grouping."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from alexnet.errors import UserError
from alexnet.model.lrn import PAPER_LRN, LocalResponseNorm, tensorflow_lrn
from alexnet.model.net import PRESETS, CeilConv2d, GroupedConv2d, block_diagonal, build_model, layer_table
from alexnet.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # many small tensor ops: threads only contend


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_params(k: int, cin: int, cout: int, groups: int = 1) -> int:
    return k * k * (cin // groups) * cout + cout


def fc_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


@pytest.fixture(scope="module")
def paper() -> nn.Module:
    torch.manual_seed(0)
    return build_model("paper")


# ---------------------------------------------------------------------------------------- counts


def test_paper_parameter_count_groups2(paper: nn.Module) -> None:
    assert n_params(paper) == 60_965_224  # docs/reference.md §2
    assert n_params(build_model("paper", groups=2)) == 60_965_224


def test_paper_parameter_count_groups1() -> None:
    assert n_params(build_model("paper", groups=1)) == 62_378_344


def test_torchvision_parameter_count() -> None:
    ours = n_params(build_model("torchvision"))
    assert ours == 61_100_840
    assert ours == n_params(torchvision.models.alexnet(weights=None))


def test_seed_parameter_count_and_shapes() -> None:
    # The seed README's list as the seed preset implements it: pooling after conv2 and conv3,
    # so fc6 sees 384 x 13 x 13; 4098 hidden units; every layer with biases.
    expected = (
        conv_params(11, 3, 96)
        + conv_params(5, 96, 256)
        + conv_params(3, 256, 384)
        + conv_params(3, 384, 384)
        + conv_params(3, 384, 384)
        + fc_params(384 * 13 * 13, 4098)
        + fc_params(4098, 4098)
        + fc_params(4098, 1000)
    )
    model = build_model("seed")
    assert n_params(model) == expected
    shapes = {label: shape for label, _, shape, _ in layer_table(model, 224)}
    assert shapes["conv1"] == (96, 55, 55)
    assert shapes["conv2"] == (256, 55, 55)
    assert shapes["pool2"] == (256, 27, 27)
    assert shapes["conv3"] == (384, 27, 27)
    assert shapes["pool3"] == (384, 13, 13)
    assert shapes["conv5"] == (384, 13, 13)
    assert shapes["fc6"] == (4098,)
    assert shapes["fc7"] == (4098,)
    assert shapes["fc8"] == (1000,)
    assert "pool1" not in shapes and "pool5" not in shapes
    # no pooling after conv5: `features --layer pool5` is refused (conv5 is what fc6 sees)
    assert "pool5" not in model.taps and model.taps["conv5"] == "features.12"
    # LRN in TensorFlow's convention: depth_radius 5 is an 11-channel window, alpha not divided
    lrns = [m for m in model.modules() if isinstance(m, LocalResponseNorm)]
    assert len(lrns) == 1
    assert lrns[0].spec == tensorflow_lrn(5, 2.0, 1e-4, 0.75)
    assert lrns[0].spec.size == 11 and lrns[0].spec.scale == 1e-4


def test_layer_table_parameters_sum_to_total(paper: nn.Module) -> None:
    rows = layer_table(paper, 224)
    assert sum(r[3] for r in rows) == 60_965_224


# ---------------------------------------------------------------------------------------- shapes

PAPER_SHAPES = {
    "conv1": (96, 55, 55),
    "lrn1": (96, 55, 55),
    "pool1": (96, 27, 27),
    "conv2": (256, 27, 27),
    "lrn2": (256, 27, 27),
    "pool2": (256, 13, 13),
    "conv3": (384, 13, 13),
    "conv4": (384, 13, 13),
    "conv5": (256, 13, 13),
    "pool5": (256, 6, 6),
    "fc6": (4096,),
    "fc7": (4096,),
    "fc8": (1000,),
}


@pytest.mark.parametrize("size", [224, 227])
def test_paper_layer_shapes_layer_table(paper: nn.Module, size: int) -> None:
    shapes = {label: shape for label, _, shape, _ in layer_table(paper, size)}
    for label, shape in PAPER_SHAPES.items():
        assert shapes[label] == shape, label
    paper.train()  # layer_table puts submodules in eval mode; leave the fixture as built


@pytest.mark.parametrize("size", [224, 227])
def test_paper_layer_shapes_hooks(paper: nn.Module, size: int) -> None:
    # Independent of layer_table: forward hooks on the real forward pass, labelled by module type.
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for m in list(paper.features) + list(paper.classifier):
        if isinstance(m, nn.Conv2d | nn.Linear | nn.MaxPool2d | LocalResponseNorm):
            kind = type(m).__name__ if not isinstance(m, nn.Conv2d) else "Conv2d"
            handles.append(m.register_forward_hook(lambda mod, i, o, k=kind: seen.append((k, tuple(o.shape[1:])))))
    try:
        paper.eval()
        with torch.no_grad():
            out = paper(torch.randn(2, 3, size, size))
    finally:
        for h in handles:
            h.remove()
        paper.train()
    assert out.shape == (2, 1000)
    assert seen == [
        ("Conv2d", (96, 55, 55)),
        ("LocalResponseNorm", (96, 55, 55)),
        ("MaxPool2d", (96, 27, 27)),
        ("Conv2d", (256, 27, 27)),
        ("LocalResponseNorm", (256, 27, 27)),
        ("MaxPool2d", (256, 13, 13)),
        ("Conv2d", (384, 13, 13)),
        ("Conv2d", (384, 13, 13)),
        ("Conv2d", (256, 13, 13)),
        ("MaxPool2d", (256, 6, 6)),
        ("Linear", (4096,)),
        ("Linear", (4096,)),
        ("Linear", (1000,)),
    ]


def test_paper_weight_shapes(paper: nn.Module) -> None:
    layers = paper.named_layers()
    assert layers["conv1"].weight.shape == (96, 3, 11, 11)
    assert layers["conv2"].weight.shape == (256, 48, 5, 5)
    assert layers["conv3"].weight.shape == (384, 256, 3, 3)
    assert layers["conv4"].weight.shape == (384, 192, 3, 3)
    assert layers["conv5"].weight.shape == (256, 192, 3, 3)
    assert layers["fc6"].weight.shape == (4096, 256 * 6 * 6)
    assert layers["fc7"].weight.shape == (4096, 4096)
    assert layers["fc8"].weight.shape == (1000, 4096)
    strides = {name: layers[name].stride for name in ("conv1", "conv2", "conv3", "conv4", "conv5")}
    assert strides == {"conv1": (4, 4), "conv2": (1, 1), "conv3": (1, 1), "conv4": (1, 1), "conv5": (1, 1)}
    pads = {name: layers[name].padding for name in ("conv1", "conv2", "conv3", "conv4", "conv5")}
    assert pads == {"conv1": (0, 0), "conv2": (2, 2), "conv3": (1, 1), "conv4": (1, 1), "conv5": (1, 1)}


def test_paper_groups1_weight_shapes() -> None:
    layers = build_model("paper", groups=1).named_layers()
    assert layers["conv2"].weight.shape == (256, 96, 5, 5)
    assert layers["conv4"].weight.shape == (384, 384, 3, 3)
    assert layers["conv5"].weight.shape == (256, 384, 3, 3)


def test_paper_lrn_and_classifier_order(paper: nn.Module) -> None:
    lrns = [m for m in paper.features if isinstance(m, LocalResponseNorm)]
    assert [m.spec for m in lrns] == [PAPER_LRN, PAPER_LRN]
    # the paper: dropout after the ReLU of fc6 and fc7, none before fc6, none after fc8
    kinds = [type(m) for m in paper.classifier]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert all(m.p == 0.5 for m in paper.classifier if isinstance(m, nn.Dropout))


@pytest.mark.parametrize("preset", ["paper", "seed", "torchvision"])
def test_every_preset_honours_dropout(preset: str) -> None:
    """dropout= sets p of both Dropout layers (before or after the ReLU, as the preset places them)."""
    with torch.device("meta"):  # the modules only: no weights to fill
        model = build_model(preset, 10, dropout=0.2)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2]


def test_paper_lrn_normalises_each_towers_maps_alone(paper: nn.Module) -> None:
    """cuda-convnet's two-GPU net ran rnorm1a on conv1a's 48 maps and rnorm1b on conv1b's (and conv2's
    128 and 128): lrn1 and lrn2 equal PyTorch's LRN run on each half of relu1's and relu2's outputs apart,
    which differs from a window across all maps. One tower (groups=1) or Caffe's way: across."""
    assert [m.towers for m in paper.features if isinstance(m, LocalResponseNorm)] == [2, 2]
    seen = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.detach().clone()))
        for name, m in paper.named_modules()
        if name in ("features.1", "features.2", "features.5", "features.6")  # relu1, lrn1, relu2, lrn2
    ]
    paper.eval()
    with torch.no_grad():
        paper(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 255 - 120)
    paper.train()
    for h in hooks:
        h.remove()
    alpha = PAPER_LRN.scale * PAPER_LRN.size  # PyTorch divides alpha by the window's size

    def lrn(x: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(x.double(), 5, alpha, PAPER_LRN.beta, PAPER_LRN.k)

    for relu, out in (("features.1", "features.2"), ("features.5", "features.6")):
        per_tower = torch.cat([lrn(t) for t in seen[relu].chunk(2, 1)], 1)
        torch.testing.assert_close(seen[out].double(), per_tower, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(seen[out].double(), lrn(seen[relu]), rtol=1e-5, atol=1e-6)
    for model in (build_model("paper", groups=1), build_model("paper", lrn_per_tower=False)):
        assert [m.towers for m in model.features if isinstance(m, LocalResponseNorm)] == [1, 1]
    assert [m.towers for m in build_model("seed").features if isinstance(m, LocalResponseNorm)] == [1]
    with pytest.raises(UserError, match="lrn_per_tower applies to the paper preset only, not 'seed'"):
        build_model("seed", lrn_per_tower=True)
    with pytest.raises(UserError, match="lrn_per_tower needs the two towers"):
        build_model("paper", groups=1, lrn_per_tower=True)


# ------------------------------------------------------------------------------------ CeilConv2d


def test_ceil_conv1_224_pads_right_and_bottom(paper: nn.Module) -> None:
    conv1 = paper.features[0]
    assert isinstance(conv1, CeilConv2d)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got = conv1(x)
        want = F.conv2d(F.pad(x, (0, 3, 0, 3)), conv1.weight, conv1.bias, stride=4)
        # not the same as padding top/left, nor as cropping: the extra zeros are past the far edges
        other = F.conv2d(F.pad(x, (3, 0, 3, 0)), conv1.weight, conv1.bias, stride=4)
    assert got.shape == (2, 96, 55, 55)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, other, atol=1e-3)


@pytest.mark.parametrize("size", [224, 227])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1_in_every_layout_is_the_same_function(paper: nn.Module, dtype, size: int) -> None:
    """Each input layout (CUDA's default in 16-bit arithmetic is "space_to_depth"), here forced on the
    CPU: the same outputs and parameter gradients as the plain convolution, and the input given to the
    convolution is what the layout says, in autocast's type, channels_last; the parameters unchanged."""
    conv1 = paper.features[0]
    x = torch.randn(4, 3, size, size).contiguous(memory_format=torch.channels_last)
    seen = []
    real = F.conv2d
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "conv2d", lambda x, w, *args: seen.append((x, w)) or real(x, w, *args))
        results = {}
        for layout in CeilConv2d.LAYOUTS:
            conv1.layout = layout
            conv1.zero_grad()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                y = conv1(x)
            y.float().square().sum().backward()
            results[layout] = y.detach().float(), conv1.weight.grad.clone(), conv1.bias.grad.clone()
    conv1.layout = None
    assert conv1.weight.shape == (96, 3, 11, 11) and results["plain"][0].shape == (4, 96, 55, 55)
    (plain, _), (pad8, pad8_weight), (blocks, blocks_weight) = seen
    assert plain.shape[1] == 3 and pad8.shape[1] == 8 and pad8_weight.shape == (96, 8, 11, 11)
    assert blocks.shape == (4, 48, 57, 57) and blocks_weight.shape == (96, 48, 3, 3)  # 4x4 blocks, 228 pixels
    assert blocks.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.bfloat16:
        assert pad8.dtype == blocks.dtype == torch.bfloat16  # cast before the copy, not after
    # input channel (c, a, b) of block (Y, X) is pixel (4Y + a, 4X + b) of colour c; zeros past the image
    c, a, b, by, bx = 2, 3, 1, 5, 7
    assert torch.equal(blocks[:, c * 16 + a * 4 + b, by, bx], x[:, c, 4 * by + a, 4 * bx + b].to(blocks.dtype))
    last = blocks[:, :, :, -1].reshape(4, 3, 4, 4, 57)  # the last block column, by (n, c, a, b, Y)
    for b in range(4):  # pixel column 224 + b: the image's for a 227-pixel one, zeros past it
        assert (last[:, :, :, b].abs().sum() > 0) == (224 + b < size)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    for layout in ("pad8", "space_to_depth"):
        for got, want in zip(results[layout], results["plain"], strict=True):
            torch.testing.assert_close(got, want, **{**tol, "atol": tol["atol"] * want.abs().max().item()})


def test_space_to_depth_for_other_strides_kernels_and_padding() -> None:
    """The rearrangement is general: kernel 5 at stride 2 (3 blocks of 2, one column of zeros), kernel 4
    at stride 4 (one block), padding 2 or a whole block, odd input sides; input gradients too."""
    torch.manual_seed(0)
    for k, s, pad, side in ((5, 2, 0, 17), (4, 4, 0, 16), (7, 3, 2, 20), (11, 4, 1, 31), (8, 4, 4, 24)):
        conv = CeilConv2d(3, 6, k, s, pad)
        x = torch.randn(2, 3, side, side + 1 if side % 2 else side, requires_grad=True)
        conv.layout = "plain"
        want = conv(x)
        (want_grad,) = torch.autograd.grad(want.square().sum(), x)
        conv.layout = "space_to_depth"
        got = conv(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(got.square().sum(), x)[0], want_grad, rtol=1e-5, atol=1e-5)


def test_space_to_depth_copies_an_image_of_whole_blocks_once() -> None:
    """224 pixels are 56 blocks of 4: the image goes into the blocks in one copy (a padded copy first
    was 0.21 ms of the paper step's 13.3 on an H100), the zeros around it are fills of the border alone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.elements: list[int] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten.constant_pad_nd, torch.ops.aten.clone):
                self.elements.append(out.numel())
            return out

    conv = CeilConv2d(3, 96, 11, 4, layout="space_to_depth")
    x = torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), Copies() as copies:
        conv(x)
    image = x.numel()  # the weight's own rearrangement is the rest, 96 x 48 x 3 x 3 elements
    assert [n for n in copies.elements if n >= image] == [image]


def test_conv1_keeps_its_layout_on_the_cpu_and_in_exports(paper: nn.Module, monkeypatch) -> None:
    """The default: the CPU (fp32 or bf16) gives the convolution the 3 channels; so does an export or
    a trace, even with another layout set."""
    conv1 = paper.features[0]
    shapes = []
    real = nn.Conv2d._conv_forward
    monkeypatch.setattr(
        nn.Conv2d, "_conv_forward", lambda self, x, w, b: shapes.append(int(x.shape[1])) or real(self, x, w, b)
    )
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        conv1(x)
    for layout in ("pad8", "space_to_depth"):  # forced: exported graphs hold the plain convolution
        conv1.layout = layout
        torch.export.export(conv1, (x,))
        with warnings.catch_warnings():  # torch.jit's deprecation; export.py still writes TorchScript with it
            warnings.simplefilter("ignore")
            torch.jit.trace(conv1, x, check_trace=False)  # the check would rerun it untraced
    conv1.layout = None
    assert shapes == [3] * 5
    with pytest.raises(ValueError, match="unknown conv1 layout 'tiles'"):
        CeilConv2d(3, 96, 11, 4, layout="tiles")


def test_ceil_conv1_227_is_plain_conv(paper: nn.Module) -> None:
    conv1 = paper.features[0]
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        got = conv1(x)
        want = F.conv2d(x, conv1.weight, conv1.bias, stride=4)
    assert got.shape == (2, 96, 55, 55)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- torchvision


def test_torchvision_equivalence() -> None:
    torch.manual_seed(1)
    tv = torchvision.models.alexnet(weights=None, num_classes=10)
    ours = build_model("torchvision", num_classes=10)
    assert list(ours.state_dict().keys()) == list(tv.state_dict().keys())
    for k, v in tv.state_dict().items():
        assert ours.state_dict()[k].shape == v.shape, k
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    tv.eval()
    ours.eval()
    with torch.no_grad():
        a, b = tv(x), ours(x)
    assert a.shape == (2, 10)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # other input sizes go through the adaptive average pool the same way
    x2 = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(ours(x2), tv(x2), rtol=0, atol=1e-6)
    # training mode: dropout before fc6 and fc7 as in torchvision, so the same RNG gives the same masks
    tv.train()
    ours.train()
    with torch.no_grad():
        torch.manual_seed(7)
        a = tv(x)
        torch.manual_seed(7)
        b = ours(x)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ init


def _check_normal(t: torch.Tensor, std: float, name: str) -> None:
    n = t.numel()
    # sample mean ~ N(0, std^2 / n); sample std relative error ~ 1 / sqrt(2n): 6 sigma bounds
    assert abs(t.mean().item()) < 6 * std / math.sqrt(n), name
    assert abs(t.std().item() / std - 1) < max(6 / math.sqrt(2 * n), 1e-3), name


def test_paper_init() -> None:
    torch.manual_seed(0)
    layers = build_model("paper", init="paper").named_layers()
    assert set(layers) == {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"}
    for name, layer in layers.items():
        _check_normal(layer.weight.detach(), 0.01, name)
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert torch.equal(layers[name].bias, torch.ones_like(layers[name].bias)), name
    for name in ("conv1", "conv3", "fc8"):
        assert torch.equal(layers[name].bias, torch.zeros_like(layers[name].bias)), name


def test_caffe_init() -> None:
    # bvlc_alexnet's: fc6 and fc7 weights N(0, 0.005), all others N(0, 0.01) (fc8 and conv1 included);
    # biases 0.1 where the paper's are 1 (docs/reference.md §5: 1 "gave flat loss"), 0 elsewhere
    torch.manual_seed(1)
    layers = build_model("paper", init="caffe").named_layers()
    for name, layer in layers.items():
        _check_normal(layer.weight.detach(), 0.005 if name in ("fc6", "fc7") else 0.01, name)
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert torch.equal(layers[name].bias, torch.full_like(layers[name].bias, 0.1)), name
    for name in ("conv1", "conv3", "fc8"):
        assert torch.equal(layers[name].bias, torch.zeros_like(layers[name].bias)), name


def test_seed_init_fc8_bias_one() -> None:
    layers = build_model("seed", init="paper").named_layers()
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7", "fc8"):
        assert torch.equal(layers[name].bias, torch.ones_like(layers[name].bias)), name
    for name in ("conv1", "conv3"):
        assert torch.equal(layers[name].bias, torch.zeros_like(layers[name].bias)), name
    _check_normal(layers["conv1"].weight.detach(), 0.01, "conv1")
    _check_normal(layers["fc8"].weight.detach(), 0.01, "fc8")


@pytest.mark.parametrize("preset, own", [("paper", "paper"), ("torchvision", "default")])
def test_each_preset_defaults_to_an_initialisation_that_learns(preset: str, own: str) -> None:
    """The paper's N(0, 0.01) with biases of 1 blows up and stays at chance, PyTorch's default starts with
    vanishing logits (docs/learning.md): the paper and torchvision presets default to He-normal; `alexnet
    info` names their own. The seed keeps its own: He-normal takes its loss to NaN (tests/test_learning.py)."""
    assert PRESETS[preset].default_init == "kaiming"
    assert TrainConfig(preset=preset).resolved().init == "kaiming"
    assert any("--init kaiming" in note and f"--init {own} gives" in note for note in PRESETS[preset].notes)
    assert PRESETS["seed"].default_init == "paper"


def test_kaiming_init() -> None:
    torch.manual_seed(3)
    layers = build_model("paper", init="kaiming").named_layers()
    for name, layer in layers.items():
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias)), name
        if name.startswith("conv"):
            w = layer.weight.detach()
            fan_out = w.shape[0] * w.shape[2] * w.shape[3]
            _check_normal(w, math.sqrt(2.0 / fan_out), name)
        else:
            _check_normal(layer.weight.detach(), 0.01, name)


def test_default_init_torchvision_matches_pytorch_default() -> None:
    # PyTorch's default: kaiming_uniform(a=sqrt(5)) i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    layers = build_model("torchvision", init="default").named_layers()
    for name, layer in layers.items():
        w = layer.weight.detach()
        bound = 1 / math.sqrt(w[0].numel())
        assert w.abs().max().item() <= bound + 1e-7, name
        assert w.abs().max().item() > 0.9 * bound, name
        assert layer.bias.abs().max().item() <= bound + 1e-7, name


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs",
    [
        {"preset": "vgg"},
        {"preset": "paper", "groups": 3},
        {"preset": "paper", "groups": 0},
        {"preset": "seed", "groups": 2},
        {"preset": "torchvision", "groups": 1},
        {"preset": "paper", "dropout": 1.0},
        {"preset": "paper", "dropout": -0.1},
        {"preset": "paper", "num_classes": 1},
    ],
)
def test_build_model_user_errors(kwargs: dict) -> None:
    with pytest.raises(UserError):
        build_model(**kwargs)


def test_build_model_unknown_init() -> None:
    with pytest.raises(UserError):
        build_model("torchvision", num_classes=2, init="xavier")


# ----------------------------------------------------------------------------------- groups


def _changed_outputs(conv: nn.Conv2d, in_lo: int, in_hi: int, side: int = 7) -> torch.Tensor:
    """Which output channels change when input channels in_lo..in_hi-1 change."""
    torch.manual_seed(5)
    x = torch.randn(1, conv.in_channels, side, side)
    y = x.clone()
    y[:, in_lo:in_hi] = torch.randn(1, in_hi - in_lo, side, side)
    with torch.no_grad():
        diff = (conv(x) - conv(y)).abs().amax(dim=(0, 2, 3))
    return diff > 1e-6


@pytest.mark.parametrize("name, cin, cout", [("conv2", 96, 256), ("conv4", 384, 384), ("conv5", 384, 256)])
def test_grouped_convs_are_two_towers(paper: nn.Module, name: str, cin: int, cout: int) -> None:
    conv = paper.named_layers()[name]
    assert (conv.in_channels, conv.out_channels) == (cin, cout)
    first = _changed_outputs(conv, 0, cin // 2)
    assert first[: cout // 2].all()  # the first tower's outputs see its inputs
    assert not first[cout // 2 :].any()  # the second tower's outputs do not
    second = _changed_outputs(conv, cin // 2, cin)
    assert second[cout // 2 :].all()
    assert not second[: cout // 2].any()


def test_conv3_sees_both_towers(paper: nn.Module) -> None:
    conv3 = paper.named_layers()["conv3"]
    assert _changed_outputs(conv3, 0, 128).all()
    assert _changed_outputs(conv3, 128, 256).all()


def test_groups1_conv2_is_full() -> None:
    conv2 = build_model("paper", groups=1).named_layers()["conv2"]
    assert _changed_outputs(conv2, 0, 48).all()


@pytest.mark.parametrize("name, cin, cout", [("conv2", 96, 256), ("conv4", 384, 384), ("conv5", 384, 256)])
def test_dense_grouped_convs_are_still_two_towers(paper: nn.Module, name: str, cin: int, cout: int) -> None:
    """As CUDA runs them (one dense convolution, block-diagonal weight), and as a convolution per tower:
    the same towers."""
    conv = paper.named_layers()[name]
    assert isinstance(conv, GroupedConv2d) and conv.groups == 2
    for form in ("dense", "towers"):
        conv.form = form
        try:
            assert _changed_outputs(conv, 0, cin // 2)[: cout // 2].all()
            assert not _changed_outputs(conv, 0, cin // 2)[cout // 2 :].any()
            assert not _changed_outputs(conv, cin // 2, cin)[: cout // 2].any()
        finally:
            conv.form = None


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("form", ["dense", "towers"])
@pytest.mark.parametrize("groups", [2, 4])
def test_dense_grouped_conv_gives_the_grouped_values_and_gradients(groups: int, form: str, channels_last) -> None:
    """The function and every gradient of nn.Conv2d(groups=...), and the same parameters; the output in
    the input's memory layout."""
    torch.manual_seed(groups)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    grouped = nn.Conv2d(8, 12, 3, padding=1, groups=groups)
    dense = GroupedConv2d(8, 12, 3, padding=1, groups=groups, form=form)
    dense.load_state_dict(grouped.state_dict())  # the same names and shapes
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=layout)
    g = torch.randn(2, 12, 7, 7)
    results = []
    for conv in (grouped, dense):
        xi = x.clone().requires_grad_()
        y = conv(xi)
        y.backward(g)
        results.append((y.detach(), xi.grad, conv.weight.grad, conv.bias.grad))
    assert results[1][0].is_contiguous(memory_format=layout)
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w = block_diagonal(dense.weight, groups)
    per_in, per_out = 8 // groups, 12 // groups
    for i in range(groups):  # tower i's filters see only its own inputs
        block = w[i * per_out : (i + 1) * per_out]
        assert torch.equal(block[:, i * per_in : (i + 1) * per_in], dense.weight[i * per_out : (i + 1) * per_out])
        assert block.count_nonzero() == dense.weight[i * per_out : (i + 1) * per_out].count_nonzero()


def test_grouped_conv_is_grouped_on_the_cpu_and_when_exported(monkeypatch) -> None:
    """Dense only pays on CUDA (oneDNN does groups well); an exported graph holds the grouped one."""
    seen = []
    real = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda x, w, *a: seen.append(w.shape[1]) or real(x, w, *a))
    conv = GroupedConv2d(8, 12, 3, groups=2)
    conv(torch.randn(1, 8, 5, 5))
    assert seen == [4]
    monkeypatch.undo()
    for form in ("dense", "towers"):
        conv.form = form
        exported = torch.export.export(conv, (torch.randn(1, 8, 5, 5),))
        (node,) = [n for n in exported.graph.nodes if n.op == "call_function"]
        assert node.target == torch.ops.aten.conv2d.default and node.args[-1] == 2  # groups
    with pytest.raises(ValueError, match="unknown grouped convolution form 'split'"):
        GroupedConv2d(8, 12, 3, groups=2, form="split")


# ------------------------------------------------------------------------------------ bias and ReLU


def test_lrn_joins_the_bias_and_relu_before_it_where_it_runs_in_triton(monkeypatch) -> None:
    """With fuse_lrn (off by default: slower on an H200), conv1 and conv2's bias, ReLU and LRN as one
    operation (bias_relu_lrn) where the bias and ReLU run as one and the LRN's kernels are Triton's;
    not where a hook watches the LRN. The same values as the modules one by one."""
    import alexnet.model.net as model_module

    calls = []

    def spy_bias_relu(x, bias, kernels):
        calls.append("bias_relu")
        return torch.relu(x + bias.view(1, -1, 1, 1))

    def spy_bias_relu_lrn(x, bias, lrn, kernels):
        calls.append(f"bias_relu_lrn {kernels}")
        return lrn(torch.relu(x + bias.view(1, -1, 1, 1)))

    monkeypatch.setattr(model_module, "bias_relu", spy_bias_relu)
    monkeypatch.setattr(model_module, "bias_relu_lrn", spy_bias_relu_lrn)
    model = build_model("paper", 10, init="caffe").eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        want = model(x)
        model.bias_relu_kernels = "triton"
        torch.testing.assert_close(model(x), want)
        assert calls == ["bias_relu"] * 5  # the CPU's LRN is not Triton's
        lrns = [m for m in model.modules() if isinstance(m, LocalResponseNorm)]
        for lrn in lrns:
            lrn.kernels = "triton"
        for lrn in lrns:  # what runs them here: PyTorch's operations
            monkeypatch.setattr(lrn, "forward", LocalResponseNorm(lrn.spec, kernels="eager").forward)
        calls.clear()
        torch.testing.assert_close(model(x), want)
        assert model.fuse_lrn is False and calls == ["bias_relu"] * 5
        model.fuse_lrn = True
        calls.clear()
        torch.testing.assert_close(model(x), want)
        assert calls == ["bias_relu_lrn triton"] * 2 + ["bias_relu"] * 3
        handle = lrns[0].register_forward_hook(lambda *args: None)
        calls.clear()
        torch.testing.assert_close(model(x), want)
        handle.remove()
        assert calls == ["bias_relu", "bias_relu_lrn triton"] + ["bias_relu"] * 3
        model.fuse_lrn = False
        calls.clear()
        torch.testing.assert_close(model(x), want)
        assert calls == ["bias_relu"] * 5


def test_bias_and_relu_run_as_one_operation_unless_a_hook_watches(monkeypatch) -> None:
    """bias_relu="triton" (CUDA's default): each convolution runs without its bias and hands it, with
    its output, to bias_relu.bias_relu; except where a hook watches the convolution or its ReLU (a
    feature tap), and under export. The same values as the modules one by one (the CPU's default)."""
    import alexnet.model.net as model_module

    calls = []

    def spy(x: torch.Tensor, bias: torch.Tensor, kernels: str | None) -> torch.Tensor:
        calls.append(kernels)
        return torch.relu(x + bias.view(1, -1, 1, 1))

    monkeypatch.setattr(model_module, "bias_relu", spy)
    model = build_model("paper", 10, init="caffe").eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        want = model(x)
        assert calls == []
        model.bias_relu_kernels = "triton"
        torch.testing.assert_close(model(x), want)
        assert calls == ["triton"] * 5
        taps = []
        relu1 = model.features[1]
        assert isinstance(relu1, nn.ReLU) and model.labels["features.1"] == "relu1"
        handle = relu1.register_forward_hook(lambda m, args, out: taps.append(out.clone()))
        calls.clear()
        torch.testing.assert_close(model(x), want)
        handle.remove()
        assert len(calls) == 4 and len(taps) == 1  # conv1 and relu1 ran as modules, and the tap saw them
        torch.testing.assert_close(taps[0], torch.relu(model.features[0](x)))
    calls.clear()
    exported = torch.export.export(model, (x,))
    assert calls == [] and "aten.relu" in exported.graph_module.print_readable(print_output=False)
