"""Mistakes in commands get one line and a non-zero exit, and overwrite nothing: above all, a second
training started on a run directory that a first one is writing (the lock). Unknown presets and
options and invalid numbers: tests/test_cli.py."""

import socket
import subprocess
import sys

from .conftest import CHECKPOINTED, alexnet_process, assert_same_weights, checkpoint_weights, cli_args, wait_for

SLOW_STEPS = """
import time
import alexnet.train.step as s
real = s.train_batch
s.train_batch = lambda *a, **k: (time.sleep(0.5), real(*a, **k))[1]
"""


def one_line_error(args: list[str]) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "alexnet", *args], capture_output=True, text=True)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alexnet: error: "), result.stderr
    return result.returncode, lines[0]


def test_a_second_training_in_the_same_run_directory_is_refused(fault_data, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    args = cli_args(fault_data, run_dir, **CHECKPOINTED)
    first = alexnet_process(args, SLOW_STEPS)
    wait_for(lambda: (run_dir / "last.pt").is_file(), proc=first)  # well into its training

    code, line = one_line_error(args)  # the same command again
    assert code == 2 and "already exists; resume it with --resume" in line
    code, line = one_line_error(["train", "--resume", str(run_dir), "--no-progress"])
    assert code == 2 and line == (
        f"alexnet: error: {run_dir} is in use by another training (pid {first.pid} on {socket.gethostname()});"
        " wait for it or pick another"
        " --run-dir"
    )
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err  # the first one went on undisturbed
    assert_same_weights(checkpoint_weights(run_dir / "last.pt"), checkpoint_weights(reference_run / "last.pt"))


def test_a_run_directory_of_another_config(fault_data, reference_run, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in reference_run.iterdir()}
    other = cli_args(fault_data, reference_run, **{**CHECKPOINTED, "lr": 0.5})
    code, line = one_line_error(other)
    assert code == 2 and "already exists" in line
    code, line = one_line_error([*other[:1], "--resume", str(reference_run), "--lr", "0.5"])
    assert code == 2 and "was made with lr=0.01; a resumed run cannot change it" in line
    assert {p.name: p.stat().st_mtime_ns for p in reference_run.iterdir()} == before
