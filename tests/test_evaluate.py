"""The test protocol (docs/reference.md §4): 10-crop softmax averaging, top-1 and top-5 error, the
confusion matrix and the reports written from it, with a stub model whose logits are fixed per
(image, view), so every number is known exactly."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alexnet.data.augment import IMAGENET_EIGVAL, IMAGENET_EIGVEC, PixelStats
from alexnet.data.folders import Batch
from alexnet.errors import UserError
from alexnet.inspect.evaluate import class_probabilities, evaluate, write_report

pytestmark = pytest.mark.usefixtures("one_thread")  # many small tensor ops: threads only contend

S, CROP = 8, 6
# (top, left) of the views: four corners, then the centre; views 5-9 are the same, mirrored
CORNERS = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
# raw pixels, mean 0: a normalised view holds its pixels' 0..255 values
STATS = PixelStats(
    torch.zeros(3, 1, 1), torch.full((3, 1, 1), 1 / 255), torch.tensor(IMAGENET_EIGVAL), torch.tensor(IMAGENET_EIGVEC)
)
CPU = torch.device("cpu")


def tagged_images(b: int) -> torch.Tensor:
    """(b, 3, S, S) uint8: channel 0 = row, channel 1 = column, channel 2 = the image's index."""
    imgs = torch.empty(b, 3, S, S, dtype=torch.uint8)
    imgs[:, 0] = torch.arange(S).view(S, 1)
    imgs[:, 1] = torch.arange(S).view(1, S)
    imgs[:, 2] = torch.arange(b).view(b, 1, 1)
    return imgs


