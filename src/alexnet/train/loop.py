"""Training, top to bottom: train() sets up the processes and the run directory, and Run does the run:
its data, statistics, model and optimizer, a resume, then each epoch (train, validate, finish: metrics and
checkpoint), then the paper's test protocol on the best weights.

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
from ..inspect.evaluate import EvalResult, evaluate, write_report
from ..interop.weights import Pretrained, freeze_layers, load_pretrained, read_pretrained
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
                return Run(cfg, run_dir, resume, False, device, ranks, pretrained, stop).run()
        check_run_directory(run_dir, resume)
        made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # what mkdir makes, deepest first
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with RunLock(run_dir), StopSignals(run_dir) as stop:
                check_run_directory(run_dir, resume)  # again: another process may have started it meanwhile
                remove_temporaries(run_dir)  # of a process killed mid-write
                distributed.barrier(ranks)
                return Run(cfg, run_dir, resume, progress, device, ranks, pretrained, stop).run()
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


class Run:
    """One run in its directory. run() reads top to bottom: check the directory, open the data, write the
    run's files, build the model, resume, then each epoch (train, validate, finish: metrics and checkpoint),
    then the paper's test protocol. The methods share what they make (data, model, optimizer, scheduler,
    the run's state) as attributes of the object."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        resume: bool,
        progress: bool,
        device: torch.device,
        ranks: Ranks,
        pretrained: Pretrained | None,
        stop: StopSignals,
    ) -> None:
        self.cfg, self.run_dir, self.resume, self.progress = cfg, run_dir, resume, progress
        self.device, self.ranks, self.pretrained, self.stop = device, ranks, pretrained, stop
        self.main = ranks.is_main  # rank 0: the only process that writes the run directory
        self.share = {"rank": ranks.rank, "world_size": ranks.world_size}  # this rank's share of each batch
        self.bad_files: set[str] = set()
        self.state = RunState()
        self.tb: TensorBoardLog | None = None
        # and, made by the set-up methods: train_data, val_loader, classes, names, prepared (open_data),
        # num_classes, steps_per_epoch (check_data), stats (write_run_files), model, optimizer, scheduler
        # and step_fn (build_model)

    def run(self) -> Path:
        self.check_shared_directory()
        moments = self.open_data()
        self.check_data()
        self.write_run_files(moments)
        self.build_model()
        self.resume_or_start()
        if self.cfg.on_nan == "rollback" and not (self.run_dir / "last.pt").is_file():
            self.checkpoint()  # the state to roll back to if the first epoch diverges
        self.tb = TensorBoardLog(self.run_dir / "tensorboard") if self.cfg.tensorboard and self.main else None
        with self.stop.deferred(after="after the last epoch"):
            while self.state.epoch < self.cfg.epochs:
                val = self.validate() if self.train_epoch() else None
                if val is None:  # the loss, weights or outputs became NaN/inf, and --on-nan rollback applies
                    self.roll_back()
                    continue
                self.finish_epoch(val)
        if self.tb:
            self.tb.close()
        self.final_evaluation()
        return self.run_dir

    def say(self, text: str) -> None:
        if self.main:
            tqdm.write(text)

    # --- set up --------------------------------------------------------------------------------------

    def check_shared_directory(self) -> None:
        """Every rank reads what rank 0 writes here (stats.pt, checkpoints): on several machines that takes a
        shared file system. Rank 0's lock names its process and machine; a rank that reads another name
        (or none) has a directory of its own, and would train from other statistics and checkpoints."""
        cfg, ranks = self.cfg, self.ranks
        if ranks.distributed and cfg.batch_size < ranks.world_size:
            raise UserError(f"batch size {cfg.batch_size} is smaller than the {ranks.world_size} processes")
        lock = self.run_dir / "lock"
        if odd := distributed.differing_ranks(lock.read_text() if lock.is_file() else None, ranks):
            raise UserError(
                f"{odd} cannot see the run directory that rank 0 writes ({self.run_dir}): give every node the same"
                " --run-dir on a shared file system"
            )

    def open_data(self) -> dict | None:
        """--data: a prepared dataset (alexnet prepare), whose moments this returns, or an image folder
        decoded per image (None: write_run_files computes them)."""
        with distributed.together(self.ranks):  # a rank that cannot open its data stops all of them
            if is_prepared(self.cfg.data):
                return self._open_prepared()
            self._open_folder()
            return None

    def _open_prepared(self) -> dict:
        cfg = self.cfg
        manifest = read_manifest(cfg.data)
        if manifest["size"] != cfg.image_size:
            fix = (
                f"prepare one with --image-size {cfg.image_size}, as the run was made"
                if self.resume
                else f"pass --image-size {manifest['size']}"
            )
            raise UserError(f"{cfg.data} holds {manifest['size']}px images; {fix}")
        self.prepared = True
        self.train_data, val_data = open_prepared(cfg.data, "train"), open_prepared(cfg.data, "val")
        self.classes, self.names = manifest["classes"], manifest["names"]
        self.held = [manifest["fmt"], self.classes, {name: info["images"] for name, info in manifest["splits"].items()}]
        moments = torch.load(Path(cfg.data) / "stats.pt", weights_only=True)
        self.bad_files.update((Path(cfg.data) / "bad.txt").read_text(errors="surrogateescape").splitlines())
        pin = self.device.type == "cuda"
        self.val_loader = PreparedLoader(
            val_data, cfg.batch_size, shuffle=False, device=self.device, pin_memory=pin, **self.share
        )
        self.say(f"data: prepared {manifest['fmt']} dataset {cfg.data}")
        return moments

    def _open_folder(self) -> None:
        cfg = self.cfg
        train_split = open_split(cfg.data, "train")
        val_split = open_split(cfg.data, "val", classes=train_split.classes)
        for c in train_split.empty_classes:
            self.say(f"warning: class folder {c} in {cfg.data}/train has no images")
        self.prepared = False
        self.classes, self.names = train_split.classes, train_split.names
        self.held = None  # under DDP: paths under --data, which may lie elsewhere on another machine
        if self.ranks.distributed:
            self.held = [self.classes, listing(train_split, cfg.data), listing(val_split, cfg.data)]
        self.train_data = ImageDataset(train_split.samples, cfg.image_size)
        val_samples = rank_share(val_split.samples, self.ranks.rank, self.ranks.world_size)
        self.val_loader = make_loader(ImageDataset(val_samples, cfg.image_size), cfg.batch_size, cfg.workers)
        self.say(f"data: image folder {cfg.data}, decoded per image (alexnet prepare makes it faster)")

    def train_loader(self, epoch: int, start_step: int) -> Iterable[Batch]:
        """The epoch's batches from `start_step` on, in the order (seed, epoch) gives."""
        cfg, pin = self.cfg, self.device.type == "cuda"
        if self.prepared:
            return PreparedLoader(
                self.train_data,
                cfg.batch_size,
                cfg.seed,
                epoch,
                start_step,
                device=self.device,
                pin_memory=pin,
                **self.share,
            )
        batches = EpochBatches(len(self.train_data), cfg.batch_size, cfg.seed, epoch, start_step, **self.share)
        return make_loader(self.train_data, 0, cfg.workers, pin_memory=pin, batch_sampler=batches)

    def check_data(self) -> None:
        """Each rank reads --data on its own machine: all must hold what rank 0's holds. A resumed run's
        data must be what it was made with."""
        cfg, run_dir = self.cfg, self.run_dir
        if odd := distributed.differing_ranks(self.held, self.ranks):
            raise UserError(
                f"{odd} found other classes or images in {cfg.data} than rank 0: give every node the same data"
            )
        self.num_classes = len(self.classes)
        if self.num_classes < 2:
            raise UserError(f"{cfg.data}/train needs at least 2 class folders, found {self.num_classes}")
        self.steps_per_epoch = math.ceil(len(self.train_data) / cfg.batch_size)
        if (run_dir / "classes.tsv").is_file():  # a resumed run
            made_with = [row.split("\t")[1] for row in (run_dir / "classes.tsv").read_text().splitlines()[1:]]
            if self.classes != made_with:
                raise UserError(
                    f"{cfg.data} holds other classes than {run_dir} was trained on (its classes.tsv):"
                    f" {_differences(made_with, self.classes)}; a resumed run cannot change them"
                )

    def write_run_files(self, moments: dict | None) -> None:
        """Rank 0 writes the config, the classes and the training set's mean image and colour covariance
        (stats.pt), once; the other ranks wait for them, or for rank 0's error. Every rank reads stats.pt."""
        cfg, run_dir, main = self.cfg, self.run_dir, self.main
        stats_path = run_dir / "stats.pt"
        with distributed.together(self.ranks):
            if main and not (run_dir / "config.json").is_file():
                write_text_atomic(run_dir / "config.json", cfg.to_json() + "\n")
            if main and not (run_dir / "classes.tsv").is_file():
                write_classes(run_dir / "classes.tsv", self.classes, self.names)
            if main and moments is None and not stats_path.is_file():
                moments = self._compute_moments()
            if main and not stats_path.is_file():
                write_atomic(stats_path, lambda f: torch.save(moments, f))
        moments = torch.load(stats_path, weights_only=True)
        self.stats = make_pixel_stats(moments["mean_image"], moments["covariance"], cfg.mean, cfg.scale, cfg.pca)

    def _compute_moments(self) -> dict:
        cfg, images = self.cfg, len(self.train_data)
        self.say(f"computing the mean image and colour covariance of {images} training images")
        loader = make_loader(self.train_data, cfg.batch_size, cfg.workers)
        mean_image, cov, count, bad = image_moments(tqdm(loader, desc="stats", leave=False, disable=not self.progress))
        self.bad_files.update(bad)
        write_bad_files(self.run_dir, self.bad_files)
        if len(self.bad_files) > 0.5 * images:
            raise UserError(
                f"{len(self.bad_files)} of {images} training images cannot be read; see"
                f" {self.run_dir / 'bad_files.txt'}"
            )
        return {"mean_image": mean_image, "covariance": cov, "images": count}

    def build_model(self) -> None:
        """The model (--init-from's weights, --freeze), the optimizer, the schedule and the training step."""
        cfg, device, ranks = self.cfg, self.device, self.ranks
        torch.manual_seed(cfg.seed)
        model = cfg.build_model(self.num_classes).to(device)
        if self.pretrained is not None:  # a resumed run loads its own weights in resume_or_start
            self.say(load_pretrained(model, self.pretrained, self.classes))
        if cfg.freeze:
            self.say(f"frozen: {', '.join(freeze_layers(model, cfg.freeze))}")
        precision = resolve_precision(cfg.precision, device)
        channels_last = resolve_channels_last(cfg.channels_last)
        self.model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.optimizer = make_optimizer(
            decay_groups(self.model, cfg.bias_decay), cfg.lr, cfg.momentum, cfg.weight_decay
        )
        self.scheduler = make_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        trained = self.model  # what forward and backward run: compiled and/or DDP-wrapped `model`
        if cfg.compile:
            trained = torch.compile(trained)
        if ranks.distributed:
            # gradients are all-reduced bucket by bucket while backward goes on (DDP overlaps the two)
            trained = DistributedDataParallel(
                trained, device_ids=[device] if device.type == "cuda" else None, bucket_cap_mb=cfg.ddp_bucket_mb
            )
        self.step_fn = TrainStep(
            trained,
            self.optimizer,
            self.stats.to(device),
            cfg.crop,
            cfg.lighting,
            precision,
            channels_last,
            world_size=ranks.world_size,
            cuda_graph=resolve_cuda_graphs(cfg.cuda_graphs, device, precision, cfg.compile, ranks.distributed),
        )
        ddp = f", DDP over {ranks.world_size} processes" if ranks.distributed else ""
        self.say(
            f"device: {device}{ddp}, precision {precision}{', channels_last' if channels_last else ''}"
            f"{', compiled' if cfg.compile else ''}{', CUDA graphs' if self.step_fn.cuda_graph else ''}"
        )

    # --- resume, and the checkpoint a run resumes from -----------------------------------------------

    def resume_or_start(self) -> None:
        cfg, run_dir = self.cfg, self.run_dir
        if self.resume and (run_dir / "last.pt").is_file():
            ckpt = load_checkpoint(run_dir / "last.pt")
            images = len(self.train_data)
            if ckpt.get("train_images", images) != images:  # the epochs' batches would differ
                raise UserError(
                    f"{cfg.data} holds {images} training images, {run_dir} was trained on"
                    f" {ckpt['train_images']}; a resumed run cannot change its data (start a new run with --init-from)"
                )
            self.state = state = self.restore(ckpt)
            torch.set_rng_state(ckpt["rng"])
            self.say(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step_in_epoch}")
            if self.main and state.epoch and not state.step_in_epoch and state.best_epoch == state.epoch:
                link_atomic(run_dir / "last.pt", run_dir / "best.pt")  # in case a crash came between the two
        elif self.resume:
            self.say(f"{run_dir} has no checkpoint yet: starting it from the beginning")
        # Rank 0 alone writes; each of its writes runs in `together`, so that a full disk stops every
        # rank with rank 0's line, where on other machines they would fail in their next collective.
        with distributed.together(self.ranks):
            if self.main:
                # drop metric lines of epochs the checkpoint does not contain (written just before a crash)
                kept = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["epoch"] <= self.state.epoch]
                write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
                # resumed with a raised --epochs or a moved --data: keep them, for a plain --resume to go on with
                stored = TrainConfig.load(run_dir / "config.json")
                if (stored.epochs, stored.data) != (cfg.epochs, cfg.data):
                    stored = dataclasses.replace(stored, epochs=cfg.epochs, data=cfg.data)
                    write_text_atomic(run_dir / "config.json", stored.to_json() + "\n")

    def restore(self, ckpt: dict) -> RunState:
        """The model, optimizer, schedule and loss scale of a checkpoint; returns its RunState."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step_fn.forget_graph()  # new momentum buffers: a captured step would read the old ones
        for group in self.optimizer.param_groups:  # a checkpoint from before fused SGD says fused=None
            group["fused"] = True
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            self.step_fn.scaler.load_state_dict(ckpt["scaler"])
        self.bad_files.update(ckpt.get("bad_files", []))
        return RunState(**ckpt["run_state"])

    def checkpoint(self) -> None:
        """Rank 0's last.pt, which every rank waits for: call it on every rank."""
        with distributed.together(self.ranks):
            if self.main:
                self.write_checkpoint()

    def write_checkpoint(self) -> None:
        save_checkpoint(
            {
                "config": self.cfg.__dict__,
                "classes": self.classes,
                "names": self.names,
                "train_images": len(self.train_data),
                "stats": self.stats.state_dict(),
                "model": self.model.state_dict(),
                "run_state": self.state.__dict__,
                "bad_files": sorted(self.bad_files),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(),  # for completeness: each step reseeds from (seed, step)
                **({"scaler": self.step_fn.scaler.state_dict()} if self.step_fn.scaler.is_enabled() else {}),
            },
            self.run_dir / "last.pt",
        )

    # --- an epoch ------------------------------------------------------------------------------------

    def train_epoch(self) -> bool:
        """The epoch's steps, from state.step_in_epoch on. False where the loss or the weights became NaN or
        infinite and --on-nan rollback applies; a signal stops the run here, after a checkpoint."""
        cfg, state = self.cfg, self.state
        epoch = state.epoch
        loader = self.train_loader(epoch, state.step_in_epoch)
        self.model.train()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=state.step_in_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        # this interval's sums, on the device: [loss, correct, images]; read once per interval
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        t_log = time.perf_counter()
        for batch in loader:
            step = epoch * self.steps_per_epoch + state.step_in_epoch
            self.bad_files.update(batch.bad)
            if len(batch.labels):
                self.train_step(batch, step, sums)
            if steps_each_iteration(self.scheduler):
                self.scheduler.step()
            state.step_in_epoch += 1
            bar.update(1)
            checkpoint_due = cfg.checkpoint_every and state.step_in_epoch % cfg.checkpoint_every == 0
            at_end = state.step_in_epoch == self.steps_per_epoch
            # One process checks for a signal every step; several agree on it once per interval.
            stopping = bool(self.stop.signum) and not self.ranks.distributed
            if state.step_in_epoch % cfg.log_every == 0 or at_end or stopping or checkpoint_due:
                finite, stopping = self.end_interval(sums, t_log, bar, step)
                if not finite:
                    bar.close()
                    return False
                t_log = time.perf_counter()
            if checkpoint_due and not at_end and not stopping:
                self.checkpoint()
            if stopping:
                bar.close()
                self.checkpoint()  # no rank exits before rank 0's checkpoint is whole
                raise self.stop.interrupted(f"at epoch {epoch + 1}, step {state.step_in_epoch}")
        bar.close()
        return True

    def train_step(self, batch: Batch, step: int, sums: torch.Tensor) -> None:
        """One SGD step on this rank's share of the batch; its loss, right answers and images added to `sums`."""
        cfg, ranks = self.cfg, self.ranks
        # dropout masks of this step (each rank its own), then the augmentation's numbers
        torch.manual_seed((step_seed(cfg.seed, step) + ranks.rank * 2**40) % 2**63)
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step))
        total = min(cfg.batch_size, len(self.train_data) - self.state.step_in_epoch * cfg.batch_size)
        first = total * ranks.rank // ranks.world_size
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        loss_sum, correct = self.step_fn(images, labels, gen, first, total if ranks.distributed else None)
        sums[0] += loss_sum  # on the device, without waiting for it
        sums[1] += correct
        sums[2] += len(labels)

    def end_interval(self, sums: torch.Tensor, started: float, bar: tqdm, step: int) -> tuple[bool, bool]:
        """The interval's sums over every rank, added to the epoch's; the progress bar and TensorBoard told.
        Returns (finite, stopping): a NaN or infinite loss or weights raise Diverged unless --on-nan rollback
        applies (finite False); stopping: a signal came to some rank."""
        cfg, state = self.cfg, self.state
        stop_flag = sums.new_tensor([float(bool(self.stop.signum))])
        # the weights' sum: a step whose loss was finite can still leave NaN or infinite weights,
        # which must not reach a checkpoint (one read of the weights per interval)
        weight_sum = torch.stack([p.detach().sum() for p in self.model.parameters()]).sum().reshape(1)
        loss_sum, correct, seen, weight_sum, stopping = distributed.sum_over_ranks(
            torch.cat([sums, weight_sum.to(sums.dtype), stop_flag]), self.ranks
        ).tolist()
        # after .tolist(), which waits for the device: on CUDA the steps so far may only be queued
        elapsed = time.perf_counter() - started
        if not math.isfinite(loss_sum + weight_sum):
            if can_roll_back(cfg, state, self.run_dir):
                return False, False
            what = "loss" if not math.isfinite(loss_sum) else "weights"
            raise Diverged(
                f"{what} became {loss_sum if what == 'loss' else 'NaN/inf'} at epoch {state.epoch + 1}, step"
                f" {state.step_in_epoch}; {diverged_hint(self.run_dir, cfg.on_nan)}"
            )
        state.loss_sum += loss_sum
        state.correct += int(correct)
        state.seen += int(seen)
        state.seconds += elapsed
        if self.tb and seen:
            self.tb.interval(step + 1, loss_sum / seen, seen / max(elapsed, 1e-9))
        steps_left = (cfg.epochs - state.epoch) * self.steps_per_epoch - state.step_in_epoch
        run_eta = steps_left * cfg.batch_size * state.seconds / max(state.seen, 1)
        bar.set_postfix(
            loss=f"{state.loss_sum / max(state.seen, 1):.3f}",
            img_s=f"{seen / max(elapsed, 1e-9):.0f}",
            run_eta=time.strftime("%H:%M:%S", time.gmtime(run_eta)),
        )
        sums.zero_()
        return True, bool(stopping)

    def validate(self) -> EvalResult | None:
        """The epoch's centre-crop validation; None where its outputs are NaN or infinite and --on-nan
        rollback applies (finite weights can still overflow: a divergence too)."""
        cfg, run_dir = self.cfg, self.run_dir
        val = evaluate(
            self.model,
            self.val_loader,
            self.stats,
            self.num_classes,
            self.device,
            cfg.crop,
            progress=self.progress,
            ranks=self.ranks,
        )
        self.bad_files.update(val.bad)
        self.bad_files = distributed.union_over_ranks(self.bad_files, self.ranks)
        if val.count == 0:  # every validation image unreadable: no error to choose best.pt or the schedule by
            with distributed.together(self.ranks):
                if self.main:
                    write_bad_files(run_dir, self.bad_files)
            raise UserError(f"no validation image in {cfg.data} can be read; see {run_dir / 'bad_files.txt'}")
        if not math.isfinite(val.loss):
            if not can_roll_back(cfg, self.state, run_dir):
                raise Diverged(
                    f"the validation loss became {val.loss} at epoch {self.state.epoch + 1} (the model's outputs"
                    f" are NaN or infinite); {diverged_hint(run_dir, cfg.on_nan)}"
                )
            return None
        return val

    def roll_back(self) -> None:
        """--on-nan rollback: back to the last checkpoint, with a tenth of the learning rate."""
        epoch = self.state.epoch
        self.state = self.restore(load_checkpoint(self.run_dir / "last.pt"))
        self.state.rollbacks += 1
        scale_learning_rate(self.optimizer, self.scheduler, 0.1)
        # kept at once: a second rollback, or a resume, goes on from the lowered rate and the count
        self.checkpoint()
        lr_now = self.optimizer.param_groups[0]["lr"]
        self.say(
            f"loss, weights or outputs became NaN/inf at epoch {epoch + 1}: rolled back to epoch"
            f" {self.state.epoch + 1}, step {self.state.step_in_epoch}, learning rate now {lr_now:.3g}"
            f" ({self.state.rollbacks}/3)"
        )

    def finish_epoch(self, val: EvalResult) -> None:
        """The epoch's line in metrics.jsonl, its checkpoint, best.pt where its error is the lowest yet; a
        signal during the evaluation or the checkpoint stops the run here, the epoch whole."""
        state, epoch = self.state, self.state.epoch
        record = self.epoch_record(val)
        self.say(
            f"epoch {epoch + 1}/{self.cfg.epochs}: train loss {record['train_loss']:.4f}, val top-1 err "
            f"{val.top1_err:.4f}, top-5 err {val.top5_err:.4f}, {record['images_per_s']:.0f} img/s, "
            f"lr {record['lr']:.2g}"
        )
        if flat := flat_loss_warning(record["train_loss"], self.num_classes, epoch + 1):
            self.say(flat)
        improved = val.top1_err < state.best_top1_err
        self.state = RunState(
            epoch=epoch + 1,
            best_top1_err=min(state.best_top1_err, val.top1_err),
            best_epoch=epoch + 1 if improved else state.best_epoch,
            rollbacks=state.rollbacks,
        )
        with distributed.together(self.ranks):
            if self.main:
                append_jsonl(self.run_dir / "metrics.jsonl", record)
                if self.tb:
                    self.tb.epoch(record, self.model)
                self.write_checkpoint()
                if improved:
                    link_atomic(self.run_dir / "last.pt", self.run_dir / "best.pt")
                write_bad_files(self.run_dir, self.bad_files)
        # a signal in the epoch's evaluation or checkpoint: stop now, the epoch whole (all ranks agree)
        if distributed.sum_over_ranks(
            torch.tensor([float(bool(self.stop.signum))], device=self.device), self.ranks
        ).item():
            raise self.stop.interrupted(f"after epoch {epoch + 1}")

    def epoch_record(self, val: EvalResult) -> dict:
        """The epoch's line of metrics.jsonl. Steps the plateau schedule, which decides on val.top1_err."""
        state, epoch, scheduler = self.state, self.state.epoch, self.scheduler
        if steps_each_iteration(scheduler):  # the rate of the epoch's last step, the one before last_epoch
            lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch - 1)
        else:  # the epoch's rate, before the plateau's decision for the next
            lr = self.optimizer.param_groups[0]["lr"]
            scheduler.step(val.top1_err)
        return {
            "epoch": epoch + 1,
            "step": (epoch + 1) * self.steps_per_epoch,
            "lr": lr,
            "train_loss": state.loss_sum / max(state.seen, 1),
            "train_top1_err": 1 - state.correct / max(state.seen, 1),
            "val_loss": val.loss,
            "val_top1_err": val.top1_err,
            "val_top5_err": val.top5_err,
            "images_per_s": state.seen / max(state.seconds, 1e-9),
            "epoch_seconds": state.seconds,
            "bad_files": len(self.bad_files),
        }

    # --- finish --------------------------------------------------------------------------------------

    def final_evaluation(self) -> None:
        """The paper's test protocol on the best weights: centre and 10-crop errors (eval.json)."""
        self.stop.where = "in the final evaluation"
        distributed.barrier(self.ranks)
        run_dir = self.run_dir
        best = load_checkpoint(run_dir / "best.pt" if (run_dir / "best.pt").is_file() else run_dir / "last.pt")
        self.model.load_state_dict(best["model"])
        results = {
            name: evaluate(
                self.model,
                self.val_loader,
                self.stats,
                self.num_classes,
                self.device,
                self.cfg.crop,
                ten,
                self.progress,
                self.ranks,
            )
            for name, ten in (("center", False), ("ten_crop", True))
        }
        with distributed.together(self.ranks):  # a full disk on rank 0 stops every rank, with its line
            if self.main:
                write_report(run_dir, results, self.classes, self.names)
        for name, r in results.items():
            self.say(f"{name}: top-1 error {r.top1_err:.4f}, top-5 error {r.top5_err:.4f} on {r.count} val images")
