"""Weights in: torchvision's AlexNet, Caffe's bvlc_alexnet, and this project's own checkpoints.

`convert` turns a torchvision state_dict, a .caffemodel or the NumPy port of bvlc_alexnet into an
alexnet checkpoint (`alexnet convert`), ready for evaluate, predict, export or fine-tuning.
`read_pretrained` + `load_pretrained` start a training run from existing weights (`alexnet train
--init-from`), replacing fc8 when the classes differ; `freeze_layers` keeps chosen layers fixed.

Caffe's conventions, and what the conversion does about each:
- input channels are BGR: conv1's input-channel axis is reversed, so the model takes RGB;
- grouped convolutions store (out, in / groups, kH, kW), as PyTorch does with groups=2: copied as is;
- pool5 is flattened (C, H, W) before fc6, as in PyTorch: fc6 copied as is;
- the input is 227x227, raw 0-255 pixels minus a mean: crop 227, std 1/255, the mean in the checkpoint;
- LRN is alpha / size with k = 1, unlike the paper preset's: the model is built with lrn="caffe".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import FORMAT, load_checkpoint, save_checkpoint
from ..data.augment import IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN, IMAGENET_STD, PixelStats
from ..errors import UserError
from ..model.lrn import LRN_CONVENTIONS, LRNSpec
from ..model.net import PRESETS, AlexNet, build_model
from ..train.config import LAYERS, TrainConfig, parse_freeze
from .export import read_safetensors

SOURCES = ("caffe", "caffe-npy", "torchvision")
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)  # bvlc_alexnet's mean image averaged per channel, 0-255


# --- reading weights of any kind -----------------------------------------------------------------


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, list[str] | None]:
    """(state_dict, training config, classes) from an alexnet checkpoint, run directory or .safetensors
    export, or (state_dict, None, None) from a bare state_dict file (torch.save(model.state_dict()))."""
    path = Path(path)
    if path.suffix == ".safetensors":
        ckpt = read_safetensors(path)
        return ckpt["model"], ckpt["config"], ckpt["classes"]
    if path.is_dir():
        ckpt = load_checkpoint(path)
        return ckpt["model"], ckpt["config"], ckpt["classes"]
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or a pickled whole model: say so in one line
        raise UserError(f"cannot read weights from {path} ({type(e).__name__}); expected a state_dict file") from e
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj["model"], obj["config"], obj["classes"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None, None
    raise UserError(f"{path} holds neither a state_dict nor an alexnet checkpoint")


def check_shapes(state: dict[str, torch.Tensor], model: AlexNet, path: str | Path, skip: tuple[str, ...] = ()) -> None:
    """UserError unless `state` has exactly the model's keys and shapes (keys starting with `skip` aside)."""
    target = model.state_dict()
    where = f"{path} does not fit the {model.preset.name} preset"
    missing = [k for k in target if k not in state and not k.startswith(skip)]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        detail = f"no {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"{where}: {detail} ({len(missing)} keys missing, {len(unexpected)} unexpected)")
    for k, v in state.items():
        if not k.startswith(skip) and tuple(v.shape) != tuple(target[k].shape):
            raise UserError(f"{where}: {k} is {tuple(v.shape)} there, {tuple(target[k].shape)} here")


def _fc8(model: AlexNet) -> str:
    return model.taps["fc8"] + "."  # state_dict key prefix of the last layer


# --- fine-tuning: --init-from and --freeze -------------------------------------------------------


@dataclass
class Pretrained:
    path: str
    state: dict[str, torch.Tensor]
    classes: list[str] | None  # None: a bare state_dict, classes unknown


def _network(d: dict) -> tuple[str, int, LRNSpec | None, bool]:
    """What a config's weights depend on besides shapes: preset, groups, LRN convention, LRN per tower."""
    if d.get("preset") not in PRESETS:
        raise UserError(f"unknown preset {d.get('preset')!r} in the source's config")
    preset = PRESETS[d["preset"]]
    lrn = LRN_CONVENTIONS[d["lrn"]] if d.get("lrn") else preset.lrn
    groups = d.get("groups") or 2
    per_tower = d.get("lrn_per_tower", False)  # a checkpoint made before the option normalised across towers
    if per_tower is None:  # the preset's own
        per_tower = preset.lrn_towers > 1 and groups == 2
    return preset.name, groups, lrn, per_tower


