import json

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.cli import main
from alexnet.inspect.figures import DPI, SIZES, conv1_figure, nearest_neighbours, spread, subset
from alexnet.model.net import build_model
from alexnet.train.config import TrainConfig
from alexnet.train.loop import train

torch.set_num_threads(1)

TINY = dict(preset="torchvision", batch_size=4, image_size=72, crop=64, workers=0, log_every=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two epochs of the tiny run, with TensorBoard on: 18 training images, 5 steps an epoch."""
    from conftest import make_tiny_dataset, scoped_folder

    with scoped_folder(tmp_path_factory, "figures") as root:
        data = make_tiny_dataset(root / "tiny")
        cfg = TrainConfig(data=str(data), run_dir=str(root / "run"), epochs=2, tensorboard=True, **TINY)
        yield data, train(cfg, progress=False)


def assert_picture(path, name):
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.size == (round(SIZES[name][0] * DPI), round(SIZES[name][1] * DPI)), (name, im.size)
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 0, name
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1, name


def test_figures_of_a_run(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    out = tmp_path / "figs"
    assert main(["figures", str(run), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    for name in SIZES:
        assert_picture(out / f"{name}.png", name)
    assert f"wrote {out / 'neighbours.png'}" in capsys.readouterr().out
    assert not (run / "figures").exists()


def test_figures_skip_what_is_missing(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "classes.tsv", "best.pt"):
        (partial / name).write_bytes((run / name).read_bytes())
    cfg = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**cfg, "data": str(tmp_path / "gone")}))
    assert main(["figures", str(partial), "--no-progress"]) == 0
    assert sorted(p.name for p in (partial / "figures").iterdir()) == ["conv1_filters.png"]
    out = capsys.readouterr().out
    assert "predictions and neighbours skipped" in out and "curves skipped" in out and "confusion skipped" in out


def widest_white_band(path) -> int:
    """The most all-white pixel rows in a row inside the drawn kernels (below the title)."""
    with Image.open(path) as im:
        drawn = (np.asarray(im.convert("RGB"))[60:] < 250).any(axis=(1, 2))
    rows = np.flatnonzero(drawn)
    band = widest = 0
    for d in drawn[rows[0] : rows[-1] + 1]:
        band = 0 if d else band + 1
        widest = max(widest, band)
    return widest


def test_conv1_figure_paper_towers(tmp_path):
    weight = torch.randn(96, 3, 11, 11, generator=torch.Generator().manual_seed(0))
    for groups in (2, 1):
        model = build_model("paper", num_classes=10, groups=groups)
        with torch.no_grad():
            model.named_layers()["conv1"].weight.copy_(weight)  # the same kernels: only the layout differs
        path = conv1_figure(model, tmp_path / f"conv1_g{groups}.png")
        assert_picture(path, "conv1_filters")
    with Image.open(tmp_path / "conv1_g2.png") as a, Image.open(tmp_path / "conv1_g1.png") as b:
        assert np.asarray(a).shape == np.asarray(b).shape and not np.array_equal(np.asarray(a), np.asarray(b))
    # two towers: two blocks of 48 kernels with a wide gap between them; one tower: a 1-pixel pad between rows
    g2, g1 = widest_white_band(tmp_path / "conv1_g2.png"), widest_white_band(tmp_path / "conv1_g1.png")
    assert g2 > 3 * g1 and g1 > 0, (g2, g1)


def test_nearest_neighbours_are_exact():
    g = torch.Generator().manual_seed(0)
    queries, database = torch.randn(7, 16, generator=g), torch.randn(50, 16, generator=g)
    dist, idx = nearest_neighbours(queries, database, k=6, chunk=8)  # several chunks: merging is checked too
    q, db = queries.double().numpy(), database.double().numpy()
    for i in range(len(q)):
        d = [float(np.sqrt(((q[i] - db[j]) ** 2).sum())) for j in range(len(db))]
        order = sorted(range(len(db)), key=lambda j: d[j])[:6]
        assert idx[i].tolist() == order
        assert np.allclose(dist[i].numpy(), [d[j] for j in order], rtol=0, atol=1e-12)
    assert nearest_neighbours(queries, database[:3], k=6)[1].shape == (7, 3)


def test_deterministic_choices():
    assert subset(10, 0) == list(range(10)) and subset(10, 20) == list(range(10))
    assert subset(1000, 5) == subset(1000, 5) and len(subset(1000, 5)) == 5
    assert spread(6, 8) == [0, 1, 2, 3, 4, 5] and spread(100, 5) == [0, 25, 50, 74, 99]


def test_tensorboard_event_files(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = tiny_run
    assert json.loads((run / "config.json").read_text())["tensorboard"] is True
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for name in ("train_loss", "val_loss", "val_top1_err", "val_top5_err", "lr", "images_per_s"):
        events = acc.Scalars(f"epoch/{name}")
        assert [e.step for e in events] == [1, 2], name
        assert np.allclose([e.value for e in events], [m[name] for m in metrics], rtol=1e-5), name
    for name in ("train/loss", "train/images_per_s"):
        assert [e.step for e in acc.Scalars(name)] == list(range(1, 11)), name  # log_every 1: every step
    assert all(e.value > 0 for e in acc.Scalars("train/loss"))
    images = acc.Images("conv1/filters")
    assert [e.step for e in images] == [1, 2] and images[0].width > 0


def test_tensorboard_flag_in_cli(tmp_path):
    from alexnet.cli import build_parser

    args = build_parser().parse_args(["train", "--tensorboard", "--data", str(tmp_path)])
    assert args.tensorboard is True
    assert not hasattr(build_parser().parse_args(["train"]), "tensorboard")


def test_figures_of_a_run_trained_from_a_prepared_dataset(tiny_run, tmp_path, capsys):
    """A prepared dataset holds pixels, not images: predictions and neighbours come from the folder it
    was made from while that is there, and are skipped with a message once it is gone; the figures
    that need no images are drawn either way."""
    import shutil

    from alexnet.data.prepare import prepare_dataset

    data, run = tiny_run
    source, prepared = tmp_path / "source", tmp_path / "prepared"
    shutil.copytree(data, source)
    prepare_dataset(source, prepared, workers=0, progress=False)
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("classes.tsv", "metrics.jsonl", "confusion.csv"):
        shutil.copy(run / name, copy / name)
    (copy / "best.pt").symlink_to(run / "best.pt")
    cfg = json.loads((run / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "data": str(prepared)}))

    assert main(["figures", str(copy), "--workers", "0", "--no-progress"]) == 0
    assert sorted(p.stem for p in (copy / "figures").iterdir()) == sorted(SIZES)
    assert f"images from {source}" in capsys.readouterr().out

    shutil.rmtree(source)
    shutil.rmtree(copy / "figures")
    assert main(["figures", str(copy), "--no-progress"]) == 0
    assert sorted(p.stem for p in (copy / "figures").iterdir()) == ["confusion", "conv1_filters", "curves"]
    out = capsys.readouterr().out
    assert f"{prepared} is a prepared dataset and the image folder it was made from, {source}, is gone" in out
    assert "predictions and neighbours skipped" in out


@pytest.mark.parametrize("split", ["train", "val"])
def test_figures_of_a_data_folder_without_a_split_skip_only_what_needs_it(tiny_run, tmp_path, capsys, split):
    data, run = tiny_run
    (tmp_path / "data").mkdir()
    kept = "val" if split == "train" else "train"
    (tmp_path / "data" / kept).symlink_to(data / kept)
    out = tmp_path / "figs"
    assert main(["figures", str(run), "--data", str(tmp_path / "data"), "--out", str(out), "--no-progress"]) == 0
    drawn = {
        "train": ["confusion", "conv1_filters", "curves", "predictions"],
        "val": ["confusion", "conv1_filters", "curves"],
    }
    assert sorted(p.stem for p in out.iterdir()) == drawn[split]
    skipped = "neighbours skipped" if split == "train" else "predictions and neighbours skipped"
    assert f"has no '{split}' folder: {skipped}" in capsys.readouterr().out