class ViewLogits(nn.Module):
    """Logits table[image, view]: which image and view a crop is, read from its pixels."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)  # (images, 10, classes)
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        px = x.round().long()
        top, first, second = px[:, 0, 0, 0], px[:, 1, 0, 0], px[:, 1, 0, 1]
        mirrored = second < first
        left = torch.where(mirrored, first - (CROP - 1), first)
        view = torch.tensor([CORNERS.index(tl) for tl in zip(top.tolist(), left.tolist(), strict=True)])
        view = view + 5 * mirrored
        image = px[:, 2, 0, 0]
        self.seen += list(zip(image.tolist(), view.tolist(), strict=True))
        return self.table[image, view]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------------------ 10 crops


def test_ten_crop_averages_the_softmaxes_not_the_logits() -> None:
    # one confident view for class 0, nine mild ones for class 1: the mean logit picks class 0,
    # the mean probability (the paper's averaging of the softmax outputs) class 1
    logits = torch.tensor([[10.0, 0.0]] + [[0.0, 1.0]] * 9)
    assert logits.mean(0).argmax() == 0
    probs = class_probabilities(ViewLogits(logits[None]), tagged_images(1), STATS, CROP, ten_crop=True)
    p0 = (sigmoid(10) + 9 * sigmoid(-1)) / 10
    torch.testing.assert_close(probs, torch.tensor([[p0, 1 - p0]]))
    assert probs.argmax(1).tolist() == [1]


def test_ten_crop_uses_all_ten_views_mirrored_ones_included() -> None:
    # the unmirrored views lean to class 0, the mirrored ones, more strongly, to class 1
    table = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 3.0]] * 5)[None].repeat(2, 1, 1)
    model = ViewLogits(table)
    probs = class_probabilities(model, tagged_images(2), STATS, CROP, ten_crop=True)
    p1 = (5 * sigmoid(-1) + 5 * sigmoid(3)) / 10
    torch.testing.assert_close(probs, torch.tensor([[1 - p1, p1]] * 2))
    assert sorted(model.seen) == [(i, v) for i in range(2) for v in range(10)]  # each view once
    # any logits: the mean over the views of each view's softmax
    table = torch.randn(3, 10, 7, generator=torch.Generator().manual_seed(0))
    probs = class_probabilities(ViewLogits(table), tagged_images(3), STATS, CROP, ten_crop=True)
    torch.testing.assert_close(probs, F.softmax(table, dim=2).mean(1))


def test_without_ten_crop_only_the_centre_view() -> None:
    table = torch.randn(3, 10, 7, generator=torch.Generator().manual_seed(1))
    model = ViewLogits(table)
    probs = class_probabilities(model, tagged_images(3), STATS, CROP, ten_crop=False)
    torch.testing.assert_close(probs, F.softmax(table[:, 4], dim=1))
    assert model.seen == [(0, 4), (1, 4), (2, 4)]


# ---------------------------------------------------------------------------------- evaluate


def predicting(logits: torch.Tensor) -> nn.Module:
    """A stub giving each image the same logits in every view."""
    return ViewLogits(logits[:, None].repeat(1, 10, 1))


def test_top5_counts_a_true_class_ranked_fifth_not_sixth() -> None:
    ranked = torch.arange(8, 0, -1).float()  # class 0 ranked first ... class 7 last
    labels = torch.tensor([4, 5, 0])  # ranked 5th, 6th and 1st
    model = predicting(ranked.repeat(3, 1))
    result = evaluate(model, [Batch(tagged_images(3), labels, [])], STATS, 8, CPU, CROP, progress=False)
    assert result.count == 3
    assert result.top5_err == pytest.approx(1 / 3)  # only the 6th misses
    assert result.top1_err == pytest.approx(2 / 3)
    assert result.loss == pytest.approx(-F.log_softmax(ranked, 0)[labels].mean().item())


def test_confusion_rows_are_true_classes_in_the_reports(tmp_path) -> None:
    # a predictor leaning to class 0; rows (true) and columns (predicted) then count differently
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 1, 0, 0, 2])
    model = predicting(F.one_hot(predicted, 3).float())
    images = tagged_images(6)
    batches = [Batch(images[:4], labels[:4], []), Batch(images[4:], labels[4:], [])]  # counts add up over batches
    result = evaluate(model, batches, STATS, 3, CPU, CROP, progress=False)
    assert result.confusion.tolist() == [[2, 1, 0], [2, 0, 0], [0, 0, 1]]
    torch.testing.assert_close(result.per_class_accuracy(), torch.tensor([2 / 3, 0.0, 1.0], dtype=torch.float64))
    assert result.top1_err == pytest.approx(3 / 6)
    write_report(tmp_path, {"center": result}, ["n0", "n1", "n2"], ["cat", "dog", "fox"])
    with open(tmp_path / "per_class.csv", newline="") as f:
        assert list(csv.reader(f)) == [
            ["index", "wnid", "name", "images", "accuracy"],
            ["0", "n0", "cat", "3", "0.6667"],
            ["1", "n1", "dog", "2", "0.0000"],
            ["2", "n2", "fox", "1", "1.0000"],
        ]
    with open(tmp_path / "confusion.csv", newline="") as f:  # what figures.read_confusion reads
        assert list(csv.reader(f)) == [
            ["true\\predicted", "n0", "n1", "n2"],
            ["n0", "2", "1", "0"],
            ["n1", "2", "0", "0"],
            ["n2", "0", "0", "1"],
        ]


def test_evaluate_puts_the_model_in_eval_mode() -> None:
    # dropout on the logits: left in training mode, each evaluation would be a different random one
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    labels = torch.tensor([0, 1, 2, 3])
    model = nn.Sequential(predicting(logits), nn.Dropout(0.5)).train()
    batches = [Batch(tagged_images(4), labels, [])]
    first = evaluate(model, batches, STATS, 6, CPU, CROP, progress=False)
    model.train()  # as training leaves it before the next epoch's evaluation
    second = evaluate(model, batches, STATS, 6, CPU, CROP, progress=False)
    assert first.loss == pytest.approx(-F.log_softmax(logits, 1)[range(4), labels].mean().item())
    want = torch.zeros(6, 6, dtype=torch.long)
    for true, predicted in zip(labels.tolist(), logits.argmax(1).tolist(), strict=True):
        want[true, predicted] += 1
    assert torch.equal(first.confusion, want)
    assert (second.loss, second.top1_err, second.top5_err) == (first.loss, first.top1_err, first.top5_err)
    assert torch.equal(second.confusion, first.confusion)


# ------------------------------------------------------------------------- no readable image


def test_evaluate_command_with_no_readable_image_is_a_one_line_error_and_no_report(
    tmp_path, monkeypatch, capsys
) -> None:
    """Every validation file corrupt or empty: one line and exit 2, not errors of NaN "on 0 images", and
    no eval.json (NaN is not JSON)."""
    import alexnet.interop.export
    from alexnet.cli import main

    val = tmp_path / "data" / "val" / "n0"
    val.mkdir(parents=True)
    (val / "0.JPEG").write_bytes(b"")
    (val / "1.JPEG").write_text("not an image")
    ckpt = {"classes": ["n0", "n1"], "names": ["cat", "dog"], "config": {"image_size": S, "crop": CROP}}
    loaded = (predicting(torch.zeros(1, 2)), STATS, ckpt)
    monkeypatch.setattr(alexnet.interop.export, "load_for_inference", lambda *_: loaded)
    report = tmp_path / "report"
    args = ["evaluate", "--checkpoint", "c.pt", "--data", str(tmp_path / "data"), "--ten-crop", "--out", str(report)]
    assert main([*args, "--device", "cpu", "--workers", "0", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"alexnet: error: none of the 2 validation images could be read; e.g. {val / '0.JPEG'}: "
        f"UnidentifiedImageError: cannot identify image file '{val / '0.JPEG'}'"
    ]
    assert "top-1" not in out and not report.exists()


def test_a_result_of_no_images_is_no_report(tmp_path) -> None:
    bad = Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), ["a.JPEG\tbroken"])
    result = evaluate(predicting(torch.zeros(1, 2)), [bad], STATS, 2, CPU, CROP, progress=False)
    assert result.count == 0 and result.bad == ["a.JPEG\tbroken"]
    with pytest.raises(UserError, match="none of the validation images could be read: no report written"):
        write_report(tmp_path / "report", {"center": result}, ["n0", "n1"], ["cat", "dog"])
    assert not (tmp_path / "report").exists()


# ------------------------------------------------------------------ NaN weights, NaN results


@pytest.fixture
def nan_run(tmp_path) -> tuple[Path, Path]:
    """A run directory whose best.pt is as training writes it (2 classes, random weights) but for one
    NaN in conv1's weights, and an image folder of its classes."""
    from conftest import write_image

    from alexnet.checkpoint import save_checkpoint
    from alexnet.data.augment import make_pixel_stats
    from alexnet.train.config import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig(preset="torchvision", image_size=72, crop=64).resolved()
    weights = cfg.build_model(2).state_dict()
    weights["features.0.weight"][0, 0, 0, 0] = math.nan
    stats = make_pixel_stats(torch.full((3, 8, 8), 0.5), torch.eye(3) * 0.01, "channel", cfg.scale, cfg.pca)
    run = tmp_path / "run"
    run.mkdir()
    ckpt = {"config": cfg.__dict__, "classes": ["n0", "n1"], "names": ["cat", "dog"], "stats": stats.state_dict()}
    save_checkpoint({**ckpt, "model": weights}, run / "best.pt")
    for wnid in ("n0", "n1"):
        write_image(tmp_path / "data" / "val" / wnid / f"{wnid}.JPEG")
    return run, tmp_path / "data"


