"""kill -9 at any moment, in the middle of writing a checkpoint included, loses at most the steps since
the last checkpoint: the run directory always holds a loadable last.pt, and resuming ends with exactly
the weights of an uninterrupted run. A data-loader worker killed (the OOM killer) stops the run in one
line, with the same guarantees."""

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
from conftest import child_processes, slow_loading

from alexnet.checkpoint import load_checkpoint
from alexnet.cli import main

from .conftest import (
    CHECKPOINTED,
    alexnet_process,
    assert_same_weights,
    checkpoint_weights,
    cli_args,
    kill9,
    wait_for,
)


def run_state(run_dir):
    return load_checkpoint(run_dir / "last.pt")["run_state"]


def test_kill_9_at_random_moments_then_resume(fault_data, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    rng = random.Random(7)
    args = cli_args(fault_data, run_dir, **CHECKPOINTED)
    kills = 0
    for _ in range(4):
        resume = ["--resume", str(run_dir)] if (run_dir / "config.json").is_file() else []
        proc = alexnet_process(args + resume)
        wait_for(lambda: (run_dir / "lock").is_file(), proc=proc)  # started: the import is over
        time.sleep(rng.uniform(0.2, 3.0))  # then anywhere: stats, a step, a checkpoint, the evaluation
        if proc.poll() is not None:
            break
        kill9(proc)
        kills += 1
        if (run_dir / "last.pt").exists():
            state = run_state(run_dir)  # loadable, whatever the moment of the kill
            assert 0 <= state["epoch"] <= 2
    assert kills >= 2
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert run_state(run_dir)["epoch"] == 2
    assert_same_weights(checkpoint_weights(run_dir / "last.pt"), checkpoint_weights(reference_run / "last.pt"))
    assert not list(run_dir.glob(".*.tmp"))


# Kill the process from inside torch.save, after half of the 4th checkpoint's bytes are on disk.
HALF_WRITE_THEN_KILL = """
import os, signal, torch
import alexnet.checkpoint as c
real_save, calls = torch.save, []
def save(obj, f):
    calls.append(1)
    if len(calls) == 4:
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f)
c.torch.save = save
"""


def test_kill_9_in_the_middle_of_writing_a_checkpoint(fault_data, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = alexnet_process(cli_args(fault_data, run_dir, **CHECKPOINTED), HALF_WRITE_THEN_KILL)
    proc.communicate(timeout=300)
    assert proc.returncode == -9
    # torch.save calls: stats.pt, then last.pt after steps 1, 2 and (killed) 3
    half_written = list(run_dir.glob(".last.pt.*.tmp"))
    assert len(half_written) == 1
    assert run_state(run_dir)["step_in_epoch"] == 2  # the previous checkpoint, whole

    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert not list(run_dir.glob(".*.tmp"))  # the half-written temporary was cleared
    assert_same_weights(checkpoint_weights(run_dir / "last.pt"), checkpoint_weights(reference_run / "last.pt"))
    assert_same_weights(checkpoint_weights(run_dir / "best.pt"), checkpoint_weights(reference_run / "best.pt"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists worker processes from Linux's /proc")
def test_a_killed_data_loader_worker_stops_the_run_in_one_line_and_it_resumes(fault_data, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = alexnet_process(cli_args(fault_data, run_dir, **{**CHECKPOINTED, "workers": 1}), slow_loading(0.2))
    wait_for(lambda: (run_dir / "last.pt").is_file(), proc=proc)  # step 1 done: the epoch's worker loads on
    os.kill(min(child_processes(proc.pid)), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err
    said = re.escape(f" (out of memory?); resume with: alexnet train --resume {run_dir}")
    assert re.fullmatch(rf"alexnet: error: DataLoader worker \(pid.*{said}", err.strip().splitlines()[-1]), err
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert_same_weights(checkpoint_weights(run_dir / "last.pt"), checkpoint_weights(reference_run / "last.pt"))
