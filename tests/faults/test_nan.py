"""A NaN or infinite loss is caught within one logging interval: training stops with a clear message and
the last good checkpoint, or with --on-nan rollback goes back to it with a tenth of the learning rate."""

import math

import pytest
import torch

import alexnet.inspect.evaluate as evaluate_module
import alexnet.train.loop as train_module
import alexnet.train.step as step_module
from alexnet.checkpoint import load_checkpoint, read_jsonl
from alexnet.train.config import TrainConfig
from alexnet.train.loop import Diverged, train

from .conftest import TINY, cli_args


def poison_steps(monkeypatch, steps: set[int]) -> list[int]:
    """Make the input of the given steps (counted from 1 in this process) NaN: a real NaN loss."""
    real, calls = step_module.train_batch, []

    def batch(*args, **kw):
        calls.append(1)
        x = real(*args, **kw)
        return x * math.nan if len(calls) in steps else x

    monkeypatch.setattr(step_module, "train_batch", batch)
    return calls


def poison_evaluations(monkeypatch, calls: set[int]) -> None:
    """Make the model's outputs NaN in the given evaluations of train (counted from 1): finite weights
    whose outputs overflow on the validation images."""
    real_evaluate, real_probabilities, count = train_module.evaluate, evaluate_module.class_probabilities, []

    def evaluate(*args, **kw):
        count.append(1)
        return real_evaluate(*args, **kw)

    def probabilities(*args, **kw):
        p = real_probabilities(*args, **kw)
        return p * math.nan if len(count) in calls else p

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(evaluate_module, "class_probabilities", probabilities)


