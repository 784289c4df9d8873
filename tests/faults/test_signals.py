"""SIGTERM (preemption) and SIGINT (Ctrl-C): the current step finishes, a checkpoint is written, the
resume command is printed and the exit is non-zero; a second signal ends the process at once without
damaging what is on disk. Outside the steps (listing the data, the statistics, the final evaluation)
a signal stops at once, in one line. (tests/test_cli.py sends SIGTERM to a whole process group, data workers
included; tests/test_train.py checks the weights after a SIGTERM and resume.)"""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
import torch.utils.data._utils.worker as loader_worker
from conftest import child_processes

from alexnet.checkpoint import load_checkpoint
from alexnet.cli import main
from alexnet.data.folders import ImageDataset, make_loader, open_split
from alexnet.stopping import Terminated, held, sigterm_unwinds

from .conftest import CHECKPOINTED, TINY, alexnet_process, assert_same_weights, checkpoint_weights, cli_args, wait_for

# Slow the steps down (so that a signal lands mid-epoch) and, with MARK set, announce each checkpoint
# write in a file and take a second over it (so that a second signal lands inside it).
SLOW = """
import os, time, pathlib, torch
import alexnet.train.step as s, alexnet.checkpoint as c
real_batch, real_save = s.train_batch, torch.save
def slow_batch(*a, **k):
    if os.environ.get("STEP_MARK"):
        pathlib.Path(os.environ["STEP_MARK"]).touch()
    time.sleep(0.3)
    return real_batch(*a, **k)
def slow_save(obj, f):
    if os.environ.get("MARK") and "run_state" in obj:
        pathlib.Path(os.environ["MARK"]).write_text("writing")
        time.sleep(1.0)
    real_save(obj, f)
s.train_batch, c.torch.save = slow_batch, slow_save
"""


@pytest.mark.parametrize("signum", [signal.SIGINT])  # SIGTERM: tests/test_train.py, tests/test_cli.py
def test_signal_finishes_the_step_checkpoints_and_resumes(signum, fault_data, reference_run, tmp_path):
    run_dir, step_mark = tmp_path / "run", tmp_path / "step"
    settings = {**CHECKPOINTED, "checkpoint_every": 0}
    proc = alexnet_process(cli_args(fault_data, run_dir, **settings), SLOW, env_extra={"STEP_MARK": str(step_mark)})
    wait_for(step_mark.exists, proc=proc)  # inside the first step
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"resume with: alexnet train --resume {run_dir}")
    state = load_checkpoint(run_dir / "last.pt")["run_state"]
    assert (
        f"stopped by {signal.Signals(signum).name} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}" in err
    )
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert_same_weights(checkpoint_weights(run_dir / "last.pt"), checkpoint_weights(reference_run / "last.pt"))


def test_second_signal_exits_at_once_and_damages_nothing(fault_data, reference_run, tmp_path):
    run_dir, mark = tmp_path / "run", tmp_path / "mark"
    proc = alexnet_process(cli_args(fault_data, run_dir, **CHECKPOINTED), SLOW, env_extra={"MARK": str(mark)})
    wait_for(mark.exists, proc=proc)  # the checkpoint after step 1 is being written
    mark.unlink()
    proc.send_signal(signal.SIGTERM)  # first signal: step 2 finishes, then the stop checkpoint begins
    wait_for(mark.exists, proc=proc)
    proc.send_signal(signal.SIGTERM)  # second signal, inside that checkpoint write: out at once
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err
    assert load_checkpoint(run_dir / "last.pt")["run_state"]["step_in_epoch"] == 1  # the previous one, whole
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert_same_weights(checkpoint_weights(run_dir / "last.pt"), checkpoint_weights(reference_run / "last.pt"))


# Listing a large image folder, its statistics and the evaluations take minutes; here the phase named
# PHASE announces itself in MARK and waits WAIT seconds, so that a signal lands inside it.
SLOW_PHASE = """
import os, time, pathlib
import alexnet.train.loop as t
real_open_split, real_moments, real_evaluate = t.open_split, t.image_moments, t.evaluate
def announce_and_wait(phase):
    if os.environ["PHASE"] == phase:
        pathlib.Path(os.environ["MARK"]).touch()
        time.sleep(float(os.environ["WAIT"]))
def slow_open_split(*a, **k):
    announce_and_wait("listing")
    return real_open_split(*a, **k)
def slow_moments(batches):
    def announced():
        for batch in batches:
            announce_and_wait("statistics")
            yield batch
    return real_moments(announced())
def slow_evaluate(*a, **k):
    ten_crop = k.get("ten_crop", a[6] if len(a) > 6 else False)
    announce_and_wait("final evaluation" if ten_crop else "epoch's evaluation")
    return real_evaluate(*a, **k)
t.open_split, t.image_moments, t.evaluate = slow_open_split, slow_moments, slow_evaluate
"""


