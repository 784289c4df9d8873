"""Weights out: a checkpoint as ONNX, torch.export (.pt2), TorchScript or safetensors; and back in
(load_for_inference: a checkpoint, run directory or .safetensors file as a model ready to run).

ONNX, .pt2 and TorchScript hold the bare network: input (N, 3, S, S) pixels normalised as the
checkpoint says, (x / 255 - mean) / std of a centred S x S crop; output (N, classes) logits. The
batch axis is dynamic, S is fixed at export (`--input-size`, default the checkpoint's crop): the
paper preset takes 224 to 255, torchvision's any S >= 63. Each file also carries `alexnet.json`
(classes, input size, normalisation, the run's config): ONNX metadata_props, the .pt2's and
TorchScript's extra files, safetensors' metadata. A checkpoint that subtracts a mean image (`--mean
pixel`) also gets the mean its input subtracts, (3, S, S) float32, in `<out name>.mean.npy` beside the
file (model.onnx.mean.npy); alexnet.json's input.mean_file names it. The two files are replaced together.

safetensors holds the weights and the pixel statistics as tensors, and the JSON as metadata, so the
project reads it back without pickle: `load_for_inference` accepts a .safetensors file.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import FORMAT, NEW_FILE_MODE, check_out, checkpoint_file, failed_write, load_checkpoint, os_error_of
from ..data.augment import PixelStats, center_batch, crop_offsets
from ..data.folders import ImageDataset, display_names, make_loader
from ..errors import UserError
from ..stopping import held
from ..train.config import TrainConfig

FORMATS = ("onnx", "torchscript", "export", "safetensors")
SUFFIXES = {".onnx": "onnx", ".pt2": "export", ".torchscript": "torchscript", ".safetensors": "safetensors"}
OPSET = 18  # ONNX opset: 17 or newer; 18 is well supported by onnxruntime
META = "alexnet.json"


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{module.split('.')[0]} is not installed: pip install 'alexnet[export]'") from e


def describe(ckpt: dict[str, Any], size: int, mean_file: str | None = None) -> str:
    """The JSON every export carries: what goes in, what comes out, and the run's config."""
    stats = ckpt["stats"]
    return json.dumps(
        {
            "format": "alexnet-export-1",
            "input": {
                "shape": ["batch", 3, size, size],
                "pixels": "RGB, (x / 255 - mean) / std; the centred crop of the image scaled to image_size;"
                " mean: the (3, S, S) array in mean_file when it names one, else the colour",
                "mean": stats["mean"].mean(dim=(1, 2)).tolist(),  # the mean image's average colour
                "mean_image": stats["mean"].shape[-1] > 1,  # True: the checkpoint subtracts a whole image
                "mean_file": mean_file,  # then this file beside the export holds the mean to subtract
                "std": stats["std"].flatten().tolist(),
                "image_size": ckpt["config"]["image_size"],
            },
            "output": "logits",
            "classes": ckpt["classes"],
            "names": ckpt["names"],
            "config": ckpt["config"],
        }
    )


