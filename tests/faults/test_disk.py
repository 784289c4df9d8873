"""A full disk, or a write that fails: one clear line, the previous checkpoint intact, no partial
files left behind."""

import os
import resource
import signal
from pathlib import Path

from alexnet.checkpoint import load_checkpoint
from alexnet.cli import main

from .conftest import TINY, alexnet_process, cli_args


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