def test_nan_stops_within_one_logging_interval_keeping_the_last_good_checkpoint(fault_data, tmp_path, monkeypatch):
    poison_steps(monkeypatch, set(range(7, 100)))  # from epoch 2, step 2 on
    cfg = TrainConfig(data=str(fault_data), run_dir=str(tmp_path / "run"), **{**TINY, "log_every": 3})
    with pytest.raises(Diverged, match=r"loss became nan at epoch 2, step 3; last good checkpoint: .*last.pt") as e:
        train(cfg, progress=False)
    # only what a resume accepts (--on-nan; --lr would change what the run computes)
    assert str(e.value).endswith(
        f"; resume with: alexnet train --resume {tmp_path / 'run'} --on-nan rollback (it goes back to the last"
        " checkpoint with a tenth of the learning rate), or start a new run with a lower --lr"
    )
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["run_state"]["epoch"] == 1 and all(torch.isfinite(w).all() for w in ckpt["model"].values())
    assert [m["epoch"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_rollback_lowers_the_learning_rate_and_goes_on(fault_data, tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, {7})  # one bad step in epoch 2
    cfg = TrainConfig(data=str(fault_data), run_dir=str(tmp_path / "run"), on_nan="rollback", **TINY)
    train(cfg, progress=False)
    assert "rolled back to epoch 2, step 0, learning rate now 0.001 (1/3)" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["run_state"]["epoch"] == 2 and all(torch.isfinite(w).all() for w in ckpt["model"].values())
    assert [m["lr"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0.01, pytest.approx(0.001)]


def test_rollback_gives_up_after_three_tries(fault_data, tmp_path, monkeypatch):
    poison_steps(monkeypatch, set(range(1, 1000)))  # NaN from the first step: rolls back to the start
    cfg = TrainConfig(data=str(fault_data), run_dir=str(tmp_path / "run"), on_nan="rollback", **TINY)
    with pytest.raises(Diverged, match="loss became nan at epoch 1, step 1") as e:
        train(cfg, progress=False)
    assert str(e.value).endswith(
        f"; last good checkpoint: {tmp_path / 'run' / 'last.pt'}; --on-nan rollback has used its 3 rollbacks:"
        " start a new run with a lower --lr"
    )
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")  # the initial weights, with the rate of the last try
    assert ckpt["run_state"]["epoch"] == 0 and ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)


def test_each_rollback_lowers_the_rate_again_and_the_count_is_kept(fault_data, tmp_path, monkeypatch, capsys):
    """Three rollbacks in a row divide the rate by 10, 100 and 1000: each goes back to a checkpoint that
    holds the lowered rate and the count (a retry at the same rate would replay the same NaN)."""
    poison_steps(monkeypatch, set(range(7, 1000)))  # from epoch 2, step 2 on, at any rate
    cfg = TrainConfig(data=str(fault_data), run_dir=str(tmp_path / "run"), on_nan="rollback", **TINY)
    with pytest.raises(Diverged, match="loss became nan at epoch 2, step 1"):
        train(cfg, progress=False)
    out = capsys.readouterr().out
    for lr, count in (("0.001", 1), ("0.0001", 2), ("1e-05", 3)):
        assert f"learning rate now {lr} ({count}/3)" in out
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["run_state"]["rollbacks"] == 3
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)


def test_weights_made_nan_by_a_step_with_a_finite_loss_never_reach_a_checkpoint(fault_data, tmp_path, monkeypatch):
    """The gradient of epoch 1's last step is made NaN: that step's loss is finite, its update is not.
    Its checkpoint would hold NaN weights as 'the last good checkpoint'; the run stops before it."""
    import alexnet.train.config as config_module  # TrainConfig.build_model, which training calls, builds with it

    real_build, backward_passes = config_module.build_model, []

    def poisoned_model(*args, **kw):
        model = real_build(*args, **kw)

        def poison(grad):
            backward_passes.append(1)
            return grad * math.nan if len(backward_passes) == 5 else grad

        model.classifier[-1].weight.register_hook(poison)
        return model

    monkeypatch.setattr(config_module, "build_model", poisoned_model)
    cfg = TrainConfig(data=str(fault_data), run_dir=str(tmp_path / "run"), **{**TINY, "log_every": 3})
    with pytest.raises(
        Diverged, match="weights became NaN/inf at epoch 1, step 5; no checkpoint had been written"
    ) as e:
        train(cfg, progress=False)
    assert str(e.value).endswith("; start again with a lower --lr, or with --on-nan rollback")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_the_resume_the_nan_stop_suggests_is_accepted_and_rolls_back(fault_data, tmp_path, monkeypatch, capsys):
    """The stop's line names a resume with --on-nan rollback: run as printed, the command line accepts it
    (a resume refuses settings that change what is computed, --lr among them) and the run rolls back."""
    from alexnet.cli import main

    poison_steps(monkeypatch, {7, 8})  # epoch 2, step 2; after the resume, its step 1 again
    run_dir = tmp_path / "run"
    assert main([*cli_args(fault_data, run_dir, **TINY)]) == 1
    stopped = capsys.readouterr().err.strip().splitlines()
    assert len(stopped) == 1 and stopped[0].startswith("alexnet: error: loss became nan at epoch 2, step 2;")
    suggested = stopped[0].split("resume with: alexnet ")[1].split(" (it goes back")[0].split()
    assert suggested == ["train", "--resume", str(run_dir), "--on-nan", "rollback"]
    assert main([*suggested, "--no-progress"]) == 0
    assert "rolled back to epoch 2, step 0, learning rate now 0.001 (1/3)" in capsys.readouterr().out
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["run_state"]["epoch"] == 2 and ckpt["run_state"]["rollbacks"] == 1


def test_outputs_that_overflow_in_validation_stop_the_run_before_a_checkpoint(fault_data, tmp_path, monkeypatch):
    """Finite weights, finite training loss, NaN outputs on the validation images: the epoch is not
    recorded (metrics.jsonl would hold NaN, which is not JSON) and last.pt stays the last good one."""
    poison_evaluations(monkeypatch, {2})  # epoch 2's validation
    cfg = TrainConfig(data=str(fault_data), run_dir=str(tmp_path / "run"), **TINY)
    with pytest.raises(Diverged, match=r"the validation loss became nan at epoch 2 \(the model's outputs are NaN or"):
        train(cfg, progress=False)
    assert [m["epoch"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["run_state"]["epoch"] == 1


def test_outputs_that_overflow_in_validation_roll_back_with_on_nan_rollback(fault_data, tmp_path, monkeypatch, capsys):
    poison_evaluations(monkeypatch, {2})
    cfg = TrainConfig(data=str(fault_data), run_dir=str(tmp_path / "run"), on_nan="rollback", **TINY)
    train(cfg, progress=False)
    assert "rolled back to epoch 2, step 0, learning rate now 0.001 (1/3)" in capsys.readouterr().out
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2] and all(math.isfinite(m["val_loss"]) for m in metrics)
    assert metrics[1]["lr"] == pytest.approx(0.001)