def mean_for_input(mean: torch.Tensor, size: int) -> torch.Tensor:
    """The (3, size, size) mean an input of `size` subtracts: the mean image's centred crop, as predict
    takes it, or for an input larger than the run's images the mean image scaled up, as --check does."""
    if size > mean.shape[-1]:
        return F.interpolate(mean[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    top, left = crop_offsets(mean.shape[-1], size)[4]
    return mean[:, top : top + size, left : left + size]


def check_input_size(model: torch.nn.Module, size: int) -> None:
    if size < 1:
        raise UserError(f"the input size must be positive, not {size}")
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except RuntimeError as e:
        raise UserError(f"the {model.preset.name} preset cannot take {size}x{size} inputs") from e


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path, input_size: int | None = None) -> Path:
    """Write `checkpoint` (a file or run directory) as `fmt` to `out`; returns `out`."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "safetensors" and input_size is not None:
        raise UserError("--input-size is for onnx, export and torchscript: safetensors holds weights, not a graph")
    out = Path(out)
    check_out(out)
    model, stats, ckpt = load_for_inference(checkpoint, torch.device("cpu"))
    size = ckpt["config"]["crop"] if input_size is None else input_size  # 0 is refused, not the default
    check_input_size(model, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    mean_file = None
    if fmt != "safetensors" and stats.mean.shape[-1] > 1:  # safetensors holds the mean image itself
        # named after the whole file name: model.onnx and model.pt2 at other sizes need other means
        mean_file = out.with_name(f"{out.name}.mean.npy")
    meta = describe(ckpt, size, mean_file.name if mean_file else None)
    graph_tmp = out.with_name(f".tmp.{out.name}")  # same suffix: torch.export.save wants .pt2
    mean_tmp = out.with_name(f".tmp.{out.name}.mean.npy")
    try:
        _write_graph(model, ckpt, fmt, graph_tmp, size, meta)
        if mean_file is not None:
            with open(mean_tmp, "wb") as f:
                np.save(f, mean_for_input(stats.mean, size).numpy().astype(np.float32))
        for tmp in (graph_tmp, mean_tmp):
            if tmp.exists():
                os.chmod(tmp, NEW_FILE_MODE)  # safetensors writes 0600
        with held():  # both files are replaced, or neither: an export never meets another's mean
            if mean_file is not None:
                os.replace(mean_tmp, mean_file)
            os.replace(graph_tmp, out)
    except Exception as e:
        if (cause := os_error_of(e)) is None:  # torch.jit.save reports a full disk as a RuntimeError
            raise
        raise failed_write(cause, out) from e
    finally:
        graph_tmp.unlink(missing_ok=True)
        mean_tmp.unlink(missing_ok=True)
    return out


def _write_graph(model: torch.nn.Module, ckpt: dict[str, Any], fmt: str, path: Path, size: int, meta: str) -> None:
    """`model` as `fmt` (its weights alone for safetensors) in `path`, with `meta` embedded."""
    example = torch.zeros(2, 3, size, size)  # batch 2: a size-1 axis would be fixed at 1
    batch = ({0: torch.export.Dim("batch", min=1)},)
    if fmt == "onnx":
        _require("onnxscript")  # the torch.export-based ONNX exporter needs it
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=batch,
            verbose=False,
        )
        program.model.metadata_props[META] = meta
        program.save(str(path), external_data=False)
    elif fmt == "export":
        program = torch.export.export(model, (example,), dynamic_shapes=batch)
        torch.export.save(program, str(path), extra_files={META: meta})
    elif fmt == "torchscript":
        with warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.export but still works; the trace fixes
            # CeilConv2d's padding for this input size, which is what the file promises anyway
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(model, example), str(path), _extra_files={META: meta})
    else:
        st = _require("safetensors.torch")
        tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        tensors.update({f"stats.{k}": v.contiguous() for k, v in ckpt["stats"].items()})
        st.save_file(tensors, str(path), metadata={META: meta})


def read_safetensors(path: str | Path) -> dict[str, Any]:
    """A .safetensors export as a checkpoint dict (config, classes, names, stats, model): no pickle."""
    _require("safetensors")
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - not a safetensors file: one line
        raise UserError(f"cannot read {path} as safetensors ({type(e).__name__})") from e
    if META not in meta:
        raise UserError(f"{path} was not written by alexnet export (no {META} metadata)")
    info = json.loads(meta[META])
    return {
        "format": FORMAT,
        "config": info["config"],
        "classes": info["classes"],
        "names": info["names"],
        "model": {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
        "stats": {k.removeprefix("stats."): v for k, v in tensors.items() if k.startswith("stats.")},
    }


def load_for_inference(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, PixelStats, dict]:
    """Model (eval mode), pixel statistics and the checkpoint dict, from a checkpoint file, run directory
    or .safetensors export."""
    ckpt = read_safetensors(checkpoint) if str(checkpoint).endswith(".safetensors") else load_checkpoint(checkpoint)
    # NaN weights (saved by hand, or by a run from before the NaN stop) give NaN outputs, and a NaN in eval.json
    bad = next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not v.isfinite().all()), None)
    if bad is not None:
        raise UserError(
            f"{checkpoint_file(checkpoint)} holds NaN or infinite weights (in {bad}): it cannot be evaluated or used"
        )
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = cfg.build_model(len(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    stats = PixelStats(**ckpt["stats"])
    ckpt["names"] = display_names(ckpt["classes"], ckpt.get("names"))  # ILSVRC-2012 names for bare wnids
    return model.to(device).eval(), stats, ckpt


def load_exported(path: str | Path, fmt: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function normalised images -> logits that runs an exported file (`fmt` default: from the suffix)."""
    path = Path(path)
    fmt = fmt or SUFFIXES.get(path.suffix)
    if fmt not in FORMATS:
        raise UserError(f"cannot tell the format of {path}; name it ({', '.join(FORMATS)})")
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if fmt == "onnx":
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])
    if fmt == "export":
        return torch.export.load(str(path)).module()
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            return torch.jit.load(str(path), map_location="cpu")
    return load_for_inference(path, torch.device("cpu"))[0]


def max_abs_difference(
    path: str | Path,
    checkpoint: str | Path,
    images: Sequence[str | Path],
    input_size: int | None = None,
    fmt: str | None = None,
    batch_size: int = 16,
) -> tuple[float, int, list[str]]:
    """(largest |export logits - PyTorch logits|, number of images compared, "path<TAB>reason" of the
    files skipped as unreadable) over image files or folders, `batch_size` images at a time: memory
    stays bounded however many images are given."""
    from ..inspect.features import list_image_files

    files = list_image_files([str(p) for p in images])
    model, stats, ckpt = load_for_inference(checkpoint, torch.device("cpu"))
    image_size = ckpt["config"]["image_size"]
    size = ckpt["config"]["crop"] if input_size is None else input_size
    run = load_exported(path, fmt)
    largest, count, bad = 0.0, 0, []
    for batch in make_loader(ImageDataset([(str(f), -1) for f in files], image_size), batch_size, workers=0):
        bad += batch.bad
        if not len(batch.labels):
            continue
        x = center_batch(batch.images, stats, min(size, image_size))
        if size > image_size:  # larger than the stored images: scale the crops up, any input will do
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            largest = max(largest, float((run(x).float() - model(x)).abs().max()))
        count += len(batch.labels)
    if not count:
        raise UserError(f"none of the {len(files)} image files to check with could be read")
    return largest, count, bad