@pytest.mark.parametrize(
    ("phase", "said"),
    [
        ("listing", "before the first step; nothing was written"),
        ("statistics", "before the first step; resume with: alexnet train --resume {run}"),
        ("final evaluation", "in the final evaluation; resume with: alexnet train --resume {run}"),
        # in the epoch loop: the epoch ends (its checkpoint written), then the run stops
        ("epoch's evaluation", "after epoch 1; resume with: alexnet train --resume {run}"),
    ],
)
def test_a_signal_outside_the_steps_stops_in_one_line_and_the_run_resumes(phase, said, fault_data, tmp_path):
    run_dir, mark = tmp_path / "run", tmp_path / "mark"
    settings = {**TINY, "workers": 1}  # 2 epochs; a data-loading process too, as in real runs
    env = {"PHASE": phase, "MARK": str(mark), "WAIT": "2" if phase == "epoch's evaluation" else "60"}
    proc = alexnet_process(cli_args(fault_data, run_dir, **settings), SLOW_PHASE, env_extra=env)
    wait_for(mark.exists, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=50)  # under the 60 s the others wait: they stop at once
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"alexnet: stopped by SIGTERM {said.format(run=run_dir)}"
    if phase == "listing":
        assert not run_dir.exists()  # made, then removed with nothing in it
    else:
        if phase == "epoch's evaluation":  # epoch 1's: no step of epoch 2 was taken
            state = load_checkpoint(run_dir / "last.pt")["run_state"]
            assert (state["epoch"], state["step_in_epoch"]) == (1, 0)
        assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
        assert (run_dir / "eval.json").is_file()


def test_held_signals_act_once_as_the_hold_ends():
    reached, before = [], signal.getsignal(signal.SIGTERM)
    with sigterm_unwinds(), pytest.raises(Terminated):
        with held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # unheld, Terminated is raised here
            reached.append("the end of the hold")
    assert reached == ["the end of the hold"]
    assert signal.getsignal(signal.SIGTERM) == before
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the mask, unchanged


def with_a_signal(fn: Callable, signum: int, before: bool) -> Callable:
    """`fn`, sending this process `signum` `before` it runs or after: in a data-loader worker, a signal
    to the process group in the instant before it has set its own handlers, which a test cannot time
    from outside."""

    def patched(*args, **kwargs):
        if before:
            os.kill(os.getpid(), signum)
        out = fn(*args, **kwargs)
        if not before:
            os.kill(os.getpid(), signum)
        return out

    return patched


@pytest.mark.parametrize("moment", ["at its start", "after PyTorch's handlers"])
@pytest.mark.parametrize(
    "signum, around",
    [
        (signal.SIGINT, contextlib.nullcontext),  # the main process's handler raises KeyboardInterrupt
        (signal.SIGTERM, sigterm_unwinds),  # ... raises Terminated (every command but train and prepare)
        (signal.SIGTERM, contextlib.nullcontext),  # the default action kills
    ],
    ids=["SIGINT", "SIGTERM unwinds", "SIGTERM default"],
)
def test_a_signal_in_a_loader_workers_first_instant_is_ignored(signum, around, moment, tiny_dataset, monkeypatch):
    if moment == "at its start":  # it has the main process's handlers
        monkeypatch.setattr(loader_worker, "_worker_loop", with_a_signal(loader_worker._worker_loop, signum, True))
    else:  # PyTorch's SIGTERM handler: exit if the main process sent it, else die of it
        module, name = loader_worker.signal_handling, "_set_worker_signal_handlers"
        monkeypatch.setattr(module, name, with_a_signal(getattr(module, name), signum, False))
    samples = open_split(tiny_dataset, "train").samples
    with around():
        batches = list(make_loader(ImageDataset(samples), batch_size=4, workers=2))
    assert sum(len(batch.labels) for batch in batches) == len(samples)


# The main process signalled once: as its data-loader workers start (the first has), or as the
# loader's shutdown tells them to end (before it tells the first).
SIGNAL_THE_MAIN_PROCESS = """
import os, multiprocessing.process as mp, torch.utils.data.dataloader as dl

def signal_once(when):
    if os.environ.get("WHEN") == when:
        del os.environ["WHEN"]
        os.kill(os.getpid(), int(os.environ.pop("SIGNUM")))

start = mp.BaseProcess.start
def start_then_signal(self):
    start(self)
    signal_once("starting")
mp.BaseProcess.start = start_then_signal

mark = dl._MultiProcessingDataLoaderIter._mark_worker_as_unavailable
def signal_then_mark(self, worker_id, shutdown=False):
    if shutdown:
        signal_once("ending")
    mark(self, worker_id, shutdown)
dl._MultiProcessingDataLoaderIter._mark_worker_as_unavailable = signal_then_mark
"""


@pytest.mark.parametrize("when", ["starting", "ending"])
@pytest.mark.parametrize(
    "signum, said", [(signal.SIGTERM, "alexnet: stopped by SIGTERM"), (signal.SIGINT, "alexnet: interrupted")]
)
def test_a_signal_as_the_loader_workers_start_or_end_stops_in_one_line(when, signum, said, fault_data, reference_run):
    """Acted on halfway, it left workers that ignore SIGTERM and were never told to end; Python's exit
    then waited for them forever."""
    args = ["evaluate", "--checkpoint", str(reference_run), "--data", str(fault_data), "--workers", "2"]
    env = {"SIGNUM": str(int(signum)), "WHEN": when}
    proc = alexnet_process([*args, "--no-progress"], SIGNAL_THE_MAIN_PROCESS, env)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in child_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        raise AssertionError(f"hung: {proc.communicate()[1][-2000:]}") from None
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines() == [said], err
