"""AlexNet presets: the 2012 paper's network, the seed document's literal variant, and torchvision's.

Each preset is a plain table of layers, read like the paper's Figure 2. One `AlexNet` module builds
any of them as `features` (convolutions) + `classifier` (fully connected), so the `torchvision`
preset has exactly torchvision's `state_dict` keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .bias_relu import bias_relu, bias_relu_lrn
from .lrn import LRN_CONVENTIONS, PAPER_LRN, LocalResponseNorm, LRNSpec, tensorflow_lrn
from .pool import MaxPool2d


@dataclass(frozen=True)
class Conv:
    name: str
    out: int
    kernel: int
    stride: int = 1
    pad: int = 0
    groups: int = 1  # 2 = the paper's two-GPU towers: each half of the outputs sees half of the inputs
    lrn: bool = False  # LRN after the ReLU
    pool: bool = False  # overlapping 3x3 / stride 2 max pooling after the ReLU (and LRN)


@dataclass(frozen=True)
class Preset:
    name: str
    convs: tuple[Conv, ...]
    hidden: int  # units in fc6 and fc7
    lrn: LRNSpec | None
    lrn_towers: int  # LRN's window stays within each of this many equal groups of channels (1: across all)
    input_size: int
    ceil_conv1: bool  # cuda-convnet's output size 1 + ceil((in - k) / s): 224 and 227 both give 55
    dropout_first: bool  # torchvision: dropout before each hidden linear; paper: after its ReLU
    adaptive_pool: bool  # torchvision's AdaptiveAvgPool2d(6) before the classifier
    bias_one: tuple[str, ...]  # layers whose biases start at 1 under the paper's initialisation
    default_init: str
    notes: tuple[str, ...]  # how the preset departs from the paper, for `alexnet info`


# The paper's initialisation, N(0, 0.01) weights and biases of 1, blows up in the first steps and leaves a
# flat loss (docs/learning.md, benchmarks/collapse.py): the presets that have it default to one that learns.
KAIMING_NOTE = (
    "initialisation: He-normal convolutions, N(0, 0.01) fully connected layers, zero biases (--init kaiming), "
    "not the paper's N(0, 0.01) with biases of 1, whose loss blows up in the first steps and then stays at "
    "chance, the fully connected ReLUs dead (docs/learning.md); --init paper gives the paper's own"
)

PAPER = Preset(
    name="paper",
    convs=(
        Conv("conv1", 96, 11, stride=4, lrn=True, pool=True),
        Conv("conv2", 256, 5, pad=2, groups=2, lrn=True, pool=True),
        Conv("conv3", 384, 3, pad=1),  # the one layer whose kernels see both towers
        Conv("conv4", 384, 3, pad=1, groups=2),
        Conv("conv5", 256, 3, pad=1, groups=2, pool=True),
    ),
    hidden=4096,
    lrn=PAPER_LRN,
    lrn_towers=2,  # each GPU normalised its own maps (cuda-convnet's rnorm1a: channels=48, of conv1a)
    input_size=224,
    ceil_conv1=True,
    dropout_first=False,
    adaptive_pool=False,
    bias_one=("conv2", "conv4", "conv5", "fc6", "fc7"),
    default_init="kaiming",
    notes=(
        KAIMING_NOTE,
        "224x224 input: conv1 uses cuda-convnet's output size 1 + ceil((224 - 11) / 4) = 55, "
        "i.e. 3 zero pixels past the right and bottom edges; 227x227 input needs no padding",
        "LRN as printed in the paper: s = alpha = 1e-4 (cuda-convnet divides alpha by 5)",
        "one device: the two towers are grouped convolutions (groups=2), not two GPUs; LRN normalises "
        "each tower's maps alone, as each GPU did (--no-lrn-per-tower: across both, as Caffe's)",
    ),
)

SEED = Preset(
    name="seed",
    convs=(
        Conv("conv1", 96, 11, stride=4, lrn=True),
        Conv("conv2", 256, 5, pad=2, pool=True),
        Conv("conv3", 384, 3, pad=1, pool=True),
        Conv("conv4", 384, 3, pad=1),
        Conv("conv5", 384, 3, pad=1),
    ),
    hidden=4098,
    lrn=tensorflow_lrn(depth_radius=5, bias=2.0, alpha=1e-4, beta=0.75),
    lrn_towers=1,
    input_size=224,
    ceil_conv1=True,
    dropout_first=False,
    adaptive_pool=False,
    bias_one=("conv2", "conv4", "conv5", "fc6", "fc7", "fc8"),
    default_init="paper",  # the seed's own; neither it nor kaiming learns yet (docs/learning.md)
    notes=(
        "literal to the seed README's layer list, not to the paper:",
        "initialisation: the seed's, N(0, 0.01) with biases of 1 (fc8's too), whose loss stays at chance; "
        "--init kaiming takes its loss to NaN within 10 steps: no initialisation is known to train this preset "
        "yet (docs/learning.md)",
        "pooling after conv2 and conv3 (paper: after conv1, conv2, conv5), so fc6 sees 384x13x13",
        "conv5 has 384 outputs (paper: 256); fc6 and fc7 have 4098 units (paper: 4096)",
        "LRN in TensorFlow's convention: depth_radius 5 = an 11-channel window, alpha not divided, "
        "bias 2 (paper: 5 channels)",
        "no groups: every convolution is fully connected across channels (paper: groups=2 in conv2/4/5)",
        "biases 1 in all fully connected layers, fc8 included (paper: the hidden ones only)",
        "the seed lists no ReLU for fc2; it is kept, as in the paper",
        "stride-1 convolutions pad to keep their size ('SAME'); conv1 as in the paper preset",
        "learning rate schedule: use --schedule inverse-time for the seed's own decay",
    ),
)

TORCHVISION = Preset(
    name="torchvision",
    convs=(
        Conv("conv1", 64, 11, stride=4, pad=2, pool=True),
        Conv("conv2", 192, 5, pad=2, pool=True),
        Conv("conv3", 384, 3, pad=1),
        Conv("conv4", 256, 3, pad=1),
        Conv("conv5", 256, 3, pad=1, pool=True),
    ),
    hidden=4096,
    lrn=None,
    lrn_towers=1,
    input_size=224,
    ceil_conv1=False,
    dropout_first=True,
    adaptive_pool=True,
    bias_one=(),
    default_init="kaiming",
    notes=(
        "torchvision.models.alexnet: Krizhevsky's 2014 'one weird trick' variant, not the 2012 paper",
        "64-192-384-256-256 channels, no LRN, no groups, adaptive average pooling to 6x6",
        "dropout before fc6 and fc7 instead of after",
        "initialisation: He-normal convolutions, N(0, 0.01) fully connected layers (N(0, 1/inputs) past 10,000 "
        "inputs), zero biases (--init kaiming), "
        "not PyTorch's default, torchvision's, whose logits start 15x smaller and whose loss stays at chance "
        "for the first epochs (docs/learning.md); --init default gives torchvision's",
    ),
)

PRESETS = {p.name: p for p in (PAPER, SEED, TORCHVISION)}
INITS = ("paper", "caffe", "kaiming", "default")


class Conv2d(nn.Conv2d):
    """nn.Conv2d, whose convolution can also be asked for without the bias: AlexNet.forward adds the
    bias together with the ReLU after it, in one operation (bias_relu.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x, self.bias)

    def convolve(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, self.weight, bias)


