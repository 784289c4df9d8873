"""Training, top to bottom: data, statistics, model, optimizer, the epoch loop, the final evaluation.

Every random choice of a step (its augmentation, its dropout masks) is drawn from a seed that is a
function of (run seed, step), and each epoch's order from (run seed, epoch). So a run stopped at any
step and resumed from its checkpoint computes exactly what an uninterrupted run computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import (
    TMP_SUFFIX,
    RunLock,
    append_jsonl,
    link_atomic,
    load_checkpoint,
    read_jsonl,
    remove_temporaries,
    save_checkpoint,
    write_atomic,
    write_text_atomic,
)
from ..data.augment import make_pixel_stats
from ..data.folders import (
    Batch,
    EpochBatches,
    ImageDataset,
    image_moments,
    listing,
    loader_worker_death,
    make_loader,
    open_split,
    rank_share,
)
from ..data.prepared import PreparedLoader, is_prepared, open_prepared, read_manifest
from ..errors import UserError
from ..inspect.evaluate import evaluate, write_report
from ..interop.weights import freeze_layers, load_pretrained, read_pretrained
from ..stopping import StopSignals
from . import distributed
from .config import TrainConfig
from .distributed import Ranks
from .schedule import make_scheduler, scale_learning_rate, steps_each_iteration
from .step import (
    TrainStep,
    decay_groups,
    make_optimizer,
    pick_device,
    resolve_channels_last,
    resolve_cuda_graphs,
    resolve_precision,
    tune_for,
)
from .tblog import TensorBoardLog


class Diverged(Exception):
    """The loss became NaN or infinite; the last checkpoint is the last good state."""


def can_roll_back(cfg: TrainConfig, state: RunState, run_dir: Path) -> bool:
    """--on-nan rollback applies: a checkpoint to go back to, and rollbacks left (3 in a run)."""
    return cfg.on_nan == "rollback" and state.rollbacks < 3 and (run_dir / "last.pt").is_file()


def diverged_hint(run_dir: Path, on_nan: str) -> str:
    """What is kept of a diverged run, and what can be done next: only what a resume accepts
    (--on-nan, not --lr, which would change what the run computes)."""
    if not (run_dir / "last.pt").is_file():
        return "no checkpoint had been written yet; start again with a lower --lr" + (
            ", or with --on-nan rollback" if on_nan != "rollback" else ""
        )
    kept = f"last good checkpoint: {run_dir / 'last.pt'}"
    if on_nan == "rollback":  # its 3 rollbacks used: a resume would stop again
        return f"{kept}; --on-nan rollback has used its 3 rollbacks: start a new run with a lower --lr"
    return (
        f"{kept}; resume with: alexnet train --resume {run_dir} --on-nan rollback (it goes back to the last"
        " checkpoint with a tenth of the learning rate), or start a new run with a lower --lr"
    )


def flat_loss_warning(train_loss: float, num_classes: int, epoch: int) -> str | None:
    """One line for an epoch whose mean training loss stayed within 3% of ln(classes), the loss of a
    uniform guess: the network is not learning (docs/learning.md: why, and what fixes it)."""
    chance = math.log(num_classes)
    if not abs(train_loss - chance) <= 0.03 * chance:
        return None
    return (
        f"warning: epoch {epoch}'s training loss {train_loss:.4f} stayed at chance (ln {num_classes} = {chance:.4f}):"
        " the network is not learning; try --init kaiming, or a lower --lr (see docs/learning.md)"
    )


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def write_classes(path: Path, classes: list[str], names: list[str]) -> None:
    rows = ["index\twnid\tname"] + [f"{i}\t{c}\t{n}" for i, (c, n) in enumerate(zip(classes, names, strict=True))]
    write_text_atomic(path, "\n".join(rows) + "\n")


def _differences(made_with: list[str], now: list[str]) -> str:
    missing, extra = [c for c in made_with if c not in now], [c for c in now if c not in made_with]
    if not missing and not extra:
        return "the same names in another order"
    listed = (("missing", missing), ("new", extra))
    return "; ".join(f"{what} {', '.join(cs[:5])}{' ...' if len(cs) > 5 else ''}" for what, cs in listed if cs)


def write_bad_files(run_dir: Path, bad_files: set[str]) -> None:
    write_text_atomic(run_dir / "bad_files.txt", "".join(f"{b}\n" for b in sorted(bad_files)))


@dataclass
class RunState:
    """Where training stands: what a checkpoint must hold besides the model and optimizer."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches of the current epoch already done
    best_top1_err: float = math.inf
    best_epoch: int = 0  # the epoch best.pt holds (0: none yet)
    # running sums of the current epoch's training metrics
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    rollbacks: int = 0  # --on-nan rollback: how many of its 3 the run has used


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train as `cfg` says and return the run directory. `resume`: continue the run in cfg.run_dir.

    Under torchrun (distributed.py) every process calls this; rank 0 alone writes the run directory.
    """
    cfg = cfg.resolved()
    if cfg.data is None:
        raise UserError("no --data given")
    device = pick_device(cfg.device)
    ranks, device = distributed.start(device)
    tune_for(device)
    try:
        # --init-from: read and checked now, so a wrong file stops the run before its directory is made;
        # a resumed run starts from its checkpoint instead, where it has one
        has_checkpoint = resume and Path(cfg.run_dir or "", "last.pt").is_file()
        with distributed.together(ranks):  # on every machine: one without the file stops them all
            pretrained = read_pretrained(cfg.init_from, cfg) if cfg.init_from and not has_checkpoint else None
        # --cuda-graphs where they cannot run: stopped before the run directory is made
        resolve_cuda_graphs(
            cfg.cuda_graphs, device, resolve_precision(cfg.precision, device), cfg.compile, ranks.distributed
        )
        if ranks.distributed and not cfg.run_dir:  # a default name would differ between processes
            raise UserError("under torchrun, give every process the same --run-dir")
        run_dir = Path(cfg.run_dir or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        if not ranks.is_main:
            distributed.barrier(ranks)  # rank 0 checks and locks the run directory first
            with StopSignals(run_dir) as stop:
                return _train(cfg, run_dir, resume, False, device, ranks, pretrained, stop)
        check_run_directory(run_dir, resume)
        made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # what mkdir makes, deepest first
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with RunLock(run_dir), StopSignals(run_dir) as stop:
                check_run_directory(run_dir, resume)  # again: another process may have started it meanwhile
                remove_temporaries(run_dir)  # of a process killed mid-write
                distributed.barrier(ranks)
                return _train(cfg, run_dir, resume, progress, device, ranks, pretrained, stop)
        except BaseException:
            if made and not (run_dir / "config.json").exists():  # stopped before writing anything (a wrong path)
                shutil.rmtree(run_dir, ignore_errors=True)
                for parent in made[1:]:  # such as runs/, unless something else came into it meanwhile
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            raise
    except RuntimeError as e:  # a data-loader worker killed: the last checkpoint is whole, as after a kill -9
        if (said := loader_worker_death(e)) is None:
            raise
        written = (run_dir / "config.json").is_file()
        then = f"resume with: alexnet train --resume {run_dir}" if written else "nothing was written"
        raise UserError(f"{said}; {then}") from e
    finally:
        distributed.stop()


def check_run_directory(run_dir: Path, resume: bool) -> None:
    if resume and not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json) and cannot be resumed")
    if not resume and run_dir.exists():
        if not run_dir.is_dir() or any(p.name != "lock" and not p.name.endswith(TMP_SUFFIX) for p in run_dir.iterdir()):
            raise UserError(
                f"run directory {run_dir} already exists; resume it with --resume {run_dir} or pick another"
            )


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    progress: bool,
    device: torch.device,
    ranks: Ranks,
    pretrained: dict | None,
    stop: StopSignals,
) -> Path:
    main = ranks.is_main

    def say(text: str) -> None:
        if main:
            tqdm.write(text)

    if ranks.distributed and cfg.batch_size < ranks.world_size:
        raise UserError(f"batch size {cfg.batch_size} is smaller than the {ranks.world_size} processes")
    # Every rank reads what rank 0 writes here (stats.pt, checkpoints): on several machines that takes a
    # shared file system. Rank 0's lock names its process and machine; a rank that reads another name
    # (or none) has a directory of its own, and would train from other statistics and checkpoints.
    lock = run_dir / "lock"
    if odd := distributed.differing_ranks(lock.read_text() if lock.is_file() else None, ranks):
        raise UserError(
            f"{odd} cannot see the run directory that rank 0 writes ({run_dir}): give every node the same"
            " --run-dir on a shared file system"
        )

    # --- data: a prepared dataset (alexnet prepare) or an image folder decoded per image ---------
    bad_files: set[str] = set()
    moments = None
    share = {"rank": ranks.rank, "world_size": ranks.world_size}
    with distributed.together(ranks):  # a rank that cannot open its data stops all of them
        if is_prepared(cfg.data):
            manifest = read_manifest(cfg.data)
            if manifest["size"] != cfg.image_size:
                fix = (
                    f"prepare one with --image-size {cfg.image_size}, as the run was made"
                    if resume
                    else f"pass --image-size {manifest['size']}"
                )
                raise UserError(f"{cfg.data} holds {manifest['size']}px images; {fix}")
            train_data, val_data = open_prepared(cfg.data, "train"), open_prepared(cfg.data, "val")
            classes, names = manifest["classes"], manifest["names"]
            held = [manifest["fmt"], classes, {name: info["images"] for name, info in manifest["splits"].items()}]
            moments = torch.load(Path(cfg.data) / "stats.pt", weights_only=True)
            bad_files.update((Path(cfg.data) / "bad.txt").read_text(errors="surrogateescape").splitlines())
            pin = device.type == "cuda"

            def train_loader(epoch: int, start_step: int) -> Iterable[Batch]:
                return PreparedLoader(
                    train_data, cfg.batch_size, cfg.seed, epoch, start_step, device=device, pin_memory=pin, **share
                )

            val_loader = PreparedLoader(val_data, cfg.batch_size, shuffle=False, device=device, pin_memory=pin, **share)
            say(f"data: prepared {manifest['fmt']} dataset {cfg.data}")
        else:
            train_split = open_split(cfg.data, "train")
            val_split = open_split(cfg.data, "val", classes=train_split.classes)
            for c in train_split.empty_classes:
                say(f"warning: class folder {c} in {cfg.data}/train has no images")
            classes, names = train_split.classes, train_split.names
            held = None  # under DDP: paths under --data, which may lie elsewhere on another machine
            if ranks.distributed:
                held = [classes, listing(train_split, cfg.data), listing(val_split, cfg.data)]
            train_data = ImageDataset(train_split.samples, cfg.image_size)
            val_samples = rank_share(val_split.samples, ranks.rank, ranks.world_size)
            val_loader = make_loader(ImageDataset(val_samples, cfg.image_size), cfg.batch_size, cfg.workers)

            def train_loader(epoch: int, start_step: int) -> Iterable[Batch]:
                batches = EpochBatches(len(train_data), cfg.batch_size, cfg.seed, epoch, start_step, **share)
                return make_loader(train_data, 0, cfg.workers, pin_memory=device.type == "cuda", batch_sampler=batches)

            say(f"data: image folder {cfg.data}, decoded per image (alexnet prepare makes it faster)")
    # each rank reads --data on its own machine: all must hold what rank 0's holds (`held`)
    if odd := distributed.differing_ranks(held, ranks):
        raise UserError(f"{odd} found other classes or images in {cfg.data} than rank 0: give every node the same data")
    num_classes = len(classes)
    if num_classes < 2:
        raise UserError(f"{cfg.data}/train needs at least 2 class folders, found {num_classes}")
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    if (run_dir / "classes.tsv").is_file():  # a resumed run: its data must be what it was made with
        made_with = [row.split("\t")[1] for row in (run_dir / "classes.tsv").read_text().splitlines()[1:]]
        if classes != made_with:
            raise UserError(
                f"{cfg.data} holds other classes than {run_dir} was trained on (its classes.tsv):"
                f" {_differences(made_with, classes)}; a resumed run cannot change them"
            )

    # --- rank 0 writes the config, the classes and the training set's mean image and colour covariance
    stats_path = run_dir / "stats.pt"
    with distributed.together(ranks):  # the other ranks wait for them, or for rank 0's error
        if main and not (run_dir / "config.json").is_file():
            write_text_atomic(run_dir / "config.json", cfg.to_json() + "\n")
        if main and not (run_dir / "classes.tsv").is_file():
            write_classes(run_dir / "classes.tsv", classes, names)
        if main and moments is None and not stats_path.is_file():
            say(f"computing the mean image and colour covariance of {len(train_data)} training images")
            loader = make_loader(train_data, cfg.batch_size, cfg.workers)
            mean_image, cov, count, bad = image_moments(tqdm(loader, desc="stats", leave=False, disable=not progress))
            moments = {"mean_image": mean_image, "covariance": cov, "images": count}
            bad_files.update(bad)
            write_bad_files(run_dir, bad_files)
            if len(bad_files) > 0.5 * len(train_data):
                raise UserError(
                    f"{len(bad_files)} of {len(train_data)} training images cannot be read; see"
                    f" {run_dir / 'bad_files.txt'}"
                )
        if main and not stats_path.is_file():
            write_atomic(stats_path, lambda f: torch.save(moments, f))
    moments = torch.load(stats_path, weights_only=True)
    stats = make_pixel_stats(moments["mean_image"], moments["covariance"], cfg.mean, cfg.scale, cfg.pca)

    # --- model, optimizer and the training step -----------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = cfg.build_model(num_classes).to(device)
    if pretrained is not None:  # a resumed run loads its own weights below
        say(load_pretrained(model, pretrained, classes))
    if cfg.freeze:
        say(f"frozen: {', '.join(freeze_layers(model, cfg.freeze))}")
    precision = resolve_precision(cfg.precision, device)
    channels_last = resolve_channels_last(cfg.channels_last)
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = make_optimizer(decay_groups(model, cfg.bias_decay), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    state = RunState()
    trained = model  # what forward and backward run: compiled and/or DDP-wrapped `model`
    if cfg.compile:
        trained = torch.compile(trained)
    if ranks.distributed:
        # gradients are all-reduced bucket by bucket while backward goes on (DDP overlaps the two)
        trained = DistributedDataParallel(
            trained, device_ids=[device] if device.type == "cuda" else None, bucket_cap_mb=cfg.ddp_bucket_mb
        )
    dev_stats = stats.to(device)
    step_fn = TrainStep(
        trained,
        optimizer,
        dev_stats,
        cfg.crop,
        cfg.lighting,
        precision,
        channels_last,
        world_size=ranks.world_size,
        cuda_graph=resolve_cuda_graphs(cfg.cuda_graphs, device, precision, cfg.compile, ranks.distributed),
    )
    ddp = f", DDP over {ranks.world_size} processes" if ranks.distributed else ""
    say(
        f"device: {device}{ddp}, precision {precision}{', channels_last' if channels_last else ''}"
        f"{', compiled' if cfg.compile else ''}{', CUDA graphs' if step_fn.cuda_graph else ''}"
    )

    def restore(ckpt: dict) -> RunState:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step_fn.forget_graph()  # new momentum buffers: a captured step would read the old ones
        for group in optimizer.param_groups:  # a checkpoint from before fused SGD says fused=None
            group["fused"] = True
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            step_fn.scaler.load_state_dict(ckpt["scaler"])
        bad_files.update(ckpt.get("bad_files", []))
        return RunState(**ckpt["run_state"])

    if resume and (run_dir / "last.pt").is_file():
        ckpt = load_checkpoint(run_dir / "last.pt")
        if ckpt.get("train_images", len(train_data)) != len(train_data):  # the epochs' batches would differ
            raise UserError(
                f"{cfg.data} holds {len(train_data)} training images, {run_dir} was trained on"
                f" {ckpt['train_images']}; a resumed run cannot change its data (start a new run with --init-from)"
            )
        state = restore(ckpt)
        torch.set_rng_state(ckpt["rng"])
        say(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step_in_epoch}")
        if main and state.epoch and not state.step_in_epoch and state.best_epoch == state.epoch:
            link_atomic(run_dir / "last.pt", run_dir / "best.pt")  # in case a crash came between the two
    elif resume:
        say(f"{run_dir} has no checkpoint yet: starting it from the beginning")
    # Rank 0 alone writes; each of its writes below runs in `together`, so that a full disk stops every
    # rank with rank 0's line, where on other machines they would fail in their next collective.
    with distributed.together(ranks):
        if main:
            # drop metric lines of epochs the checkpoint does not contain (written just before a crash)
            kept = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["epoch"] <= state.epoch]
            write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
            # resumed with a raised --epochs or a moved --data: keep them, for a plain --resume to go on with
            stored = TrainConfig.load(run_dir / "config.json")
            if (stored.epochs, stored.data) != (cfg.epochs, cfg.data):
                stored = dataclasses.replace(stored, epochs=cfg.epochs, data=cfg.data)
                write_text_atomic(run_dir / "config.json", stored.to_json() + "\n")

    def checkpoint(path: Path) -> None:
        """Rank 0's checkpoint, which every rank waits for: call it on every rank."""
        with distributed.together(ranks):
            if main:
                write_checkpoint(path)

    def write_checkpoint(path: Path) -> None:
        save_checkpoint(
            {
                "config": cfg.__dict__,
                "classes": classes,
                "names": names,
                "train_images": len(train_data),
                "stats": stats.state_dict(),
                "model": model.state_dict(),
                "run_state": state.__dict__,
                "bad_files": sorted(bad_files),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),  # for completeness: each step reseeds from (seed, step)
                **({"scaler": step_fn.scaler.state_dict()} if step_fn.scaler.is_enabled() else {}),
            },
            path,
        )

    if cfg.on_nan == "rollback" and not (run_dir / "last.pt").is_file():
        checkpoint(run_dir / "last.pt")  # the state to roll back to if the first epoch diverges

    # --- the epoch loop --------------------------------------------------------------------------
    tb = TensorBoardLog(run_dir / "tensorboard") if cfg.tensorboard and main else None
    with stop.deferred(after="after the last epoch"):
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
            # this interval's sums, on the device: [loss, correct, images]; read once per interval
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            t_log = time.perf_counter()
            diverged = False
            for batch in loader:
                step = epoch * steps_per_epoch + state.step_in_epoch
                bad_files.update(batch.bad)
                if len(batch.labels):
                    # dropout masks of this step (each rank its own), then the augmentation's numbers
                    torch.manual_seed((step_seed(cfg.seed, step) + ranks.rank * 2**40) % 2**63)
                    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step))
                    total = min(cfg.batch_size, len(train_data) - state.step_in_epoch * cfg.batch_size)
                    first = total * ranks.rank // ranks.world_size
                    images = batch.images.to(device, non_blocking=True)
                    labels = batch.labels.to(device, non_blocking=True)
                    loss_sum, correct = step_fn(images, labels, gen, first, total if ranks.distributed else None)
                    sums[0] += loss_sum  # on the device, without waiting for it
                    sums[1] += correct
                    sums[2] += len(labels)
                if steps_each_iteration(scheduler):
                    scheduler.step()
                state.step_in_epoch += 1
                bar.update(1)
                checkpoint_due = cfg.checkpoint_every and state.step_in_epoch % cfg.checkpoint_every == 0
                at_end = state.step_in_epoch == steps_per_epoch
                # One process checks for a signal every step; several agree on it once per interval.
                stopping = bool(stop.signum) and not ranks.distributed
                if state.step_in_epoch % cfg.log_every == 0 or at_end or stopping or checkpoint_due:
                    stop_flag = sums.new_tensor([float(bool(stop.signum))])
                    # the weights' sum: a step whose loss was finite can still leave NaN or infinite weights,
                    # which must not reach a checkpoint (one read of the weights per interval)
                    weight_sum = torch.stack([p.detach().sum() for p in model.parameters()]).sum().reshape(1)
                    loss_sum, correct, seen, weight_sum, stopping = distributed.sum_over_ranks(
                        torch.cat([sums, weight_sum.to(sums.dtype), stop_flag]), ranks
                    ).tolist()
                    # after .tolist(), which waits for the device: on CUDA the steps so far may only be queued
                    elapsed = time.perf_counter() - t_log
                    if not math.isfinite(loss_sum + weight_sum):
                        if can_roll_back(cfg, state, run_dir):
                            diverged = True
                            break
                        what = "loss" if not math.isfinite(loss_sum) else "weights"
                        raise Diverged(
                            f"{what} became {loss_sum if what == 'loss' else 'NaN/inf'} at epoch {epoch + 1}, step"
                            f" {state.step_in_epoch}; {diverged_hint(run_dir, cfg.on_nan)}"
                        )
                    state.loss_sum += loss_sum
                    state.correct += int(correct)
                    state.seen += int(seen)
                    state.seconds += elapsed
                    if tb and seen:
                        tb.interval(step + 1, loss_sum / seen, seen / max(elapsed, 1e-9))
                    steps_left = (cfg.epochs - epoch) * steps_per_epoch - state.step_in_epoch
                    run_eta = steps_left * cfg.batch_size * state.seconds / max(state.seen, 1)
                    bar.set_postfix(
                        loss=f"{state.loss_sum / max(state.seen, 1):.3f}",
                        img_s=f"{seen / max(elapsed, 1e-9):.0f}",
                        run_eta=time.strftime("%H:%M:%S", time.gmtime(run_eta)),
                    )
                    sums.zero_()
                    t_log = time.perf_counter()
                if checkpoint_due and not at_end and not stopping:
                    checkpoint(run_dir / "last.pt")
                if stopping:
                    bar.close()
                    checkpoint(run_dir / "last.pt")  # no rank exits before rank 0's checkpoint is whole
                    raise stop.interrupted(f"at epoch {epoch + 1}, step {state.step_in_epoch}")
            bar.close()
            if not diverged:
                val = evaluate(model, val_loader, stats, num_classes, device, cfg.crop, progress=progress, ranks=ranks)
                bad_files.update(val.bad)
                bad_files = distributed.union_over_ranks(bad_files, ranks)
                if val.count == 0:  # every validation image unreadable: no error to choose best.pt or the schedule by
                    with distributed.together(ranks):
                        if main:
                            write_bad_files(run_dir, bad_files)
                    raise UserError(f"no validation image in {cfg.data} can be read; see {run_dir / 'bad_files.txt'}")
                # finite weights can still overflow: outputs that are NaN or infinite are a divergence too
                if not math.isfinite(val.loss):
                    if not can_roll_back(cfg, state, run_dir):
                        raise Diverged(
                            f"the validation loss became {val.loss} at epoch {epoch + 1} (the model's outputs are"
                            f" NaN or infinite); {diverged_hint(run_dir, cfg.on_nan)}"
                        )
                    diverged = True
            if diverged:  # --on-nan rollback: back to the last checkpoint, with a tenth of the learning rate
                state = restore(load_checkpoint(run_dir / "last.pt"))
                state.rollbacks += 1
                scale_learning_rate(optimizer, scheduler, 0.1)
                # kept at once: a second rollback, or a resume, goes on from the lowered rate and the count
                checkpoint(run_dir / "last.pt")
                lr_now = optimizer.param_groups[0]["lr"]
                say(
                    f"loss, weights or outputs became NaN/inf at epoch {epoch + 1}: rolled back to epoch"
                    f" {state.epoch + 1}, step {state.step_in_epoch}, learning rate now {lr_now:.3g}"
                    f" ({state.rollbacks}/3)"
                )
                continue

            if steps_each_iteration(scheduler):  # the rate of the epoch's last step, the one before last_epoch
                lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch - 1)
            else:  # the epoch's rate, before the plateau's decision for the next
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step(val.top1_err)
            record = {
                "epoch": epoch + 1,
                "step": (epoch + 1) * steps_per_epoch,
                "lr": lr,
                "train_loss": state.loss_sum / max(state.seen, 1),
                "train_top1_err": 1 - state.correct / max(state.seen, 1),
                "val_loss": val.loss,
                "val_top1_err": val.top1_err,
                "val_top5_err": val.top5_err,
                "images_per_s": state.seen / max(state.seconds, 1e-9),
                "epoch_seconds": state.seconds,
                "bad_files": len(bad_files),
            }
            say(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4f}, val top-1 err "
                f"{val.top1_err:.4f}, top-5 err {val.top5_err:.4f}, {record['images_per_s']:.0f} img/s, "
                f"lr {record['lr']:.2g}"
            )
            if flat := flat_loss_warning(record["train_loss"], num_classes, epoch + 1):
                say(flat)
            improved = val.top1_err < state.best_top1_err
            best_epoch = epoch + 1 if improved else state.best_epoch
            state = RunState(
                epoch=epoch + 1,
                best_top1_err=min(state.best_top1_err, val.top1_err),
                best_epoch=best_epoch,
                rollbacks=state.rollbacks,
            )
            with distributed.together(ranks):
                if main:
                    append_jsonl(run_dir / "metrics.jsonl", record)
                    if tb:
                        tb.epoch(record, model)
                    write_checkpoint(run_dir / "last.pt")
                    if improved:
                        link_atomic(run_dir / "last.pt", run_dir / "best.pt")
                    write_bad_files(run_dir, bad_files)
            # a signal in the epoch's evaluation or checkpoint: stop now, the epoch whole (all ranks agree)
            if distributed.sum_over_ranks(torch.tensor([float(bool(stop.signum))], device=device), ranks).item():
                raise stop.interrupted(f"after epoch {epoch + 1}")

    if tb:
        tb.close()

    # --- the paper's test protocol on the best weights -------------------------------------------
    stop.where = "in the final evaluation"
    distributed.barrier(ranks)
    best = load_checkpoint(run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt")
    model.load_state_dict(best["model"])
    results = {
        name: evaluate(model, val_loader, stats, num_classes, device, cfg.crop, ten, progress, ranks)
        for name, ten in (("center", False), ("ten_crop", True))
    }
    with distributed.together(ranks):  # a full disk on rank 0 stops every rank, with its line
        if main:
            write_report(run_dir, results, classes, names)
    for name, r in results.items():
        say(f"{name}: top-1 error {r.top1_err:.4f}, top-5 error {r.top5_err:.4f} on {r.count} val images")
    return run_dir
