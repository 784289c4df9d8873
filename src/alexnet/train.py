"""Training, top to bottom: data, statistics, model, optimizer, the epoch loop, the final evaluation.

Every random choice of a step (its augmentation, its dropout masks) is drawn from a seed that is a
function of (run seed, step), and each epoch's order from (run seed, epoch). So a run stopped at any
step and resumed from its checkpoint computes exactly what an uninterrupted run computes.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .augment import PixelStats, make_pixel_stats, train_batch
from .checkpoint import (
    append_jsonl,
    link_atomic,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
    write_atomic,
    write_text_atomic,
)
from .config import TrainConfig
from .data import Batch, EpochSampler, ImageDataset, display_names, image_moments, make_loader, open_split
from .errors import UserError
from .evaluate import evaluate, write_report
from .export import read_safetensors
from .model import build_model
from .prepared import PreparedLoader, is_prepared, open_prepared, read_manifest
from .schedule import make_scheduler, steps_each_iteration
from .tblog import TensorBoardLog
from .weights import freeze_layers, load_pretrained, read_pretrained


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint of the step reached has been written."""

    def __init__(self, run_dir: Path, signum: int, epoch: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, step {step}")
        self.run_dir, self.signum = run_dir, signum


class Diverged(Exception):
    """The loss became NaN or infinite; the last checkpoint is the last good state."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r}") from e


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def write_classes(path: Path, classes: list[str], names: list[str]) -> None:
    rows = ["index\twnid\tname"] + [f"{i}\t{c}\t{n}" for i, (c, n) in enumerate(zip(classes, names, strict=True))]
    write_text_atomic(path, "\n".join(rows) + "\n")


def write_bad_files(run_dir: Path, bad_files: set[str]) -> None:
    write_text_atomic(run_dir / "bad_files.txt", "".join(f"{b}\n" for b in sorted(bad_files)))


class StopSignals:
    """First SIGINT/SIGTERM: remember it, let the current step finish. Second: the default action, at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old = {}

    def __enter__(self) -> StopSignals:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        for s in self._old:
            signal.signal(s, signal.SIG_DFL)

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@dataclass
class RunState:
    """Where training stands: what a checkpoint must hold besides the model and optimizer."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch already done
    best_top1_err: float = math.inf
    # running sums of the current epoch's training metrics
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train as `cfg` says and return the run directory. `resume`: continue the run in cfg.run_dir."""
    cfg = cfg.resolved()
    if cfg.data is None:
        raise UserError("no --data given")
    run_dir = Path(cfg.run_dir or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if resume and not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json) and cannot be resumed")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run directory {run_dir} already exists; resume it with --resume {run_dir} or pick another")
    device = pick_device(cfg.device)
    # --init-from: read and checked now, so a wrong file stops the run before its directory is made
    pretrained = read_pretrained(cfg.init_from, cfg) if cfg.init_from and not resume else None

    # --- data: a prepared dataset (alexnet prepare) or an image folder decoded per image ---------
    run_dir.mkdir(parents=True, exist_ok=True)
    bad_files: set[str] = set()
    moments = None
    if is_prepared(cfg.data):
        manifest = read_manifest(cfg.data)
        if manifest["size"] != cfg.image_size:
            raise UserError(f"{cfg.data} holds {manifest['size']}px images; pass --image-size {manifest['size']}")
        train_data, val_data = open_prepared(cfg.data, "train"), open_prepared(cfg.data, "val")
        classes, names = manifest["classes"], manifest["names"]
        moments = torch.load(Path(cfg.data) / "stats.pt", weights_only=True)
        bad_files.update((Path(cfg.data) / "bad.txt").read_text().splitlines())
        pin = device.type == "cuda"

        def train_loader(epoch: int, start_step: int) -> Iterable[Batch]:
            return PreparedLoader(
                train_data, cfg.batch_size, cfg.seed, epoch, start_step, device=device, pin_memory=pin
            )

        val_loader = PreparedLoader(val_data, cfg.batch_size, shuffle=False, device=device, pin_memory=pin)
        tqdm.write(f"data: prepared {manifest['fmt']} dataset {cfg.data}")
    else:
        train_split = open_split(cfg.data, "train")
        val_split = open_split(cfg.data, "val", classes=train_split.classes)
        for c in train_split.empty_classes:
            tqdm.write(f"warning: class folder {c} in {cfg.data}/train has no images")
        classes, names = train_split.classes, train_split.names
        train_data = ImageDataset(train_split.samples, cfg.image_size)
        val_loader = make_loader(ImageDataset(val_split.samples, cfg.image_size), cfg.batch_size, cfg.workers)

        def train_loader(epoch: int, start_step: int) -> Iterable[Batch]:
            sampler = EpochSampler(len(train_data), cfg.seed, epoch, start=start_step * cfg.batch_size)
            return make_loader(train_data, cfg.batch_size, cfg.workers, sampler, pin_memory=device.type == "cuda")

        tqdm.write(f"data: image folder {cfg.data}, decoded per image (alexnet prepare makes it faster)")
    num_classes = len(classes)
    if num_classes < 2:
        raise UserError(f"{cfg.data}/train needs at least 2 class folders, found {num_classes}")
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    if not resume:
        write_text_atomic(run_dir / "config.json", cfg.to_json() + "\n")
        write_classes(run_dir / "classes.tsv", classes, names)

    # --- statistics of the training set: mean image and colour covariance, once per run ------------
    stats_path = run_dir / "stats.pt"
    if stats_path.is_file():
        moments = torch.load(stats_path, weights_only=True)
    elif moments is None:
        tqdm.write(f"computing the mean image and colour covariance of {len(train_data)} training images")
        loader = make_loader(train_data, cfg.batch_size, cfg.workers)
        mean_image, cov, count, bad = image_moments(tqdm(loader, desc="stats", leave=False, disable=not progress))
        moments = {"mean_image": mean_image, "covariance": cov, "images": count}
        bad_files.update(bad)
        write_bad_files(run_dir, bad_files)
        if len(bad_files) > 0.5 * len(train_data):
            raise UserError(
                f"{len(bad_files)} of {len(train_data)} training images cannot be read; see {run_dir / 'bad_files.txt'}"
            )
    if not stats_path.is_file():
        write_atomic(stats_path, lambda f: torch.save(moments, f))
    stats = make_pixel_stats(moments["mean_image"], moments["covariance"], cfg.mean, cfg.scale, cfg.pca)

    # --- model and optimizer ---------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.preset, num_classes, cfg.groups, cfg.dropout, cfg.init, cfg.lrn).to(device)
    if pretrained is not None:  # a resumed run loads its own weights below
        tqdm.write(load_pretrained(model, pretrained, classes))
    if cfg.freeze:
        tqdm.write(f"frozen: {', '.join(freeze_layers(model, cfg.freeze))}")
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    state = RunState()
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = RunState(**ckpt["run_state"])
        bad_files.update(ckpt.get("bad_files", []))
        # drop metric lines of epochs the checkpoint does not contain (written just before a crash)
        kept = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["epoch"] <= state.epoch]
        write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
        torch.set_rng_state(ckpt["rng"])
        tqdm.write(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step_in_epoch}")

    def checkpoint(path: Path) -> None:
        save_checkpoint(
            {
                "config": cfg.__dict__,
                "classes": classes,
                "names": names,
                "stats": stats.state_dict(),
                "model": model.state_dict(),
                "run_state": state.__dict__,
                "bad_files": sorted(bad_files),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),  # for completeness: each step reseeds from (seed, step)
            },
            path,
        )

    # --- the epoch loop --------------------------------------------------------------------------
    dev_stats = stats.to(device)
    tb = TensorBoardLog(run_dir / "tensorboard") if cfg.tensorboard else None
    with StopSignals() as stop:
        while state.epoch < cfg.epochs:
            epoch = state.epoch
            loader = train_loader(epoch, state.step_in_epoch)
            model.train()
            bar = tqdm(
                total=steps_per_epoch,
                initial=state.step_in_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not progress,
                unit="step",
                dynamic_ncols=True,
            )
            loss_acc = torch.zeros((), device=device)
            correct_acc = torch.zeros((), dtype=torch.long, device=device)
            seen_since, t_log = 0, time.perf_counter()
            for batch in loader:
                step = epoch * steps_per_epoch + state.step_in_epoch
                bad_files.update(batch.bad)
                if len(batch.labels):
                    torch.manual_seed(step_seed(cfg.seed, step))  # dropout masks of this step
                    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step))
                    images = batch.images.to(device, non_blocking=True)
                    labels = batch.labels.to(device, non_blocking=True)
                    x = train_batch(images, dev_stats, gen, cfg.crop, cfg.lighting)
                    logits = model(x)
                    loss = F.cross_entropy(logits, labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_acc += loss.detach() * len(labels)
                    correct_acc += (logits.argmax(1) == labels).sum()
                    seen_since += len(labels)
                if steps_each_iteration(scheduler):
                    scheduler.step()
                state.step_in_epoch += 1
                bar.update(1)
                checkpoint_due = cfg.checkpoint_every and state.step_in_epoch % cfg.checkpoint_every == 0
                at_end = state.step_in_epoch == steps_per_epoch
                if state.step_in_epoch % cfg.log_every == 0 or at_end or stop.signum or checkpoint_due:
                    elapsed = time.perf_counter() - t_log
                    loss_sum, correct = float(loss_acc), int(correct_acc)  # one sync per interval
                    if not math.isfinite(loss_sum):
                        raise Diverged(
                            f"loss became {loss_sum} at epoch {epoch + 1}, step {state.step_in_epoch}; "
                            f"last good checkpoint: {run_dir / 'last.pt'} (try a lower --lr)"
                        )
                    state.loss_sum += loss_sum
                    state.correct += correct
                    state.seen += seen_since
                    state.seconds += elapsed
                    if tb and seen_since:
                        tb.interval(step + 1, loss_sum / seen_since, seen_since / max(elapsed, 1e-9))
                    steps_left = (cfg.epochs - epoch) * steps_per_epoch - state.step_in_epoch
                    run_eta = steps_left * cfg.batch_size * state.seconds / max(state.seen, 1)
                    bar.set_postfix(
                        loss=f"{state.loss_sum / max(state.seen, 1):.3f}",
                        img_s=f"{seen_since / max(elapsed, 1e-9):.0f}",
                        run_eta=time.strftime("%H:%M:%S", time.gmtime(run_eta)),
                    )
                    loss_acc.zero_()
                    correct_acc.zero_()
                    seen_since, t_log = 0, time.perf_counter()
                if checkpoint_due and not at_end:
                    checkpoint(run_dir / "last.pt")
                if stop.signum:
                    bar.close()
                    checkpoint(run_dir / "last.pt")
                    raise Interrupted(run_dir, stop.signum, epoch, state.step_in_epoch)
            bar.close()

            val = evaluate(model, val_loader, stats, num_classes, device, cfg.crop, progress=progress)
            bad_files.update(val.bad)
            if not steps_each_iteration(scheduler):
                scheduler.step(val.top1_err)
            record = {
                "epoch": epoch + 1,
                "step": (epoch + 1) * steps_per_epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": state.loss_sum / max(state.seen, 1),
                "train_top1_err": 1 - state.correct / max(state.seen, 1),
                "val_loss": val.loss,
                "val_top1_err": val.top1_err,
                "val_top5_err": val.top5_err,
                "images_per_s": state.seen / max(state.seconds, 1e-9),
                "epoch_seconds": state.seconds,
                "bad_files": len(bad_files),
            }
            tqdm.write(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, val top-1 err "
                f"{val.top1_err:.4f}, top-5 err {val.top5_err:.4f}, {record['images_per_s']:.0f} img/s, "
                f"lr {record['lr']:.2g}"
            )
            append_jsonl(run_dir / "metrics.jsonl", record)
            if tb:
                tb.epoch(record, model)
            improved = val.top1_err < state.best_top1_err
            state = RunState(epoch=epoch + 1, best_top1_err=min(state.best_top1_err, val.top1_err))
            checkpoint(run_dir / "last.pt")
            if improved:
                link_atomic(run_dir / "last.pt", run_dir / "best.pt")
            write_bad_files(run_dir, bad_files)

    if tb:
        tb.close()

    # --- the paper's test protocol on the best weights -------------------------------------------
    best = load_checkpoint(run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt")
    model.load_state_dict(best["model"])
    results = {
        "center": evaluate(model, val_loader, stats, num_classes, device, cfg.crop, progress=progress),
        "ten_crop": evaluate(model, val_loader, stats, num_classes, device, cfg.crop, ten_crop=True, progress=progress),
    }
    write_report(run_dir, results, classes, names)
    for name, r in results.items():
        tqdm.write(f"{name}: top-1 error {r.top1_err:.4f}, top-5 error {r.top5_err:.4f} on {r.count} val images")
    return run_dir


def load_for_inference(checkpoint: str | Path, device: torch.device) -> tuple[torch.nn.Module, PixelStats, dict]:
    """Model (eval mode), pixel statistics and the checkpoint dict, from a checkpoint file, run directory
    or .safetensors export."""
    ckpt = read_safetensors(checkpoint) if str(checkpoint).endswith(".safetensors") else load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model(cfg.preset, len(ckpt["classes"]), cfg.groups, cfg.dropout, cfg.init, cfg.lrn)
    model.load_state_dict(ckpt["model"])
    stats = PixelStats(**ckpt["stats"])
    ckpt["names"] = display_names(ckpt["classes"], ckpt.get("names"))  # ILSVRC-2012 names for bare wnids
    return model.to(device).eval(), stats, ckpt