class CeilConv2d(Conv2d):
    """A convolution with cuda-convnet's output size, 1 + ceil((in - k) / stride).

    The missing rows and columns are read as zeros past the bottom and right edges, so a 224x224
    image gives conv1 the paper's 55x55 output, and a 227x227 one (Caffe's input) gives the same
    with no padding at all.

    `layout`: how the input reaches the convolution, the same function and gradients each way:
      "plain"           its 3 colour channels as they are;
      "pad8"            padded with zero channels to 8 (and the weight with zero input channels, so no
                        parameter changes), in the same copy as the pixels, already in autocast's 16-bit
                        type: cuDNN's bf16/fp16 kernels want channels in multiples of 8 and otherwise pad
                        the input themselves, forward and weight gradient (nhwcAddPaddingKernel, 0.7 ms of
                        the paper step's 35 on an H200);
      "space_to_depth"  each 4x4 block of pixels (a stride's worth) as 48 channels, and the 11x11 kernel,
                        zero-padded to 12x12, as a 3x3 one over them: a stride-1 3x3 convolution of 48
                        channels, a shape cuDNN's kernels are made for, with 432 products per output
                        instead of "pad8"'s 968 (the 3 x 11 x 11 = 363 real ones and zeros).
    None (the default): "space_to_depth" on CUDA in 16-bit arithmetic, "plain" elsewhere and always
    under export or tracing (an exported graph holds the layer as it is written).
    """

    LAYOUTS = ("plain", "pad8", "space_to_depth")

    def __init__(self, *args, layout: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if layout not in (None, *self.LAYOUTS):
            raise ValueError(f"unknown conv1 layout {layout!r}: choose one of {', '.join(self.LAYOUTS)}")
        self.layout = layout

    def convolve(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        extra_h, extra_w = (-(x.shape[-2] - k)) % s, (-(x.shape[-1] - k)) % s
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        sixteen_bit_cuda = x.is_cuda and dtype in (torch.float16, torch.bfloat16)
        layout = self.layout or ("space_to_depth" if sixteen_bit_cuda else "plain")
        if torch.jit.is_tracing() or torch.compiler.is_exporting() or self.groups != 1:
            layout = "plain"
        if layout == "space_to_depth" and s > 1 and self.padding_mode == "zeros" and self.dilation == (1, 1):
            return self._space_to_depth(x.to(dtype), bias, extra_h, extra_w)
        more = -self.in_channels % 8
        if layout == "pad8" and more:
            x = F.pad(x.to(dtype), (0, extra_w, 0, extra_h, 0, more))
            return self._conv_forward(x, F.pad(self.weight, (0, 0, 0, 0, 0, more)), bias)
        if extra_h or extra_w:
            x = F.pad(x, (0, extra_w, 0, extra_h))
        return self._conv_forward(x, self.weight, bias)

    def _space_to_depth(self, x: torch.Tensor, bias: torch.Tensor | None, extra_h: int, extra_w: int) -> torch.Tensor:
        """The same convolution as a stride-1 one over blocks of stride x stride pixels taken as channels:
        input channel (c, a, b) of block (Y, X) is x[c, sY + a, sX + b], and the weight's (c, a, b) at
        (p, q) is the original's at (c, sp + a, sq + b), zero beyond the kernel."""
        (k, _), (s, _), (pad, _) = self.kernel_size, self.stride, self.padding
        n, c, h, w = x.shape
        blocks = -(-k // s)  # the kernel's side in blocks: 11 pixels at stride 4 -> 3 blocks of 4
        out_h, out_w = (h + 2 * pad + extra_h - k) // s + 1, (w + 2 * pad + extra_w - k) // s + 1
        rows, cols = out_h - 1 + blocks, out_w - 1 + blocks  # the whole blocks the outputs read
        top, left, bottom, right = pad // s, pad // s, (pad + h) // s, (pad + w) // s
        if pad % s == 0 and h % s == 0 and w % s == 0 and bottom <= rows and right <= cols:
            # the image is whole blocks (224 pixels, 56 of 4): one copy of it into channels_last order
            # (n, Y, X, c, a, b), zeros around it; not a padded copy first and then this one
            x_blocks = x.new_empty(n, rows, cols, c, s, s)
            for around in (x_blocks[:, :top], x_blocks[:, bottom:], x_blocks[:, :, :left], x_blocks[:, :, right:]):
                around.zero_()
            x_blocks[:, top:bottom, left:right] = x.reshape(n, c, h // s, s, w // s, s).permute(0, 2, 4, 1, 3, 5)
        else:  # zeros before (the layer's padding) and after, then the same rearrangement
            x = F.pad(x, (pad, s * cols - w - pad, pad, s * rows - h - pad))
            x_blocks = x.reshape(n, c, rows, s, cols, s).permute(0, 2, 4, 1, 3, 5)
        x = x_blocks.reshape(n, rows, cols, c * s * s).permute(0, 3, 1, 2)  # seen as (n, c*s*s, Y, X)
        o = self.out_channels
        weight = F.pad(self.weight, (0, blocks * s - k, 0, blocks * s - k)).reshape(o, c, blocks, s, blocks, s)
        weight = weight.permute(0, 1, 3, 5, 2, 4).reshape(o, c * s * s, blocks, blocks)
        return F.conv2d(x, weight, bias)


class GroupedConv2d(Conv2d):
    """A convolution split into `groups` towers (the paper's two GPUs), the same parameters as
    nn.Conv2d(groups=...), which it is everywhere but in how CUDA computes it.

    `form`: how it is computed, the same function and, since no parameter owns a zero, the same gradients:
      "grouped"  PyTorch's grouped convolution. cuDNN's in channels_last copies each group's channels out
                 (nhwcSliceCKernel, 1.3 ms of the paper step's 35 on an H200);
      "dense"    one dense convolution whose weight is block-diagonal: each tower's filters against its
                 own input channels, zeros elsewhere. Twice the arithmetic in these layers, yet the paper
                 step with groups=1 ran 1.05x faster than with cuDNN's groups (benchmarks/RESULTS.md);
      "towers"   each tower's input channels copied out, a plain convolution per tower, the outputs
                 joined: the grouped arithmetic with no zeros, for copies of the input and output.
    None (the default): "dense" on CUDA, "grouped" elsewhere. Export and tracing record "grouped".
    """

    FORMS = ("grouped", "dense", "towers")

    def __init__(self, *args, form: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if form not in (None, *self.FORMS):
            raise ValueError(f"unknown grouped convolution form {form!r}: choose one of {', '.join(self.FORMS)}")
        self.form = form

    def convolve(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        form = self.form or ("dense" if x.is_cuda else "grouped")
        if self.padding_mode != "zeros" or torch.jit.is_tracing() or torch.compiler.is_exporting():
            form = "grouped"
        if form == "dense":
            weight = block_diagonal(self.weight, self.groups)
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        if form == "towers":
            channels_last = x.is_contiguous(memory_format=torch.channels_last)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            inputs = [t.contiguous(memory_format=layout) for t in x.chunk(self.groups, 1)]
            biases = bias.chunk(self.groups) if bias is not None else [None] * self.groups
            towers = zip(inputs, self.weight.chunk(self.groups), biases, strict=True)
            return torch.cat([F.conv2d(t, w, b, self.stride, self.padding, self.dilation) for t, w, b in towers], 1)
        return self._conv_forward(x, self.weight, bias)


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped convolution's weight (out, in / groups, kh, kw) as the dense (out, in, kh, kw) one."""
    width = weight.shape[1]  # input channels per group
    towers = weight.chunk(groups)
    return torch.cat([F.pad(w, (0, 0, 0, 0, g * width, (groups - 1 - g) * width)) for g, w in enumerate(towers)])


class AlexNet(nn.Module):
    """`bias_relu_kernels`: how each convolution's bias and ReLU run. "modules": the Conv2d and ReLU modules one
    after the other; "triton": one operation with Triton kernels (bias_relu.py), except where a hook
    watches either module (the feature taps) or under torch.compile, export and tracing; None (the
    default): "triton" on CUDA, "modules" elsewhere.
    `fuse_lrn`: True runs conv1's and conv2's bias, ReLU and LRN as one operation (bias_relu.bias_relu_lrn)
    where the bias and ReLU run as one and the LRN in its Triton kernels (on CUDA, or named). False, the
    default, keeps LRN apart: on an H200 the step ran 1.13x faster so (benchmarks/RESULTS.md), the
    fused kernels saving memory traffic but running slower than the two apart."""

    def __init__(self, preset: Preset, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.preset = preset
        self.bias_relu_kernels: str | None = None
        self.fuse_lrn = False
        self.labels: dict[str, str] = {}  # module path -> name in the paper's terms (conv1, lrn1, fc6...)
        self.taps: dict[str, str] = {}  # layer -> module path whose output is that layer's activation

        features: list[nn.Module] = []
        in_ch = 3
        for i, c in enumerate(preset.convs, start=1):
            conv_type = CeilConv2d if (i == 1 and preset.ceil_conv1) else GroupedConv2d if c.groups > 1 else Conv2d
            self._add(
                features,
                "features",
                c.name,
                conv_type(in_ch, c.out, c.kernel, c.stride, c.pad, groups=c.groups),
            )
            self._add(features, "features", f"relu{i}", nn.ReLU(inplace=True), tap=c.name)
            if c.lrn:
                self._add(features, "features", f"lrn{i}", LocalResponseNorm(preset.lrn, towers=preset.lrn_towers))
            if c.pool:
                self._add(features, "features", f"pool{i}", MaxPool2d(3, 2))
            in_ch = c.out
        if preset.convs[-1].pool:  # what fc6 sees; the seed's last pooling is pool3, and fc6 sees conv5
            self.taps["pool5"] = f"features.{len(features) - 1}"
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6)) if preset.adaptive_pool else nn.Identity()

        side = feature_side(preset, preset.input_size)
        widths = [in_ch * side * side, preset.hidden, preset.hidden]
        classifier: list[nn.Module] = []
        for j, name in enumerate(("fc6", "fc7")):
            if preset.dropout_first:
                self._add(classifier, "classifier", f"drop{6 + j}", nn.Dropout(dropout))
            self._add(classifier, "classifier", name, nn.Linear(widths[j], widths[j + 1]))
            self._add(classifier, "classifier", f"relu{6 + j}", nn.ReLU(inplace=True), tap=name)
            if not preset.dropout_first:
                self._add(classifier, "classifier", f"drop{6 + j}", nn.Dropout(dropout))
        self._add(classifier, "classifier", "fc8", nn.Linear(preset.hidden, num_classes), tap="fc8")
        self.classifier = nn.Sequential(*classifier)

    def _add(self, seq: list[nn.Module], where: str, label: str, module: nn.Module, tap: str = "") -> None:
        path = f"{where}.{len(seq)}"
        seq.append(module)
        self.labels[path] = label
        if tap:
            self.taps[tap] = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self._features(x))
        return self.classifier(torch.flatten(x, 1))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """self.features(x), each convolution's bias and ReLU as one operation where `bias_relu_kernels` says."""
        kernels = self.bias_relu_kernels or ("triton" if x.is_cuda else "modules")
        watched = torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling()
        if kernels == "modules" or watched or _hooked():
            return self.features(x)
        layers = list(self.features)
        i = 0
        while i < len(layers):
            layer, relu, lrn = (layers[i : i + 3] + [None, None])[:3]  # this layer and the two after it, if any
            pair = isinstance(layer, Conv2d) and isinstance(relu, nn.ReLU) and layer.bias is not None
            if not pair or _hooked(layer, relu):
                x, i = layer(x), i + 1
                continue
            # bias_relu_kernels None when defaulted: falls back to PyTorch's operations where Triton cannot run
            y = layer.convolve(x, None)
            if isinstance(lrn, LocalResponseNorm) and self._lrn_in_triton(lrn, x) and not _hooked(lrn):
                x, i = bias_relu_lrn(y, layer.bias, lrn, self.bias_relu_kernels), i + 3
            else:
                x, i = bias_relu(y, layer.bias, self.bias_relu_kernels), i + 2
        return x

    def _lrn_in_triton(self, lrn: LocalResponseNorm, x: torch.Tensor) -> bool:
        return self.fuse_lrn and (lrn.kernels in ("triton", "triton-band") or (lrn.kernels is None and x.is_cuda))

    def named_layers(self) -> dict[str, nn.Module]:
        """conv1..conv5, fc6..fc8: the layers with weights, by their names in the paper."""
        modules = dict(self.named_modules())
        return {label: modules[p] for p, label in self.labels.items() if label.startswith(("conv", "fc"))}


def _hooked(*modules: nn.Module) -> bool:
    """Whether a hook watches any of `modules` (with none given: all modules, global hooks)."""
    if not modules:
        from torch.nn.modules import module

        return bool(module._global_forward_hooks or module._global_forward_pre_hooks)
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(m, kind) for m in modules for kind in kinds)


def feature_side(preset: Preset, input_size: int) -> int:
    """Height (= width) of the last feature map for a square input of `input_size` pixels (what fc6
    sees); 0 where a layer's output would be empty."""
    if preset.adaptive_pool and _conv_side(preset, input_size):
        return 6
    return _conv_side(preset, input_size)


def _conv_side(preset: Preset, side: int) -> int:
    for i, c in enumerate(preset.convs):
        if i == 0 and preset.ceil_conv1:
            side = 1 + math.ceil((side - c.kernel) / c.stride)
        else:
            side = (side + 2 * c.pad - c.kernel) // c.stride + 1
        if c.pool:
            side = (side - 3) // 2 + 1
        if side < 1:
            return 0
    return side


def input_size_error(preset: Preset, input_size: int) -> str | None:
    """Why the preset cannot take square inputs of `input_size` pixels, or None where it can."""
    side, wanted = feature_side(preset, input_size), feature_side(preset, preset.input_size)
    if side == wanted:
        return None
    sizes = [s for s in range(1, 2 * preset.input_size) if feature_side(preset, s) == wanted]
    if preset.adaptive_pool:
        return f"the {preset.name} preset takes inputs of {sizes[0]} pixels or more (a layer's output would be empty)"
    got = f"not {side}x{side}" if side else "a layer's output would be empty"
    takes = f"{sizes[0]}-{sizes[-1]} pixel inputs (fc6 reads {wanted}x{wanted} features; {got})"
    return f"the {preset.name} preset takes {takes}"


def init_weights(model: AlexNet, scheme: str) -> None:
    """`paper`: weights N(0, 0.01), biases 1 in the preset's `bias_one` layers and 0 elsewhere.
    `caffe`: bvlc_alexnet's fix for the flat loss that biases of 1 can give: those biases 0.1, and
    fc6/fc7 weights N(0, 0.005). `kaiming`: He-normal convolutions, N(0, 0.01) linears, zero biases.
    `default`: PyTorch's own (torchvision's AlexNet)."""
    for name, layer in model.named_layers().items():
        if scheme == "default":
            layer.reset_parameters()
        elif scheme in ("paper", "caffe"):
            caffe = scheme == "caffe"
            nn.init.normal_(layer.weight, 0.0, 0.005 if caffe and name in ("fc6", "fc7") else 0.01)
            one = 0.1 if caffe else 1.0
            nn.init.constant_(layer.bias, one if name in model.preset.bias_one else 0.0)
        elif scheme == "kaiming":
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.zeros_(layer.bias)
        else:
            raise UserError(f"unknown initialisation {scheme!r}; choose one of {', '.join(INITS)}")


def build_model(
    preset: str = "paper",
    num_classes: int = 1000,
    groups: int | None = None,
    dropout: float = 0.5,
    init: str | None = None,
    lrn: str | None = None,
    lrn_per_tower: bool | None = None,
) -> AlexNet:
    """Build an AlexNet preset. `groups` (paper only) sets conv2/conv4/conv5 to 1 or 2 towers; `lrn`
    (presets with LRN) picks a convention of lrn.LRN_CONVENTIONS instead of the preset's own, e.g.
    'caffe' to run weights converted from Caffe; `lrn_per_tower` (paper only): False lets LRN's window
    run across both towers' maps, as Caffe's does (None: each tower alone, as the paper's GPUs did, unless
    groups=1 leaves one tower)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    if lrn is not None:
        if p.lrn is None:
            raise UserError(f"the {p.name} preset has no LRN layers; lrn does not apply to it")
        if lrn not in LRN_CONVENTIONS:
            raise UserError(f"unknown LRN convention {lrn!r}; choose one of {', '.join(LRN_CONVENTIONS)}")
        p = replace(p, lrn=LRN_CONVENTIONS[lrn])
    if groups is not None:
        if p.name != "paper":
            raise UserError(f"--groups applies to the paper preset only, not {p.name!r}")
        if groups not in (1, 2):
            raise UserError(f"groups must be 1 or 2, not {groups}")
        p = replace(p, convs=tuple(replace(c, groups=groups) if c.groups > 1 else c for c in p.convs))
    if lrn_per_tower and p.lrn_towers == 1:
        raise UserError(f"lrn_per_tower applies to the paper preset only, not {p.name!r}")
    if lrn_per_tower and groups == 1:
        raise UserError("lrn_per_tower needs the two towers: it does not go with groups=1")
    if lrn_per_tower is False or groups == 1:
        p = replace(p, lrn_towers=1)
    if num_classes < 2:
        raise UserError(f"num_classes must be at least 2, not {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), not {dropout}")
    model = AlexNet(p, num_classes, dropout)
    init_weights(model, init or p.default_init)
    return model


def layer_table(model: AlexNet, input_size: int | None = None) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(label, module type, output shape C x H x W, parameters) for every module, in order."""
    size = input_size or model.preset.input_size
    modules = dict(model.named_modules())
    rows = []
    x = torch.zeros(1, 3, size, size)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for path, label in model.labels.items():
            if path == "classifier.0":
                x = torch.flatten(model.avgpool(x), 1)
            module = modules[path]
            x = module(x)
            rows.append(
                (
                    label,
                    type(module).__name__,
                    tuple(x.shape[1:]),
                    sum(p.numel() for p in module.parameters()),
                )
            )
    model.train(was_training)
    return rows