def read_pretrained(path: str | Path, cfg: TrainConfig) -> Pretrained:
    """Read --init-from weights and check they were made for the network `cfg` builds.

    Called before the run directory is made, so a wrong file stops the run before it leaves anything.
    """
    state, source_cfg, classes = read_state(path)
    if source_cfg is not None:
        (preset, groups, lrn, per_tower), here = _network(source_cfg), _network(cfg.__dict__)
        if preset != here[0]:
            raise UserError(f"{path} holds a {preset!r} model, this run builds {here[0]!r}: pass --preset {preset}")
        if groups != here[1]:
            raise UserError(f"{path} was made with groups={groups}, this run has {here[1]}: pass --groups {groups}")
        if lrn != here[2]:
            raise UserError(f"{path} was made with lrn={source_cfg.get('lrn')!r}, this run has lrn={cfg.lrn!r}")
        if per_tower != here[3]:
            made = "within each tower" if per_tower else "across the towers"
            flag = "--lrn-per-tower" if per_tower else "--no-lrn-per-tower"
            raise UserError(f"{path} was made with LRN {made}, unlike this run: pass {flag}")
    with torch.device("meta"):  # the network's shapes only: no memory, no initialisation cost
        network = cfg.build_model(2)
    check_shapes(state, network, path, skip=(_fc8(network),))
    return Pretrained(str(path), state, classes)


def load_pretrained(model: AlexNet, pre: Pretrained, classes: list[str]) -> str:
    """Copy the weights into `model`; keep the model's new fc8 if the source's classes differ.
    Returns a line saying what was done."""
    fc8 = _fc8(model)
    check_shapes(pre.state, model, pre.path, skip=(fc8,))
    target = model.state_dict()
    old = pre.state.get(fc8 + "bias")
    same = all(k in pre.state and pre.state[k].shape == v.shape for k, v in target.items() if k.startswith(fc8))
    same = same and (pre.classes is None or list(pre.classes) == list(classes))
    model.load_state_dict({k: (v if k.startswith(fc8) and not same else pre.state[k]) for k, v in target.items()})
    if same:
        return f"weights: all layers from {pre.path}"
    there = "no fc8" if old is None else f"{old.shape[0]} classes"
    return f"weights: conv1..fc7 from {pre.path}; fc8 new ({there} there, {len(classes)} here)"


def freeze_layers(model: AlexNet, spec: str) -> list[str]:
    """requires_grad False for the weights and biases of the layers `spec` names; returns their names."""
    layers = model.named_layers()
    names = parse_freeze(spec)
    for name in names:
        layers[name].requires_grad_(False)
    return names


# --- alexnet convert -----------------------------------------------------------------------------


def caffe_state_dict(layers: dict[str, list[np.ndarray]], model: AlexNet, path: str | Path) -> dict[str, torch.Tensor]:
    """Caffe-layout {layer: [weights, biases]} (caffe.py) -> the paper preset's state_dict."""
    target = model.state_dict()
    paths = {label: p for p, label in model.labels.items()}
    state = {}
    for name in LAYERS:
        if name not in layers:
            raise UserError(f"{path} has no layer named {name!r} with weights (it has: {', '.join(layers)})")
        if len(layers[name]) != 2:
            raise UserError(f"{path}: layer {name} has {len(layers[name])} blobs, not weights and biases")
        for blob, kind in zip(layers[name], ("weight", "bias"), strict=True):
            key = f"{paths[name]}.{kind}"
            dims = list(blob.shape)
            while len(dims) > target[key].dim() and dims[0] == 1:  # legacy 4-D blobs: fc as 1x1xOUTxIN
                dims.pop(0)
            if tuple(dims) != tuple(target[key].shape):
                raise UserError(
                    f"{path}: {name} {kind} is {'x'.join(map(str, blob.shape))}, "
                    f"the paper preset needs {'x'.join(map(str, target[key].shape))}"
                )
            state[key] = torch.from_numpy(np.ascontiguousarray(blob, dtype=np.float32).reshape(dims))
    w = paths["conv1"] + ".weight"
    state[w] = state[w].flip(1).contiguous()  # Caffe's input is BGR; the model's is RGB
    return state


