"""Shared by the fault-injection tests: a tiny real training run, `alexnet` as a separate process
(so that a fault can really kill it), and a small disk."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset, scoped_folder

from alexnet.checkpoint import load_checkpoint
from alexnet.model.net import build_model
from alexnet.train.config import TrainConfig
from alexnet.train.loop import train

ROOT = Path(__file__).resolve().parents[2]
# 18 training images in batches of 4: 5 steps an epoch, a checkpoint after every step.
TINY = dict(preset="torchvision", batch_size=4, image_size=72, crop=64, workers=0, log_every=1, epochs=2)
CHECKPOINTED = dict(TINY, checkpoint_every=1)


def cli_args(data: Path, run_dir: Path, **settings) -> list[str]:
    args = ["train", "--data", str(data), "--run-dir", str(run_dir), "--no-progress"]
    for k, v in settings.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def alexnet_process(
    args: list[str], script: str = "", env_extra: dict | None = None, prefix: tuple[str, ...] = (), **popen
) -> subprocess.Popen:
    """`python -m alexnet ARGS` in a new process, after running `script` (fault-injecting patches) in it;
    `prefix`: a command that runs it (setpriv, torchrun)."""
    code = f"import sys\n{script}\nfrom alexnet.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env_extra or {})}
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def wait_for(condition, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def checkpoint_weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


@pytest.fixture(scope="package")
def fault_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("faults") / "data")


@pytest.fixture(scope="package")
def reference_run(fault_data, tmp_path_factory) -> Iterator[Path]:
    """The uninterrupted run every interrupted one must end up equal to."""
    with scoped_folder(tmp_path_factory, "reference") as root:
        yield train(TrainConfig(data=str(fault_data), run_dir=str(root / "run"), **CHECKPOINTED), progress=False)


def checkpoint_bytes() -> int:
    """About the size of a TINY run's checkpoint: weights and momentum, 4 bytes each."""
    model = build_model("torchvision", num_classes=3)
    return 2 * 4 * sum(p.numel() for p in model.parameters())


@contextmanager
def tmpfs(mount: Path, size: int) -> Iterator[Path]:
    """A file system of `size` bytes at `mount` (skips the test where mounting is not allowed)."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs with room for 1.5 checkpoints: the first fits, writing the second beside it does not."""
    with tmpfs(tmp_path / "disk", int(1.5 * checkpoint_bytes())) as mount:
        yield mount
