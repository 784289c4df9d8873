"""DDP under torchrun on the CPU (gloo): 2 processes compute what 1 process computes on the same global
batch, only rank 0 writes and prints, 2 machines (two torchrun agents at one rendezvous, each in a
folder of its own) train as 2 processes of one machine do, nodes that do not share the run directory or
hold other data stop at once with one line, so do both machines when rank 0's disk is full, and a
worker killed mid-run is restarted by torchrun (--max-restarts) and the run continues from its last
checkpoint to the same weights."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import scoped_folder

from alexnet.checkpoint import load_checkpoint
from alexnet.model.net import build_model
from alexnet.train.config import TrainConfig
from alexnet.train.loop import train

from .conftest import CHECKPOINTED, ROOT, TINY, assert_same_weights, checkpoint_weights, cli_args, wait_for

# No dropout: each rank draws its own dropout masks, which one process cannot reproduce.
DDP = {**CHECKPOINTED, "dropout": 0.0}

DRIVER = """
import os, sys, time
if os.environ.get("SLOW_STEPS"):
    import alexnet.train.step as s
    real = s.train_batch
    s.train_batch = lambda *a, **k: (time.sleep(float(os.environ["SLOW_STEPS"])), real(*a, **k))[1]
if os.environ.get("FULL_DISK_AT_REPORT"):  # the final report's first write fails as on a full disk
    import errno, alexnet.inspect.evaluate as e
    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    e.write_text_atomic = full
