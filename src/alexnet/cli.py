"""The `alexnet` command: a thin layer over the library's functions.

alexnet train     [--data DIR] ...     train (no --data: a synthetic demo dataset, no download)
alexnet evaluate  --checkpoint C --data DIR
alexnet predict   --checkpoint C IMAGE_OR_FOLDER ...
alexnet info      [--preset P]
alexnet convert   --from caffe|caffe-npy|torchvision FILE --out CKPT
alexnet export    --checkpoint C --format onnx|torchscript|export|safetensors --out FILE
alexnet features  --checkpoint C --layer L [--layer L2 ...] IMAGE_OR_FOLDER ... --out F.npz|F.npy
alexnet figures   RUN_DIR [--data DIR] [--out DIR]
alexnet benchmark [--preset P] [--batch-size N] [--precision bf16] [--data PREPARED]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import UserError, one_line
from .model.net import INITS, PRESETS, build_model, input_size_error, layer_table
from .train import distributed
from .train.config import RESUMABLE_OVERRIDES, SCHEDULES, TrainConfig

DEMO_DATA = "alexnet-demo-data"
# The demo: a few minutes on a laptop CPU, the paper's network and recipe otherwise.
DEMO_SETTINGS = {"epochs": 6, "batch_size": 16, "schedule": "cosine", "init": "caffe"}

HELP = {
    "data": "ImageNet-layout folder with train/ and val/ (default: make and use a synthetic demo dataset)",
    "run_dir": "where the run's files go (default: runs/<preset>-<time>)",
    "preset": f"network: {', '.join(PRESETS)}",
    "dropout": "dropout probability in fc6 and fc7",
    "groups": "paper preset: 2 (two towers, the paper) or 1 (full connections)",
    "init": f"initialisation: {', '.join(INITS)} (default: the preset's)",
    "epochs": "epochs to train; raised on --resume, it extends a run",
    "batch_size": "images per step, over all GPUs and machines together under torchrun",
    "lr": "learning rate at the start",
    "momentum": "SGD momentum",
    "weight_decay": "L2 weight decay of the weights, and of the biases with --bias-decay",
    "schedule": f"learning-rate schedule: {', '.join(SCHEDULES)}",
    "plateau_patience": "plateau: epochs without a lower validation error before the rate is divided by 10",
    "max_lr_drops": "plateau: divide the rate at most this many times",
    "step_epochs": "step: divide the rate by 10 every this many epochs",
    "inverse_time_rate": "inverse-time: lr / (1 + RATE * floor(step / STEPS))",
    "inverse_time_steps": "inverse-time: the STEPS of that formula",
    "image_size": "images are scaled and centre-cropped to this size once",
    "crop": "size of the square training and test crops (the paper preset takes 224 to 255)",
    "seed": "seed of the initialisation, the data order, the augmentation and dropout",
    "workers": "data-loading processes",
    "log_every": "steps between progress updates and NaN checks",
    "mean": "subtract the mean 'pixel' image (paper) or the mean 'channel' colour",
    "scale": "'raw' 0-255 pixels (paper) or 'imagenet' std (torchvision); default: the preset's",
    "pca": "PCA lighting axes from the training set ('dataset') or the 'imagenet' constants",
    "bias_decay": "decay the biases too (default: no for paper and seed, as cuda-convnet did; yes for torchvision)",
    "lighting": "standard deviation of the PCA lighting alphas (0: off)",
    "device": "auto, cpu, cuda or cuda:N",
    "lrn": "LRN convention: paper, cuda-convnet or caffe (default: the preset's)",
    "lrn_per_tower": "paper preset: LRN within each tower's maps, as the paper's GPUs (default); "
    "--no-lrn-per-tower: across both, as Caffe",
    "init_from": "start from these weights: a torchvision state_dict, an alexnet checkpoint or run directory,"
    " or a .safetensors export",
    "freeze": "layers not trained: 'features' (conv1..conv5), a range like conv1..conv3, or names conv1,fc6",
    "tensorboard": "also write TensorBoard event files to RUN_DIR/tensorboard (pip install tensorboard)",
    "on_nan": "a NaN/inf loss: 'stop', or 'rollback' to the last checkpoint with a tenth of the learning rate",
    "precision": "auto (bf16 on CUDA, fp32 on the CPU), fp32, bf16 or fp16 (CUDA, with loss scaling)",
    "channels_last": "NHWC layout, faster on CUDA and on the CPU: on (default) or off",
    "compile": "torch.compile the model (slower start, faster steps)",
    "cuda_graphs": "replay each training step from a CUDA graph (default: on one GPU in bf16 or fp32, not compiled)",
    "ddp_bucket_mb": "under torchrun: DDP's gradient bucket size in MB (default 25, as PyTorch's)",
    "checkpoint_every": "also write last.pt every this many steps (0: at the end of each epoch only)",
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise UserError(f"{message} (see {self.prog} --help)")  # prog: "alexnet", or "alexnet train"


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`, refused when parsing (one line), not by a
    traceback from deep inside (a batch size of 0, --workers -1, --top -1)."""

    def int_(text: str) -> int:
        value = int(text)  # a ValueError: argparse says "invalid int value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    int_.__name__ = "int"
    return int_


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field; defaults stay unset so we know what the user gave."""
    for f in dataclasses.fields(TrainConfig):
        text = HELP[f.name]
        if "default" not in text and f.default is not None and f.default is not False:
            text += f" (default: {f.default})"
        if f.type in ("bool", "bool | None"):  # a flag: --tensorboard; --no-tensorboard turns it off when resuming
            flag = f"--{f.name.replace('_', '-')}"
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
            continue
        kind = {int: int, float: float}.get(type(f.default), str)
        if f.name == "groups":
            kind = int
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=argparse.SUPPRESS, help=text)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.distributed import restarted_by_torchrun
    from .train.loop import train

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if not args.resume and restarted_by_torchrun() and Path(given.get("run_dir", ""), "config.json").is_file():
        args.resume = given.pop("run_dir")  # torchrun restarted the workers after a failure: continue the run
    if args.resume:
        run_dir = Path(args.resume)
        stored = TrainConfig.load(run_dir / "config.json") if (run_dir / "config.json").is_file() else None
        if stored is None:
            raise UserError(f"{run_dir} is not a run directory (no config.json) and cannot be resumed")
        if Path(given.pop("run_dir", run_dir)).absolute() != run_dir.absolute():
            raise UserError(f"--run-dir cannot differ from --resume {run_dir}: a run is resumed where it is")
        asked, made = dataclasses.replace(stored, **given).resolved(), stored.resolved()  # paths made absolute
        for k in given:
            if k not in RESUMABLE_OVERRIDES and getattr(asked, k) != getattr(made, k):
                raise UserError(f"{run_dir} was made with {k}={getattr(stored, k)!r}; a resumed run cannot change it")
        cfg = dataclasses.replace(stored, **given, run_dir=str(run_dir))
    else:
        if "data" not in given:
            from .data.synthetic import make_demo_dataset

            TrainConfig(**{**DEMO_SETTINGS, **given}).resolved()  # a bad option: said before rendering any image
            print(f"no --data: training on a synthetic demo dataset of rendered shapes in {DEMO_DATA}/", flush=True)
            given = {**DEMO_SETTINGS, **given, "data": str(make_demo_dataset(DEMO_DATA))}
        cfg = TrainConfig(**given)
    run_dir = train(cfg, resume=bool(args.resume), progress=not args.no_progress)
    if distributed.main_process():
        print(f"run directory: {run_dir}")
    return 0


def _device(name: str) -> torch.device:
    from .train.step import pick_device

    return pick_device(name)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data.folders import ImageDataset, make_loader, open_split
    from .data.prepared import is_prepared, made_from
    from .inspect.evaluate import check_finite, evaluate, none_readable, write_report
    from .interop.export import load_for_inference

    if is_prepared(args.data):  # it holds pixels, not the class folders of images evaluate reads
        source = made_from(args.data)
        made = f" ({source})" if source else ""
        raise UserError(f"{args.data} is a prepared dataset; give the image folder it was made from{made} with --data")
    device = _device(args.device)
    model, stats, ckpt = load_for_inference(args.checkpoint, device)
    # folders labelled by the model's classes, by name: any order, any subset (Imagenette for an ImageNet model)
    split = open_split(args.data, args.split, classes=ckpt["classes"], subset=True)
    cfg = ckpt["config"]
    loader = make_loader(ImageDataset(split.samples, cfg["image_size"]), args.batch_size, args.workers)
    results, progress, n = {}, not args.no_progress, len(ckpt["classes"])
    for name, ten in (("center", False), ("ten_crop", True)):
        if name == "center" or args.ten_crop:
            results[name] = evaluate(model, loader, stats, n, device, cfg["crop"], ten_crop=ten, progress=progress)
            if results[name].count == 0:  # every file corrupt or empty: no error to tell, no report to write
                raise none_readable(len(split.samples), results[name].bad)
    check_finite(results, "its errors would mean nothing")
    for name, r in results.items():
        print(f"{name}: top-1 error {r.top1_err:.4f}, top-5 error {r.top5_err:.4f} on {r.count} images")
    bad = sorted({b for r in results.values() for b in r.bad})
    if bad:
        print(f"{len(bad)} unreadable images skipped: {', '.join(b.split(chr(9))[0] for b in bad[:5])}")
    if args.out:
        write_report(Path(args.out), results, ckpt["classes"], ckpt["names"])
        print(f"report written to {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .data.folders import load_image
    from .inspect.evaluate import class_probabilities
    from .inspect.features import list_image_files
    from .interop.export import load_for_inference

    device = _device(args.device)
    model, stats, ckpt = load_for_inference(args.checkpoint, device)
    files = list_image_files(args.images)
    classes, names, k = ckpt["classes"], ckpt["names"], min(args.top, len(ckpt["classes"]))
    stats, failures = stats.to(device), 0
    results = []
    with torch.no_grad():
        for f in files:
            try:
                image = load_image(str(f), ckpt["config"]["image_size"])[None].to(device)
            except Exception as e:  # noqa: BLE001 - report and go on with the other files
                print(f"{f}: cannot read ({type(e).__name__})", file=sys.stderr)
                failures += 1
                continue
            probs = class_probabilities(model, image, stats, ckpt["config"]["crop"], args.ten_crop)[0]
            top = probs.topk(k)
            preds = [
                {"class": classes[i], "name": names[i], "probability": float(p)}
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ]
            results.append({"file": str(f), "top": preds})
            if not args.json:
                print(f"{f}")
                for r in preds:
                    print(f"  {r['probability']:7.2%}  {r['name']} ({r['class']})")
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failures and not results else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import check_dataset, prepare_dataset

    if not args.check:
        if not args.src:
            raise UserError("prepare needs SRC (an ImageNet-layout folder) and OUT, or --check OUT")
        prepare_dataset(
            args.src,
            args.out,
            args.fmt,
            args.workers,
            args.image_size,
            not args.no_progress,
            args.quality,
            splits=args.splits,
        )
    print(check_dataset(args.out, not args.no_progress, args.workers))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = build_model(args.preset, args.num_classes, args.groups)
    size = model.preset.input_size if args.input_size is None else args.input_size
    if why := input_size_error(model.preset, size):
        raise UserError(f"--input-size {size}: {why}")
    print(f"preset {model.preset.name}: input 3 x {size} x {size}, {args.num_classes} classes")
    print(f"{'layer':<7} {'module':<18} {'output':>16} {'parameters':>13}")
    total = 0
    for label, kind, shape, params in layer_table(model, size):
        total += params
        print(f"{label:<7} {kind:<18} {' x '.join(map(str, shape)):>16} {params:>13,}")
    print(f"{'total':<7} {'':<18} {'':>16} {total:>13,}")
    print("deviations from the paper:" if model.preset.name != "paper" else "notes:")
    for note in model.preset.notes:
        print(f"  - {note}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import check_out
    from .interop.weights import convert

    check_out(Path(args.out))
    print(f"wrote {convert(args.source, args.file, args.out, args.mean, args.classes)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .inspect.features import list_image_files
    from .interop.export import export_checkpoint, max_abs_difference

    images = list_image_files(args.check) if args.check else []  # a missing one: refused before the work
    out = export_checkpoint(args.checkpoint, args.format, args.out, args.input_size)
    print(f"wrote {out}")
    if images:
        diff, count, bad = max_abs_difference(out, args.checkpoint, images, args.input_size, args.format)
        for b in bad:
            print(f"skipped (cannot read): {b}", file=sys.stderr)
        skipped = f"; {len(bad)} unreadable files skipped" if bad else ""
        print(f"largest absolute difference from PyTorch's logits on {count} images: {diff:.3g}{skipped}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from .checkpoint import check_out
    from .inspect.features import check_layers, extract_samples, label_of, list_image_files, write_features
    from .interop.export import load_for_inference

    out = Path(args.out)
    if out.suffix not in (".npz", ".npy"):
        raise UserError(f"--out must end in .npz or .npy, not {out.name!r}")
    if out.suffix == ".npy" and len(args.layer) != 1:
        raise UserError(f"a .npy file holds one layer, not {len(args.layer)}; write .npz")
    check_out(out)
    model, stats, ckpt = load_for_inference(args.checkpoint, _device(args.device))
    check_layers(model, args.layer)
    files = list_image_files(args.images)
    classes = ckpt["classes"]
    samples = [(str(f), label_of(f, classes)) for f in files]
    cfg = ckpt["config"]
    size, crop, progress = cfg["image_size"], cfg["crop"], not args.no_progress
    feats, kept, bad = extract_samples(
        model, stats, samples, args.layer, size, crop, args.batch_size, args.workers, progress
    )
    for b in bad:
        print(f"skipped (cannot read): {b}", file=sys.stderr)
    if not kept:
        raise UserError(f"none of the {len(files)} image files could be read")
    write_features(out, feats, [samples[i][0] for i in kept], [samples[i][1] for i in kept], classes)
    shapes = ", ".join(f"{name} {tuple(a.shape)}" for name, a in feats.items())
    print(f"wrote {out}: {shapes}" + (f"; {len(bad)} unreadable files skipped" if bad else ""))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from .inspect.figures import make_figures

    options = (args.neighbour_images, args.batch_size, args.workers, args.device, not args.no_progress)
    written = make_figures(args.run_dir, args.data, args.out, *options)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .inspect.bench import format_table, run_benchmark

    results, settings = run_benchmark(
        args.preset,
        args.batch_size,
        args.device,
        args.precision,
        args.channels_last,
        args.compile,
        args.cuda_graphs,
        args.data,
        args.steps,
        args.warmup,
        args.rounds,
        not args.no_baseline,
        args.lrn_kernels,
        args.fuse_lrn,
    )
    print(format_table(results, settings))
    return 0


def build_parser() -> Parser:
    """The `alexnet` command and its verbs, one small function each (docs/cli.md is their --help)."""
    parser = Parser(prog="alexnet", description="AlexNet (Krizhevsky et al. 2012) in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add_verb in (
        _add_train,
        _add_evaluate,
        _add_predict,
        _add_prepare,
        _add_benchmark,
        _add_info,
        _add_convert,
        _add_export,
        _add_features,
        _add_figures,
    ):
        add_verb(sub)
    return parser


# --- options that several verbs share ---------------------------------------------------------------


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (its best.pt)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=HELP["device"])


def _add_loading(p: argparse.ArgumentParser, batch_size: int) -> None:
    p.add_argument(
        "--batch-size", type=at_least(1), default=batch_size, help=f"images per batch (default: {batch_size})"
    )
    p.add_argument("--workers", type=at_least(0), default=2, help="data-loading processes (default: 2)")


def _add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_inference(p: argparse.ArgumentParser) -> None:  # evaluate and predict
    _add_checkpoint(p)
    p.add_argument("--ten-crop", action="store_true", help="average the 10 crops of the paper's test protocol")
    _add_device(p)


# --- the verbs, in the order `alexnet --help` lists them ----------------------------------------------


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (no --data: a synthetic demo dataset)")
    _add_config_options(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    _add_no_progress(p)
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="top-1/top-5 error of a checkpoint")
    _add_inference(p)
    p.add_argument("--data", required=True, help="dataset folder holding the split")
    p.add_argument("--split", default="val", help="the split's folder under --data (default: val)")
    _add_loading(p, batch_size=64)
    p.add_argument("--out", help="write eval.json, per_class.csv and confusion.csv here")
    _add_no_progress(p)
    p.set_defaults(func=cmd_evaluate)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="top-5 classes of image files")
    _add_inference(p)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top", type=at_least(1), default=5, help="classes shown per image (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_predict)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="decode a dataset once into fixed 256x256 images for fast training")
    p.add_argument("src", nargs="?", help="ImageNet-layout folder (train/ and/or val/)")
    p.add_argument("out", help="folder for the prepared dataset; an interrupted prepare resumes")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["raw", "jpeg"],
        default="raw",
        help="raw uint8 arrays (fastest) or JPEG-packed (smaller)",
    )
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--image-size", type=int, default=256, help="images are scaled and centre-cropped to this")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (--format jpeg; default: 90)")
    p.add_argument("--splits", nargs="+", choices=["train", "val"], help="the splits to prepare (default: all found)")
    p.add_argument("--check", action="store_true", help="only verify the finished dataset in OUT")
    _add_no_progress(p)
    p.set_defaults(func=cmd_prepare)


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="training images/s against torchvision's fp32 eager AlexNet, same run")
    p.add_argument("--preset", default="paper", help=HELP["preset"])
    p.add_argument("--batch-size", type=at_least(1), default=128, help="images per step (default: 128)")
    _add_device(p)
    p.add_argument("--precision", default="auto", help=HELP["precision"])
    p.add_argument("--channels-last", default="on", help=HELP["channels_last"])
    p.add_argument("--compile", action="store_true", help=HELP["compile"])
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, help=HELP["cuda_graphs"])
    p.add_argument("--data", help="a prepared dataset (alexnet prepare): also measure end-to-end training from it")
    p.add_argument("--steps", type=at_least(1), default=10, help="steps per round")
    p.add_argument("--warmup", type=at_least(0), default=3, help="steps before timing")
    p.add_argument("--rounds", type=at_least(1), default=3, help="rounds, alternating between candidates; median kept")
    p.add_argument("--no-baseline", action="store_true", help="skip the torchvision fp32 eager baseline")
    p.add_argument("--lrn-kernels", help="LRN's kernels, to measure a candidate: triton-band, triton, compiled, eager")
    p.add_argument("--fuse-lrn", action="store_true", help="conv1's and conv2's bias, ReLU and LRN in LRN's kernels")
    p.set_defaults(func=cmd_benchmark)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="layer table, parameter counts and deviations from the paper")
    p.add_argument("--preset", default="paper", help=HELP["preset"])
    p.add_argument("--groups", type=int, help=HELP["groups"])
    p.add_argument("--num-classes", type=int, default=1000, help="classes of fc8 (default: 1000)")
    p.add_argument("--input-size", type=at_least(1), help="the input size of the table (default: the preset's)")
    p.set_defaults(func=cmd_info)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from .interop.weights import SOURCES

    p = sub.add_parser("convert", help="torchvision or Caffe (bvlc_alexnet) weights -> an alexnet checkpoint")
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="format of FILE")
    p.add_argument("file", metavar="FILE", help="state_dict file, .caffemodel or bvlc_alexnet.npy")
    p.add_argument("--out", required=True, help="checkpoint file to write")
    p.add_argument("--mean", help="Caffe's mean image (.binaryproto or .npy); default: per channel [104, 117, 123] BGR")
    p.add_argument("--classes", help="class list: synset_words.txt, one wnid per line, or classes.tsv")
    p.set_defaults(func=cmd_convert)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from .interop.export import FORMATS

    p = sub.add_parser("export", help="a checkpoint as ONNX, torch.export, TorchScript or safetensors")
    _add_checkpoint(p)
    p.add_argument("--format", required=True, choices=FORMATS, help="export: torch.export's .pt2")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--input-size", type=at_least(1), help="input height = width (default: the checkpoint's crop)")
    p.add_argument("--check", nargs="+", metavar="IMAGE", help="compare the export with PyTorch on these images")
    p.set_defaults(func=cmd_export)


def _add_features(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="activations of named layers (conv1..conv5, pool5, fc6..fc8) for images")
    _add_checkpoint(p)
    p.add_argument("--layer", action="append", required=True, help="a layer name; repeat for several")
    p.add_argument("images", nargs="+", help="image files or folders (a class folder of the model gives the label)")
    p.add_argument("--out", required=True, help=".npz (layers, files, labels, classes) or .npy (one layer)")
    _add_loading(p, batch_size=32)
    _add_device(p)
    _add_no_progress(p)
    p.set_defaults(func=cmd_features)


def _add_figures(sub: argparse._SubParsersAction) -> None:
    text = "PNG figures of a run: conv1 filters, predictions, neighbours, curves, confusion"
    p = sub.add_parser("figures", help=text)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    p.add_argument("--data", help="dataset folder (default: the run's config.json data)")
    p.add_argument("--out", help="folder for the PNG files (default: RUN_DIR/figures)")
    p.add_argument(
        "--neighbour-images", type=at_least(0), default=2000, help="training images searched for neighbours (0: all)"
    )
    _add_loading(p, batch_size=32)
    _add_device(p)
    _add_no_progress(p)
    p.set_defaults(func=cmd_figures)


def main(argv: list[str] | None = None) -> int:
    from .data.folders import loader_worker_death
    from .stopping import Interrupted, Terminated, sigterm_unwinds
    from .train.loop import Diverged

    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print as escapes, not a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        with sigterm_unwinds():
            args, extra = build_parser().parse_known_args(argv)
            if extra:  # argparse's own check would point at the top command's help, not this one's
                raise UserError(f"unrecognized arguments: {' '.join(extra)} (see alexnet {args.command} --help)")
            return args.func(args)
    except UserError as e:
        print(f"alexnet: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        resumable = (e.run_dir / "config.json").is_file()
        then = e.then or (f"resume with: alexnet train --resume {e.run_dir}" if resumable else "nothing was written")
        print(f"alexnet: {e}; {then}", file=sys.stderr)
        return 128 + e.signum
    except Diverged as e:
        print(f"alexnet: error: {e}", file=sys.stderr)
        return 1
    except Terminated:
        print("alexnet: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("alexnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: nothing left to say
        return 0
    except RuntimeError as e:
        if (said := loader_worker_death(e)) is None:
            raise
        print(f"alexnet: error: {said}", file=sys.stderr)
        return 2  # as for the other one-line errors (UserError), the same death in train and prepare included
    except OSError as e:  # a full disk, a permission, a file that vanished: say which, in one line
        print(f"alexnet: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
