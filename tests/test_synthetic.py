"""The synthetic demo dataset: layout, determinism, safe reuse, and that it is learnable at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet.data import synthetic
from alexnet.data.synthetic import CLASSES, make_demo_dataset
from alexnet.errors import UserError

SMALL = {"train_per_class": 4, "val_per_class": 2, "size": 48}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("small") / "demo", **SMALL)


def test_classes_constant() -> None:
    assert len(CLASSES) == 6
    assert [wnid for wnid, _ in CLASSES] == sorted(wnid for wnid, _ in CLASSES)
    assert len({name for _, name in CLASSES}) == 6


def test_layout_and_counts(small: Path) -> None:
    wnids = [wnid for wnid, _ in CLASSES]
    assert sorted(p.name for p in small.iterdir()) == [".complete", "classes.tsv", "train", "val"]
    for split, count in (("train", 4), ("val", 2)):
        assert sorted(p.name for p in (small / split).iterdir()) == wnids
        for wnid in wnids:
            names = sorted(p.name for p in (small / split / wnid).iterdir())
            assert len(names) == count
            assert all(n.startswith(wnid + "_") and n.endswith(".JPEG") for n in names)
    assert [p.name for p in small.parent.iterdir()] == ["demo"]  # no temporary directory left behind


def test_classes_tsv(small: Path) -> None:
    lines = (small / "classes.tsv").read_text().splitlines()
    assert lines[0] == "index\twnid\tname"
    assert lines[1:] == [f"{i}\t{wnid}\t{name}" for i, (wnid, name) in enumerate(CLASSES)]


def test_images_are_rgb_jpegs_of_the_requested_size(small: Path) -> None:
    paths = sorted(small.glob("*/*/*.JPEG"))
    assert len(paths) == 6 * (4 + 2)
    for path in paths:
        with Image.open(path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 48))


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path, small: Path) -> None:
    again = _files(make_demo_dataset(tmp_path / "again", **SMALL))
    assert again == _files(small)
    other = _files(make_demo_dataset(tmp_path / "other", **SMALL, seed=1))
    assert other.keys() == again.keys()
    images = [name for name in again if name.endswith(".JPEG")]
    assert all(other[name] != again[name] for name in images)


def test_complete_directory_is_reused_without_rewriting(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _files(small)

    def fail(*args: object) -> None:
        raise AssertionError("regenerated an existing complete dataset")

    monkeypatch.setattr(synthetic, "_image", fail)
    assert make_demo_dataset(str(small), **SMALL) == small
    assert _files(small) == before


def test_existing_empty_directory_is_filled(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    root = make_demo_dataset(tmp_path / "demo", train_per_class=1, val_per_class=1, size=32)
    assert (root / ".complete").is_file()
    assert len(list(root.glob("*/*/*.JPEG"))) == 12


def test_foreign_or_different_directory_is_refused(tmp_path: Path, small: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a complete demo dataset"):
        make_demo_dataset(foreign, **SMALL)
    assert [p.name for p in foreign.iterdir()] == ["mine.txt"]

    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError):
        make_demo_dataset(tmp_path / "a_file", **SMALL)

    with pytest.raises(UserError, match="other arguments"):
        make_demo_dataset(small, **SMALL, seed=7)


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_image = synthetic._image

    def flaky(*args: object) -> Image.Image:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_image(*args)

    monkeypatch.setattr(synthetic, "_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path / "demo", **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [{"train_per_class": 0}, {"val_per_class": 0}, {"size": 8}, {"seed": -1}])
def test_bad_arguments(tmp_path: Path, bad: dict[str, int]) -> None:
    with pytest.raises(UserError):
        make_demo_dataset(tmp_path / "demo", **bad)


def test_learnable_without_a_network(tmp_path: Path) -> None:
    """Nearest class mean on translation-invariant features (log |FFT| of 32x32 grey) beats chance."""
    root = make_demo_dataset(tmp_path / "demo", train_per_class=20, val_per_class=10, size=64, seed=3)

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows, labels = [], []
        for label, (wnid, _) in enumerate(CLASSES):
            for path in sorted((root / split / wnid).glob("*.JPEG")):
                grey = np.asarray(Image.open(path).convert("L").resize((32, 32)), dtype=np.float32)
                grey = (grey - grey.mean()) / (grey.std() + 1e-6)
                rows.append(np.log1p(np.abs(np.fft.fft2(grey))).ravel())
                labels.append(label)
        return np.stack(rows), np.array(labels)

    train_x, train_y = features("train")
    val_x, val_y = features("val")
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    centroids = np.stack([train_x[train_y == c].mean(0) for c in range(len(CLASSES))])
    predicted = ((val_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = float((predicted == val_y).mean())
    assert accuracy > 0.5, f"accuracy {accuracy:.2f}, chance is {1 / len(CLASSES):.2f}"