from alexnet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def torchrun(
    tmp_path,
    args: list[str],
    max_restarts: int = 0,
    slow: float = 0.0,
    launch: tuple[str, ...] = (),
    cwd=None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """One machine's torchrun agent: 2 processes (--standalone) unless `launch` says otherwise."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", *(launch or ("--standalone", "--nproc-per-node", "2"))]
    command += [f"--max-restarts={max_restarts}", str(driver), *args]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "SLOW_STEPS": str(slow),
        **(env or {}),
    }
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


def two_machines(
    tmp_path, args: list[str], data: tuple[Path | None, Path | None], env: dict[str, str] | None = None
) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of two torchrun agents, one process each, that meet at a c10d
    rendezvous as two machines do (`--nnodes 2 --rdzv-endpoint`). Each runs in a folder of its own,
    its machine, holding a copy of `data` (or none) as ./data."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d")
    launch += (f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={tmp_path.name}")
    procs = []
    for name, source in zip(("machine-a", "machine-b"), data, strict=True):
        (tmp_path / name).mkdir(exist_ok=True)
        if source is not None:
            shutil.copytree(source, tmp_path / name / "data")
        procs.append(torchrun(tmp_path, args, launch=launch, cwd=tmp_path / name, env=env))
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, *output) for p, output in zip(procs, outputs, strict=True)]


@pytest.fixture(scope="module")
def one_process_run(fault_data, tmp_path_factory):
    with scoped_folder(tmp_path_factory, "one") as root:
        yield train(TrainConfig(data=str(fault_data), run_dir=str(root / "run"), **DDP), progress=False)


@pytest.fixture(scope="module")
def two_process_run(fault_data, tmp_path_factory):
    """Two machines, one process each, a copy of the data each, and the run directory shared."""
    with scoped_folder(tmp_path_factory, "two") as tmp:
        ended = two_machines(tmp, cli_args(Path("data"), tmp / "run", **DDP), (fault_data, fault_data))
        for code, _, err in ended:
            assert code == 0, err[-3000:]
        yield tmp / "run", "".join(out for _, out, _ in ended)


def test_two_processes_equal_one_on_the_same_global_batch(one_process_run, two_process_run):
    run_dir, out = two_process_run
    one, two = checkpoint_weights(one_process_run / "last.pt"), checkpoint_weights(run_dir / "last.pt")
    assert one.keys() == two.keys()
    # The two runs sum in different orders, so they differ by rounding, and rounding now and then tips a
    # max-pool or a ReLU the other way, which changes a few weights by far more than rounding. So each
    # layer is compared by how much training moved it: measured 7e-6 of it (PYTHONHASHSEED 1-6); a
    # wrong gradient scale or share moves it by 0.5 (the one-process run at half the learning rate).
    cfg = TrainConfig(data="", run_dir="", **DDP)
    torch.manual_seed(cfg.seed)  # as train() does before it builds the model
    start = build_model(cfg.preset, 3, cfg.groups, cfg.dropout, cfg.init, cfg.lrn).state_dict()
    flat = lambda w: torch.cat([w[k].flatten() for k in one])  # noqa: E731
    assert (flat(one) - flat(start)).norm() < 0.1 * flat(start).norm()  # `start` is where both runs began
    for k in one:
        assert (two[k] - one[k]).norm() < 1e-3 * (one[k] - start[k]).norm(), k
    assert out.count("epoch 1/2: train loss") == 1  # rank 0 alone prints
    assert out.count("run directory:") == 1
    assert "DDP over 2 processes" in out
    a, b = load_checkpoint(one_process_run / "last.pt"), load_checkpoint(run_dir / "last.pt")
    assert a["run_state"] == pytest.approx(b["run_state"], rel=1e-5)  # losses and counts over all ranks
    one_eval, two_eval = (json.loads((r / "eval.json").read_text()) for r in (one_process_run, run_dir))
    assert two_eval["center"] == pytest.approx(one_eval["center"], rel=1e-5)  # evaluated in shares, summed
    assert two_eval["ten_crop"] == pytest.approx(one_eval["ten_crop"], rel=1e-5)


def test_a_killed_worker_is_restarted_and_the_run_continues(fault_data, two_process_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = torchrun(tmp_path, cli_args(fault_data, run_dir, **DDP), max_restarts=1, slow=0.3)

    def past_step_2() -> bool:
        last = run_dir / "last.pt"
        return last.is_file() and load_checkpoint(last)["run_state"]["step_in_epoch"] >= 2

    wait_for(past_step_2, proc=proc)
    rank0 = int((run_dir / "lock").read_text().split()[0])  # the lock file names the process that holds it
    os.kill(rank0, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    (tmp_path / "stderr.txt").write_text(err)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming" in out and "at epoch 1, step" in out
    assert_same_weights(checkpoint_weights(run_dir / "last.pt"), checkpoint_weights(two_process_run[0] / "last.pt"))


NOT_SHARED = "alexnet: error: rank 1 cannot see the run directory that rank 0 writes (run): give every node the same"
NOT_SHARED += " --run-dir on a shared file system"
MISSING = "alexnet: error: data folder data does not exist"
NO_WEIGHTS = "alexnet: error: weights.pt does not exist"
OTHER = "alexnet: error: rank 1 found other classes or images in data than rank 0: give every node the same data"


@pytest.mark.parametrize(
    "fault, lines",
    [
        ("run_dir_not_shared", [[NOT_SHARED, NOT_SHARED]]),
        # the machine without data is rank 0 or rank 1, as the rendezvous decides; the other names it
        (
            "data_missing_on_one_machine",
            [sorted([MISSING, MISSING.replace("error: ", f"error: rank {r} stopped: ")]) for r in (0, 1)],
        ),
        ("other_data_on_one_machine", [[OTHER, OTHER]]),
        (
            "init_from_missing_on_one_machine",
            [sorted([NO_WEIGHTS, NO_WEIGHTS.replace("error: ", f"error: rank {r} stopped: ")]) for r in (0, 1)],
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_machines_that_do_not_share_what_they_must_all_stop_with_one_line(fault_data, tmp_path, fault, lines):
    run_dir = Path("run") if fault == "run_dir_not_shared" else tmp_path / "run"  # relative: one each
    data = (fault_data, None if fault == "data_missing_on_one_machine" else fault_data)
    if fault == "other_data_on_one_machine":
        shutil.copytree(fault_data, tmp_path / "fewer")
        next((tmp_path / "fewer" / "train").glob("*/*")).unlink()
        data = (fault_data, tmp_path / "fewer")
    settings = dict(DDP)
    if fault == "init_from_missing_on_one_machine":  # a weights file on machine-a only
        (tmp_path / "machine-a").mkdir()
        torch.save(build_model("torchvision", num_classes=3).state_dict(), tmp_path / "machine-a" / "weights.pt")
        settings["init_from"] = "weights.pt"
    ended = two_machines(tmp_path, cli_args(Path("data"), run_dir, **settings), data)
    for code, _, err in ended:
        assert code != 0 and "[rank" not in err, err[-3000:]  # torchrun marks a worker's traceback [rankN]
    said = [line for _, _, err in ended for line in err.splitlines() if line.startswith("alexnet")]
    for machine in ("machine-a", "machine-b"):  # paths are made absolute: each machine's folder, left out here
        said = [line.replace(f"{tmp_path / machine}/", "") for line in said]
    assert sorted(said) in lines
    assert not list(tmp_path.rglob("run")), "a run directory was left behind"


@pytest.mark.parametrize("when", ["mid_epoch", "epoch_end"])
def test_a_full_disk_on_rank_0_stops_both_machines_with_its_line(fault_data, small_disk, tmp_path, when):
    """Room for one checkpoint: the second (step 2, or epoch 2's) does not fit."""
    run_dir = small_disk / "run"
    settings = {**(CHECKPOINTED if when == "mid_epoch" else TINY), "dropout": 0.0}
    ended = two_machines(tmp_path, cli_args(Path("data"), run_dir, **settings), (fault_data, fault_data))
    for code, _, err in ended:
        assert code != 0 and "[rank" not in err, err[-3000:]  # no traceback from the rank that did not write
    full = f"No space left on device; the previous last.pt is unchanged: {run_dir / 'last.pt'}"
    said = sorted(line for _, _, err in ended for line in err.splitlines() if line.startswith("alexnet"))
    assert said == [f"alexnet: error: {full}", f"alexnet: error: rank 0 stopped: {full}"]
    state = load_checkpoint(run_dir / "last.pt")["run_state"]
    assert (state["epoch"], state["step_in_epoch"]) == ((0, 1) if when == "mid_epoch" else (1, 0))


def test_a_full_disk_at_the_final_report_stops_both_machines_with_its_line(fault_data, tmp_path):
    run_dir = tmp_path / "run"
    settings = {**TINY, "epochs": 1, "dropout": 0.0}
    env = {"FULL_DISK_AT_REPORT": "1"}
    ended = two_machines(tmp_path, cli_args(Path("data"), run_dir, **settings), (fault_data, fault_data), env)
    for code, _, err in ended:
        assert code != 0 and "[rank" not in err, err[-3000:]  # the rank that does not write stops too
    said = sorted(line for _, _, err in ended for line in err.splitlines() if line.startswith("alexnet"))
    assert len(said) == 2 and "No space left on device" in said[0], said
    assert said[1] == said[0].replace("alexnet: error: ", "alexnet: error: rank 0 stopped: "), said
    assert (run_dir / "last.pt").is_file() and not (run_dir / "eval.json").exists()
