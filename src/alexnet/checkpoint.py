"""Checkpoints and run directories: written atomically, read back with a clear message on failure.

A run directory holds:
  config.json       the resolved TrainConfig
  classes.tsv       index, wnid, name of every class
  stats.pt          mean image / colour and PCA lighting axes of the training set
  metrics.jsonl     one line per epoch
  last.pt, best.pt  checkpoints (best = lowest validation top-1 error)
  bad_files.txt     images that could not be decoded, with the reason
  eval.json, per_class.csv, confusion.csv   the final evaluation
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

FORMAT = "alexnet-checkpoint-1"
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Any) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.

    Readers see the old file or the new one, never a mix; a failure (a full disk) leaves the old one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    write_atomic(path, lambda f: f.write(text.encode()))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint file, or a run directory (its best.pt, else last.pt)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "best.pt", path / "last.pt"]
        path = next((p for p in candidates if p.is_file()), candidates[0])
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say so in one line
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
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
