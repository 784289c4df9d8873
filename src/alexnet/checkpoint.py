"""Checkpoints and run directories: written atomically, read back with a clear message on failure.

A run directory holds:
  config.json       the resolved TrainConfig
  classes.tsv       index, wnid, name of every class
  stats.pt          mean image / colour and PCA lighting axes of the training set
  metrics.jsonl     one line per epoch
  last.pt, best.pt  checkpoints (best = lowest validation top-1 error)
  bad_files.txt     images that could not be decoded, with the reason
  eval.json, per_class.csv, confusion.csv   the final evaluation
  lock              held (flock) by the training that is writing the directory
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

FORMAT = "alexnet-checkpoint-1"
TMP_SUFFIX = ".tmp"  # of files being written; never a finished file
_UMASK = os.umask(0)
os.umask(_UMASK)
NEW_FILE_MODE = 0o666 & ~_UMASK  # the mode open() gives a new file


def check_out(out: Path) -> None:
    """Refuse an --out that cannot be written, before any work: a folder, or a path through a file."""
    if out.is_dir():
        raise UserError(f"{out} is a directory; --out names the file to write")
    folder = next(p for p in out.parents if p.exists())  # the folders below it are made
    if not folder.is_dir():
        raise UserError(f"cannot write {out}: {folder} is not a directory")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Any) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    Readers see the old file or the new one, never a mix; a failure (a full disk) leaves the old one
    and no temporary file. A kill -9 mid-write can leave a temporary: remove_temporaries clears it.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise failed_write(e, path) from e
    try:
        os.fchmod(fd, NEW_FILE_MODE)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = os_error_of(e)
        if cause is not None:
            raise failed_write(cause, path) from e
        raise


def os_error_of(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`: torch.save reports a failed write (ENOSPC) as a RuntimeError of its own."""
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def failed_write(e: OSError, path: Path) -> OSError:
    """The error of a failed write, naming the file meant (not its temporary) and what was kept."""
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"{path.name} was not written"
    return OSError(e.errno, f"{e.strerror}; {kept}", str(path))


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries that a process killed in write_atomic or link_atomic left in `folder`."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class RunLock:
    """An exclusive flock on RUN_DIR/lock for as long as a training writes the directory.

    The kernel drops it when the process ends in any way (kill -9 included), so a lock is never stale.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "lock"
        self.fd = -1

    def __enter__(self) -> RunLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise UserError(
                f"{self.path.parent} is in use by another training (pid {holder}); wait for it or pick another"
                " --run-dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        os.fsync(self.fd)  # DDP's other ranks read it, maybe on other machines, to tell they share the directory
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the flock; the file stays, harmless and reused


def link_atomic(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src` (a hard link: no copy), replacing `dst` atomically.

    `src` is only ever replaced by rename, never rewritten in place, so `dst` keeps its content.
    """
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a filesystem without hard links: copy instead
        write_atomic(dst, lambda f: f.write(Path(src).read_bytes()))
        return
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    write_atomic(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def write_text_atomic(path: Path, text: str) -> None:
    # surrogateescape: file names that are not UTF-8 are written back as the bytes they were
    write_atomic(path, lambda f: f.write(text.encode(errors="surrogateescape")))


_EXPORTS = {".onnx": "an ONNX", ".pt2": "a .pt2", ".torchscript": "a TorchScript"}  # alexnet export's


def checkpoint_file(path: str | Path) -> Path:
    """The file `load_checkpoint(path)` reads: `path`, or a run directory's best.pt, else its last.pt."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "best.pt", path / "last.pt"]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or a run directory (its best.pt, else last.pt)."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notice that it will not read a TorchScript file
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say so in one line
        kind = "a TorchScript" if "TorchScript" in str(e) else _EXPORTS.get(path.suffix)
        if kind:
            raise UserError(
                f"{path} is {kind} export, not a checkpoint: give a checkpoint, run directory or .safetensors export"
            ) from e
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an alexnet checkpoint")
    return state


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a last line cut short by a crash mid-append is dropped."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UserError(f"{path} is damaged at line {i + 1}") from None
    return records