def test_a_checkpoint_of_nan_weights_is_refused_in_one_line_and_no_report(nan_run, tmp_path, capsys) -> None:
    """Its outputs would be NaN, and eval.json would hold NaN, which is not JSON: refused as it is loaded,
    naming the file (a run directory's best.pt) and the first tensor that is not finite."""
    from alexnet.cli import main

    run, data = nan_run
    said = f"alexnet: error: {run / 'best.pt'} holds NaN or infinite weights (in features.0.weight): it cannot"
    said += " be evaluated or used"
    report = tmp_path / "report"
    args = ["evaluate", "--checkpoint", str(run), "--data", str(data), "--out", str(report), "--device", "cpu"]
    assert main([*args, "--workers", "0", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [said]
    assert "top-1" not in out and not report.exists()
    image = str(data / "val" / "n0" / "n0.JPEG")
    assert main(["predict", "--checkpoint", str(run / "best.pt"), "--device", "cpu", image]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [said] and not out


def test_a_result_that_is_not_finite_is_no_report(tmp_path) -> None:
    # finite weights can still overflow: an infinite logit makes the softmax, and so the loss, NaN
    model = predicting(torch.tensor([[math.inf, 0.0], [0.0, 1.0]]))
    result = evaluate(model, [Batch(tagged_images(2), torch.tensor([0, 1]), [])], STATS, 2, CPU, CROP, progress=False)
    assert result.count == 2 and math.isnan(result.loss)
    with pytest.raises(UserError) as e:
        write_report(tmp_path / "report", {"center": result}, ["n0", "n1"], ["cat", "dog"])
    assert str(e.value) == (
        f"the center evaluation's loss is nan (the model's outputs are NaN or infinite): no report written to"
        f" {tmp_path / 'report'}"
    )
    assert not (tmp_path / "report").exists()


def test_finite_weights_whose_outputs_overflow_give_no_errors(nan_run, capsys) -> None:
    """Finite weights whose logits overflow to infinity: the errors computed from NaN probabilities mean
    nothing, so `evaluate` says why instead of printing them, with or without --out."""
    from alexnet.checkpoint import load_checkpoint, save_checkpoint
    from alexnet.cli import main

    run, data = nan_run
    ckpt = load_checkpoint(run / "best.pt")
    ckpt["model"]["features.0.weight"][0, 0, 0, 0] = 0.0
    ckpt["model"]["classifier.6.weight"][0] = 3e38  # finite, but its products sum past float32's largest
    save_checkpoint(ckpt, run / "best.pt")
    args = ["evaluate", "--checkpoint", str(run), "--data", str(data), "--device", "cpu", "--workers", "0"]
    assert main([*args, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        "alexnet: error: the center evaluation's loss is nan (the model's outputs are NaN or infinite): its errors"
        " would mean nothing"
    ]
    assert "top-1" not in out
