"""A full disk, or a write that fails: one clear line, the previous checkpoint (report, features,
figure) intact, no partial files left behind."""

import errno
import os
import re
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_same_files

from alexnet.checkpoint import load_checkpoint
from alexnet.cli import main
from alexnet.data.prepare import prepare_dataset
from alexnet.errors import UserError
from alexnet.inspect.evaluate import EvalResult, write_report
from alexnet.inspect.features import write_features
from alexnet.inspect.figures import curves_figure

from .conftest import TINY, alexnet_process, cli_args, tmpfs


def test_full_disk_keeps_the_previous_checkpoint(fault_data, small_disk, capsys):
    run_dir = small_disk / "run"
    code = main(cli_args(fault_data, run_dir, **TINY))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert (
        err[-1] == f"alexnet: error: No space left on device; the previous last.pt is unchanged: {run_dir / 'last.pt'}"
    )
    assert load_checkpoint(run_dir / "last.pt")["run_state"]["epoch"] == 1  # epoch 2's did not fit
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_in_prepare_is_one_line_and_it_resumes_once_there_is_room(fault_data, tmp_path):
    reference = tmp_path / "reference"
    prepare_dataset(fault_data, reference, workers=0, progress=False)
    with tmpfs(tmp_path / "disk", 2 * 2**20) as disk:  # room for 10 of the 18 training images (192 KiB each)
        out = disk / "prepared"
        with pytest.raises(UserError, match=f"^No space left on device, writing {out}; make room and run the same"):
            prepare_dataset(fault_data, out, workers=0, progress=False, chunk_size=2)
        done = torch.load(out / ".progress" / "train.pt", weights_only=True)["done"]
        assert 0 < done < 18 and not list(out.rglob("*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # room made
        prepare_dataset(fault_data, out, workers=2, progress=False, chunk_size=3)
        assert_same_files(out, reference)


def test_a_failing_write_is_one_line_and_leaves_nothing(fault_data, tmp_path):
    """Files may not grow beyond 20 MB (RLIMIT_FSIZE): the first checkpoint cannot be written."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))

    run_dir = tmp_path / "run"
    proc = alexnet_process(cli_args(fault_data, run_dir, **TINY), preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"alexnet: error: File too large; last.pt was not written: {run_dir / 'last.pt'}"
    )
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "bad_files.txt",
        "classes.tsv",
        "config.json",
        "lock",
        "metrics.jsonl",
        "stats.pt",
    ]
    assert os.path.getsize(run_dir / "stats.pt") > 0 and Path(run_dir / "metrics.jsonl").read_text().count("\n") == 1


def test_reports_features_and_figures_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """eval.json and its CSVs, feature files and figures are written beside and renamed, as checkpoints
    are: a write that fails (here fsync, as on a full disk) leaves the previous file, and no temporary."""

    def report(value: int) -> None:  # eval.json, per_class.csv, confusion.csv
        result = EvalResult(0.5 * value, 0.25, 0.0, 4, torch.tensor([[value, 1], [0, 2]]))
        write_report(tmp_path, {"center": result}, ["n01", "n02"], ["cat", "dog"])

    def features(name: str):
        return lambda value: write_features(
            tmp_path / name, {"fc7": torch.full((2, 3), float(value))}, ["a.jpg", "b.jpg"], [0, 1], ["n01", "n02"]
        )

    def curves(value: int) -> None:
        errors = {"train_top1_err": 0.9, "val_top1_err": 0.8, "val_top5_err": 0.5}
        metrics = {"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, **errors, "lr": 0.01 * value}
        curves_figure([metrics], tmp_path / "curves.png")

    # by the file each writes first
    writers = {"eval.json": report, "f.npz": features("f.npz"), "f.npy": features("f.npy"), "curves.png": curves}
    for write in writers.values():
        write(1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["confusion.csv", "curves.png", "eval.json", "f.npy", "f.npz", "per_class.csv"]

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    for name, write in writers.items():
        with pytest.raises(OSError, match=f"No space left on device; the previous {re.escape(name)} is unchanged"):
            write(2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    for write in writers.values():
        write(2)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after.keys() == before.keys() and all(after[name] != before[name] for name in before)
