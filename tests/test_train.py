import json
import math
import os
import signal
import zlib

import pytest
import torch

import alexnet.train.step as step_module
from alexnet.checkpoint import load_checkpoint, save_checkpoint
from alexnet.errors import UserError
from alexnet.stopping import Interrupted
from alexnet.train.config import TrainConfig
from alexnet.train.loop import flat_loss_warning, train

# Small and quick: the paper network at a reduced input, few images. Still the real training loop.
TINY = dict(preset="torchvision", batch_size=4, image_size=72, crop=64, workers=0, log_every=1)


def tiny_config(data, run_dir, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), run_dir=str(run_dir), **{**TINY, "epochs": 2, **kw})


def weights(run_dir, name="last.pt"):
    return load_checkpoint(run_dir / name)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_directory_contents(tiny_dataset, tmp_path):
    run = train(tiny_config(tiny_dataset, tmp_path / "run"), progress=False)
    for name in (
        "config.json",
        "classes.tsv",
        "stats.pt",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "bad_files.txt",
        "eval.json",
        "per_class.csv",
        "confusion.csv",
    ):
        assert (run / name).is_file(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert set(json.loads((run / "eval.json").read_text())) == {"center", "ten_crop"}
    assert (run / "classes.tsv").read_text().splitlines()[1] == "0\tn001_red\tn001_red"
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["run_state"]["epoch"] == 2 and ckpt["classes"] == ["n001_red", "n002_green", "n003_blue"]
    assert {"optimizer", "scheduler", "rng", "stats", "config"} <= ckpt.keys()
    assert all(group["fused"] for group in ckpt["optimizer"]["param_groups"])  # make_optimizer's SGD
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    # best.pt holds the epoch with the lowest validation error (the first of equals)
    errors = [m["val_top1_err"] for m in metrics]
    assert load_checkpoint(run / "best.pt")["run_state"]["epoch"] == errors.index(min(errors)) + 1


# the paper preset: its LRN layers train in compiled kernels (fused), whose results must not depend on
# what was compiled before (an epoch's last, smaller batch recompiles them for any batch size)
PAPER = dict(preset="paper", init="caffe", image_size=256, crop=224)


# a step schedule: its state must come back too (the plateau's does not change in 2 epochs)
STEP = dict(schedule="step", step_epochs=1)


@pytest.mark.parametrize("preset", [{}, PAPER, STEP], ids=["torchvision", "paper", "step schedule"])
def test_resume_gives_identical_weights(tiny_dataset, tmp_path, preset):
    straight = train(tiny_config(tiny_dataset, tmp_path / "a", **preset), progress=False)
    half = train(tiny_config(tiny_dataset, tmp_path / "b", epochs=1, **preset), progress=False)
    old = load_checkpoint(half / "last.pt")  # as written before SGD was fused: resumes fused all the same
    for group in old["optimizer"]["param_groups"]:
        group["fused"] = None
    save_checkpoint(old, half / "last.pt")
    resumed = train(tiny_config(tiny_dataset, half, epochs=2, **preset), resume=True, progress=False)
    assert_same_weights(weights(straight), weights(resumed))
    assert all(group["fused"] for group in load_checkpoint(resumed / "last.pt")["optimizer"]["param_groups"])


def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(tiny_dataset, tmp_path, monkeypatch):
    straight = train(tiny_config(tiny_dataset, tmp_path / "a"), progress=False)

    real_batch, calls = step_module.train_batch, []

    def signalling_batch(*args, **kw):  # the signal arrives during the 3rd step (mid-epoch 1)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(*args, **kw)

    monkeypatch.setattr(step_module, "train_batch", signalling_batch)
    with pytest.raises(Interrupted) as stopped:
        train(tiny_config(tiny_dataset, tmp_path / "b"), progress=False)
    assert stopped.value.signum == signal.SIGTERM
    state = load_checkpoint(tmp_path / "b" / "last.pt")["run_state"]
    assert (state["epoch"], state["step_in_epoch"]) == (0, 3)  # the interrupted step was finished
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    monkeypatch.setattr(step_module, "train_batch", real_batch)
    resumed = train(tiny_config(tiny_dataset, tmp_path / "b"), resume=True, progress=False)
    assert_same_weights(weights(straight), weights(resumed))


def test_existing_run_directory_needs_resume(tiny_dataset, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something").write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        train(tiny_config(tiny_dataset, tmp_path / "run"), progress=False)
    assert (tmp_path / "run" / "something").read_text() == "keep me"


def test_bad_images_are_skipped_listed_and_training_goes_on(tiny_dataset, tmp_path):
    bad = tiny_dataset / "train" / "n001_red" / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    run = train(tiny_config(tiny_dataset, tmp_path / "run"), progress=False)
    listed = (run / "bad_files.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(bad))


def test_mostly_bad_data_stops_with_a_clear_message(tiny_dataset, tmp_path):
    for i, path in enumerate(sorted((tiny_dataset / "train").rglob("*.JPEG"))):
        if i % 5:
            path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="training images cannot be read"):
        train(tiny_config(tiny_dataset, tmp_path / "run"), progress=False)


def test_images_per_second_counts_the_wait_for_the_device(tiny_dataset, tmp_path, monkeypatch):
    """On CUDA the steps of an interval are only queued until its sums are read back; the interval's
    time must include that wait. Here the training loop's clock moves only while the read-back waits,
    1 s each time, as a busy GPU would make it: the images/s are the images over those seconds."""
    import time
    import types

    import alexnet.train.distributed as distributed
    import alexnet.train.loop as train_module

    clock, read_back = [0.0], distributed.sum_over_ranks

    def slow_read_back(tensor, ranks):
        clock[0] += 1.0
        return read_back(tensor, ranks)

    monkeypatch.setattr(distributed, "sum_over_ranks", slow_read_back)
    loop_time = types.SimpleNamespace(strftime=time.strftime, gmtime=time.gmtime, perf_counter=lambda: clock[0])
    monkeypatch.setattr(train_module, "time", loop_time)
    run = train(tiny_config(tiny_dataset, tmp_path / "run", epochs=1), progress=False)
    (metrics,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    intervals = 5  # 18 images in batches of 4, one interval per step (log_every=1)
    assert metrics["images_per_s"] == pytest.approx(18 / intervals) and metrics["epoch_seconds"] == intervals


def test_every_epoch_draws_new_crops_and_a_new_order(tiny_dataset, tmp_path, monkeypatch):
    """The paper: each time an image is used it gets a new crop, reflection and lighting; each epoch
    its own order. Resuming cannot show this (a wrong but deterministic draw resumes exactly)."""
    real_batch, seeds, orders = step_module.train_batch, [], []

    def spying_batch(images, stats, generator, *args, **kw):
        seeds.append(generator.initial_seed())
        orders.append([zlib.crc32(image.contiguous().numpy().tobytes()) for image in images])  # which, in order
        return real_batch(images, stats, generator, *args, **kw)

    monkeypatch.setattr(step_module, "train_batch", spying_batch)
    train(tiny_config(tiny_dataset, tmp_path / "run"), progress=False)
    assert len(seeds) == 10 and len(set(seeds)) == 10  # 2 epochs of 5 steps, each its own numbers
    first, second = sum(orders[:5], []), sum(orders[5:], [])
    assert sorted(first) == sorted(second) and len(set(first)) == 18 and first != second


def fake_evaluation(errors: list[float]):
    """`evaluate` returning these validation errors epoch by epoch (and the last one after)."""
    from alexnet.inspect.evaluate import EvalResult

    calls = []

    def evaluate(*args, **kw):
        calls.append(1)
        err = errors[min(len(calls), len(errors)) - 1]
        return EvalResult(1.0, err, err, 6, torch.eye(3, dtype=torch.long) * 2)

    return evaluate


@pytest.mark.parametrize(
    "schedule,logged",
    [
        # patience 0: the rate drops after each epoch that does not improve on the best error so far
        (dict(schedule="plateau", plateau_patience=0), [0.01, 0.01, 0.001, 0.001]),
        # each epoch's last step (of 5): step 4, 9, 14, 19 of 20
        (dict(schedule="cosine"), [0.01 * 0.5 * (1 + math.cos(math.pi * s / 20)) for s in (4, 9, 14, 19)]),
        (dict(schedule="step", step_epochs=2), [0.01, 0.01, 0.001, 0.001]),
    ],
    ids=["plateau", "cosine", "step"],
)
def test_metrics_log_the_rate_each_epoch_trained_with(tiny_dataset, tmp_path, monkeypatch, schedule, logged):
    import alexnet.train.loop as train_module

    monkeypatch.setattr(train_module, "evaluate", fake_evaluation([0.5, 0.5, 0.4, 0.4]))
    run = train(tiny_config(tiny_dataset, tmp_path / "run", epochs=4, **schedule), progress=False)
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx(logged, rel=1e-12)


def test_best_is_the_first_of_equal_epochs_and_the_final_report_evaluates_it(tiny_dataset, tmp_path, monkeypatch):
    """Validation errors 0.5, 0.4, 0.4: best.pt is epoch 2 (a tie does not replace it), the final
    centre and 10-crop evaluations run on its weights, not the last epoch's, and a run directory given
    as a checkpoint means its best.pt."""
    import alexnet.train.loop as train_module
    from alexnet.checkpoint import checkpoint_file

    evaluate, seen = fake_evaluation([0.5, 0.4, 0.4]), []

    def evaluate_and_note_the_weights(model, *args, **kw):
        seen.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        return evaluate(model, *args, **kw)

    monkeypatch.setattr(train_module, "evaluate", evaluate_and_note_the_weights)
    run = train(tiny_config(tiny_dataset, tmp_path / "run", epochs=3), progress=False)
    assert load_checkpoint(run / "best.pt")["run_state"]["epoch"] == 2
    best, last = (torch.cat([w.flatten() for w in weights(run, name).values()]) for name in ("best.pt", "last.pt"))
    assert len(seen) == 5 and not torch.equal(best, last)
    assert torch.equal(seen[3], best) and torch.equal(seen[4], best)  # centre, then 10-crop
    assert torch.equal(seen[1], best) and torch.equal(seen[2], last)  # the epochs' own evaluations
    assert checkpoint_file(run) == run / "best.pt"
    (run / "best.pt").unlink()
    assert checkpoint_file(run) == run / "last.pt"


def test_the_runs_pixel_statistics_follow_its_mean_scale_and_pca_options(tiny_dataset, tmp_path, monkeypatch):
    """What the run trains with (kept in last.pt): the paper's mean image, 0-255 inputs and the training
    set's colour axes, or torchvision's mean colour and std and the ImageNet constants, as asked."""
    import alexnet.train.loop as train_module
    from alexnet.data.augment import IMAGENET_EIGVAL, IMAGENET_STD

    monkeypatch.setattr(train_module, "evaluate", fake_evaluation([0.5]))
    # the paper's 0-255 inputs into the torchvision network: with its He-normal default the loss is NaN by step 4
    options = {
        "paper": dict(scale="raw", init="default"),
        "torchvision": dict(mean="channel", scale="imagenet", pca="imagenet"),
    }
    stats = {
        name: load_checkpoint(train(tiny_config(tiny_dataset, tmp_path / name, epochs=1, **o), progress=False))["stats"]
        for name, o in options.items()
    }
    assert stats["paper"]["mean"].shape == (3, 72, 72) and torch.allclose(stats["paper"]["std"], torch.tensor(1 / 255))
    assert not torch.allclose(stats["paper"]["eigval"], torch.tensor(IMAGENET_EIGVAL))  # this data's axes
    assert stats["torchvision"]["mean"].shape == (3, 1, 1)
    assert torch.allclose(stats["torchvision"]["std"].flatten(), torch.tensor(IMAGENET_STD))
    assert torch.allclose(stats["torchvision"]["eigval"], torch.tensor(IMAGENET_EIGVAL))


def test_metrics_hold_the_epochs_mean_loss_and_error_over_its_steps(tiny_dataset, tmp_path, monkeypatch):
    """train_loss and train_top1_err: the sums each step returned, over the epoch's images."""
    import alexnet.train.loop as train_module

    returned, real_call = [], step_module.TrainStep.__call__

    def call(self, images, labels, *args, **kw):
        loss_sum, correct = real_call(self, images, labels, *args, **kw)
        returned.append((float(loss_sum), int(correct), len(labels)))
        return loss_sum, correct

    monkeypatch.setattr(step_module.TrainStep, "__call__", call)
    monkeypatch.setattr(train_module, "evaluate", fake_evaluation([0.5]))
    run = train(tiny_config(tiny_dataset, tmp_path / "run", epochs=1), progress=False)
    (metrics,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    images = sum(n for _, _, n in returned)
    assert images == 18 and len(returned) == 5
    assert metrics["train_loss"] == pytest.approx(sum(loss for loss, _, _ in returned) / images, rel=1e-6)
    assert metrics["train_top1_err"] == pytest.approx(1 - sum(c for _, c, _ in returned) / images, rel=1e-9)


def test_a_resumed_run_keeps_a_raised_epochs_and_its_data_moved(tiny_dataset, tmp_path, monkeypatch):
    """config.json keeps what a resume changed, so that the resume command printed after a stop goes on
    with it; data given relative to one folder is found from another, and can be moved."""
    monkeypatch.chdir(tiny_dataset.parent)
    run = train(tiny_config("tiny", tmp_path / "run", epochs=1), progress=False)
    assert json.loads((run / "config.json").read_text())["data"] == str(tiny_dataset)
    moved = tiny_dataset.rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        train(TrainConfig.load(run / "config.json"), resume=True, progress=False)
    train(tiny_config(moved, run, epochs=2), resume=True, progress=False)
    stored = TrainConfig.load(run / "config.json")
    assert (stored.epochs, stored.data) == (2, str(moved))
    train(stored, resume=True, progress=False)  # a plain resume: nothing left to do
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_resume_refuses_other_classes_or_other_images(tiny_dataset, tmp_path):
    run = train(tiny_config(tiny_dataset, tmp_path / "run", epochs=1), progress=False)
    before = (run / "last.pt").read_bytes()
    for split in ("train", "val"):
        (tiny_dataset / split / "n003_blue").rename(tiny_dataset / split / "n004_blue")
    with pytest.raises(UserError, match="other classes than .* missing n003_blue; new n004_blue"):
        train(tiny_config(tiny_dataset, run, epochs=2), resume=True, progress=False)
    for split in ("train", "val"):
        (tiny_dataset / split / "n004_blue").rename(tiny_dataset / split / "n003_blue")
    (tiny_dataset / "train" / "n003_blue" / "n003_blue_0.JPEG").unlink()
    with pytest.raises(UserError, match="holds 17 training images, .* was trained on 18"):
        train(tiny_config(tiny_dataset, run, epochs=2), resume=True, progress=False)
    assert (run / "last.pt").read_bytes() == before
    assert TrainConfig.load(run / "config.json").epochs == 1


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_its_init_from_weights(
    tiny_dataset, tmp_path, monkeypatch
):
    base = train(tiny_config(tiny_dataset, tmp_path / "base", epochs=1), progress=False)
    tuned = dict(epochs=1, init_from=str(base / "last.pt"), lr=0.001)
    straight = train(tiny_config(tiny_dataset, tmp_path / "a", **tuned), progress=False)

    def crash(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(step_module, "train_batch", crash)  # stops at the first step: no last.pt
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tiny_dataset, tmp_path / "b", **tuned), progress=False)
    assert not (tmp_path / "b" / "last.pt").exists()
    monkeypatch.undo()
    resumed = train(tiny_config(tiny_dataset, tmp_path / "b", **tuned), resume=True, progress=False)
    assert_same_weights(weights(straight), weights(resumed))


def test_unreadable_validation_images_stop_the_run_in_one_line(tiny_dataset, tmp_path):
    for path in (tiny_dataset / "val").rglob("*.JPEG"):
        path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="no validation image in .* can be read"):
        train(tiny_config(tiny_dataset, tmp_path / "run", epochs=1), progress=False)
    assert len((tmp_path / "run" / "bad_files.txt").read_text().splitlines()) == 6


def test_flat_loss_warning_is_for_a_loss_within_3_percent_of_chance():
    chance = math.log(10)
    assert "stayed at chance (ln 10 = 2.3026)" in flat_loss_warning(chance * 1.029, 10, 3)
    assert "epoch 3's" in flat_loss_warning(chance * 0.971, 10, 3)
    for loss in (chance * 0.96, chance * 1.04, 0.5, float("nan")):
        assert flat_loss_warning(loss, 10, 1) is None, loss


def test_an_epoch_whose_loss_stays_at_chance_says_so_in_one_line(tiny_dataset, tmp_path, capsys):
    """A learning rate too small to move the weights: the loss stays at ln 3, and the run says so each epoch."""
    train(tiny_config(tiny_dataset, tmp_path / "run", epochs=2, lr=1e-12), progress=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if "stayed at chance" in line]
    assert len(lines) == 2 and lines[0].startswith("warning: epoch 1's training loss"), lines
    assert "try --init kaiming, or a lower --lr" in lines[0]
