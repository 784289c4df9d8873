import os
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
IMAGENETTE_CI = SHARED_DATA / "imagenette-ci"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n`), the cores shared among the workers: each taking all of them, as
    PyTorch's threads do by default, the workers (and the processes their tests start) only contend."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # the `alexnet` processes tests start too


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `long` (minutes) first: pytest-xdist hands tests out in this order, and a long one
    started last keeps the whole suite waiting for its worker."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync only guards against a power cut, which no test makes, and costs ~0.5 s a checkpoint.
    Kills and signals are tested with it gone (the page cache survives them); a failing fsync, in
    tests/faults/test_disk.py, patches it back in. Subprocesses keep it."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@contextmanager
def scoped_folder(factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder for a module- or package-scoped fixture, removed when its scope ends. A run directory
    holds checkpoints of about 450 MB; kept to the end of the session, they would fill a small CI disk."""
    folder = factory.mktemp(name)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def imagenette_ci() -> Path:
    if not IMAGENETTE_CI.is_dir():
        pytest.skip(f"{IMAGENETTE_CI} not found")
    return IMAGENETTE_CI


def write_image(path: Path, size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))  # the same pixels in every session
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def assert_same_files(a: Path, b: Path) -> None:
    """Folders a and b hold the same files, byte for byte (a prepared dataset resumed, and one not)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def slow_loading(seconds: float) -> str:
    """Python that makes every image take `seconds` to load, in the data-loader workers too, touching the
    file $MARK (where set) as each starts: run before a command, so that a signal or a kill lands mid-run."""
    return (
        "import os, pathlib, time\n"
        "import alexnet.data.folders as d\n"
        "load = d.load_image\n"
        "def slow_load(*a, **k):\n"
        "    if os.environ.get('MARK'):\n"
        "        pathlib.Path(os.environ['MARK']).touch()\n"
        f"    time.sleep({seconds})\n"
        "    return load(*a, **k)\n"
        "d.load_image = slow_load\n"
    )


def child_processes(pid: int) -> set[int]:
    """The processes `pid` started that are still there (Linux's /proc)."""
    return {int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()}


def running(pid: int) -> bool:
    """Neither gone nor a zombie (dead, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def make_tiny_dataset(root: Path) -> Path:
    """3 classes x (6 train + 2 val) small coloured JPEGs: a dataset that trains in seconds."""
    colours = {"n001_red": (220, 40, 40), "n002_green": (40, 200, 40), "n003_blue": (40, 40, 220)}
    for wnid, colour in colours.items():
        for split, n in (("train", 6), ("val", 2)):
            for i in range(n):
                write_image(root / split / wnid / f"{wnid}_{i}.JPEG", colour=colour)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """3 classes x (6 train + 2 val) small coloured JPEGs: a dataset that trains in seconds."""
    return make_tiny_dataset(tmp_path / "tiny")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many small tensor ops, where threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