def read_classes(path: str | Path, count: int) -> tuple[list[str], list[str]]:
    """(wnids, names) from Caffe's synset_words.txt ('n01440764 tench, Tinca tinca' per line), a list of
    wnids, or a classes.tsv (index, wnid, name)."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read class list {path}: {e}") from e
    if lines and lines[0].split("\t")[:2] == ["index", "wnid"]:
        rows = [line.split("\t") for line in lines[1:]]
        wnids, names = [r[1] for r in rows], [r[2] if len(r) > 2 else r[1] for r in rows]
    else:
        rows = [line.split(maxsplit=1) for line in lines]
        wnids, names = [r[0] for r in rows], [r[-1].strip() for r in rows]
    if len(wnids) != count:
        raise UserError(f"{path} lists {len(wnids)} classes; the weights have {count}")
    return wnids, names


def convert(
    source: str, path: str | Path, out: str | Path, mean: str | Path | None = None, classes: str | Path | None = None
) -> Path:
    """Write an alexnet checkpoint of foreign weights: `source` is 'torchvision' (a state_dict file),
    'caffe' (.caffemodel) or 'caffe-npy' (bvlc_alexnet.npy). `mean`: Caffe's mean image (.binaryproto
    or .npy), else the per-channel mean; `classes`: a class list for the checkpoint, else indices."""
    if source == "torchvision":
        if mean:
            raise UserError("--mean is for Caffe weights; torchvision's use the ImageNet mean and std")
        state, config, _ = read_state(path)
        if config is not None:  # its mean image and classes would be lost, replaced by ImageNet's
            raise UserError(f"{path} is an alexnet checkpoint already: use it as it is, no convert needed")
        if "classifier.6.bias" not in state:
            raise UserError(f"{path} is not a torchvision AlexNet state_dict (no classifier.6)")
        model = build_model("torchvision", state["classifier.6.bias"].shape[0], init="default")
        check_shapes(state, model, path)
        cfg = TrainConfig(preset="torchvision", mean="channel", scale="imagenet", pca="imagenet")
        mean_rgb = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    elif source in ("caffe", "caffe-npy"):
        from .caffe import read_caffe_mean, read_caffe_npy, read_caffemodel

        layers = read_caffemodel(path) if source == "caffe" else read_caffe_npy(path)
        if "fc8" not in layers:
            raise UserError(f"{path} has no layer named 'fc8' with weights (it has: {', '.join(layers)})")
        # bvlc_alexnet's LRN runs across both towers' maps
        model = build_model("paper", layers["fc8"][1].size, lrn="caffe", init="default", lrn_per_tower=False)
        state = caffe_state_dict(layers, model, path)
        mean_bgr = torch.from_numpy(read_caffe_mean(mean)) if mean else torch.tensor(CAFFE_MEAN_BGR).view(3, 1, 1)
        side = mean_bgr.shape[-1]
        if mean_bgr.shape[-2] != side or (side > 1 and side < 227):
            raise UserError(f"mean image is {mean_bgr.shape[-2]}x{side}; a square of at least 227 is needed")
        cfg = TrainConfig(
            preset="paper",
            lrn="caffe",
            lrn_per_tower=False,
            crop=227,
            image_size=side if side > 1 else 256,
            mean="pixel" if side > 1 else "channel",
            scale="raw",
            pca="imagenet",
            init="caffe",
        )
        mean_rgb = mean_bgr.flip(0) / 255  # PixelStats works in RGB, [0, 1]
        std = torch.full((3, 1, 1), 1 / 255)  # (x/255 - mean) / (1/255) = raw pixels minus Caffe's mean
    else:
        raise UserError(f"unknown source format {source!r}; choose one of {', '.join(SOURCES)}")
    model.load_state_dict(state)
    n = model.classifier[-1].out_features
    wnids, names = read_classes(classes, n) if classes else ([str(i) for i in range(n)], [str(i) for i in range(n)])
    stats = PixelStats(
        mean_rgb.float().contiguous(), std.float(), torch.tensor(IMAGENET_EIGVAL), torch.tensor(IMAGENET_EIGVEC)
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        {
            "config": cfg.resolved().__dict__,
            "classes": wnids,
            "names": names,
            "stats": stats.state_dict(),
            "model": model.state_dict(),
            "source": {"format": source, "file": str(path), "mean": str(mean) if mean else None},
        },
        out,
    )
    return out
