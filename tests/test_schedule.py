"""Learning-rate schedules against their formulas, stepping real torch schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alexnet.train.config import TrainConfig
from alexnet.train.schedule import lr_factor, make_scheduler, scale_learning_rate, steps_each_iteration

pytestmark = pytest.mark.usefixtures("one_thread")  # many small tensor ops: threads only contend


def _optimizer(lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def _lrs_per_step(cfg: TrainConfig, steps_per_epoch: int, n: int) -> list[float]:
    """The learning rate used by optimizer steps 0..n-1 (the scheduler stepped after each)."""
    opt = _optimizer(cfg.lr)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    assert steps_each_iteration(sched)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_inverse_time_default_constants() -> None:
    cfg = TrainConfig(schedule="inverse-time")
    # the seed: lr = 0.01 / (1 + 0.95 * floor(step / 100000))
    assert (cfg.lr, cfg.inverse_time_rate, cfg.inverse_time_steps) == (0.01, 0.95, 100_000)
    for step in (0, 1, 99_999, 100_000, 199_999, 200_000, 250_000, 1_000_000):
        want = 0.01 / (1 + 0.95 * math.floor(step / 100_000))
        assert cfg.lr * lr_factor(cfg, 5000, step) == pytest.approx(want, rel=1e-12), step
    assert cfg.lr * lr_factor(cfg, 5000, 99_999) == pytest.approx(0.01)
    assert cfg.lr * lr_factor(cfg, 5000, 100_000) == pytest.approx(0.01 / 1.95)
    assert cfg.lr * lr_factor(cfg, 5000, 250_000) == pytest.approx(0.01 / 2.9)


def test_inverse_time_scheduler() -> None:
    cfg = TrainConfig(schedule="inverse-time", inverse_time_steps=10)
    lrs = _lrs_per_step(cfg, steps_per_epoch=7, n=40)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(0.01 / (1 + 0.95 * math.floor(step / 10)), rel=1e-12), step
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[9] == pytest.approx(0.01)
    assert lrs[10] == pytest.approx(0.01 / 1.95)
    assert lrs[25] == pytest.approx(0.01 / 2.9)


def test_inverse_time_other_rate() -> None:
    cfg = TrainConfig(schedule="inverse-time", inverse_time_steps=4, inverse_time_rate=0.5, lr=0.1)
    lrs = _lrs_per_step(cfg, steps_per_epoch=3, n=13)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(0.1 / (1 + 0.5 * (step // 4)), rel=1e-12), step


@pytest.mark.parametrize("steps_per_epoch, step_epochs", [(3, 2), (5, 1), (1, 4)])
def test_step_schedule(steps_per_epoch: int, step_epochs: int) -> None:
    cfg = TrainConfig(schedule="step", step_epochs=step_epochs, epochs=10)
    n = 3 * step_epochs * steps_per_epoch + 2
    lrs = _lrs_per_step(cfg, steps_per_epoch, n)
    period = step_epochs * steps_per_epoch
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(0.01 / 10 ** (step // period), rel=1e-9), step
    assert lrs[period - 1] == pytest.approx(0.01)
    assert lrs[period] == pytest.approx(0.001)
    assert lrs[2 * period] == pytest.approx(0.0001)


def test_step_schedule_default_is_every_30_epochs() -> None:
    cfg = TrainConfig(schedule="step")
    assert cfg.step_epochs == 30
    assert lr_factor(cfg, 100, 30 * 100 - 1) == 1.0
    assert lr_factor(cfg, 100, 30 * 100) == pytest.approx(0.1)
    assert lr_factor(cfg, 100, 60 * 100) == pytest.approx(0.01)


def test_cosine_schedule() -> None:
    cfg = TrainConfig(schedule="cosine", epochs=3, lr=0.05)
    spe = 4
    total = 3 * spe
    lrs = _lrs_per_step(cfg, spe, total + 3)
    for step, lr in enumerate(lrs[: total + 1]):
        want = 0.5 * (1 + math.cos(math.pi * step / total)) * 0.05
        assert lr == pytest.approx(want, rel=1e-9, abs=1e-15), step
    assert lrs[0] == pytest.approx(0.05)
    assert lrs[total // 2] == pytest.approx(0.025)
    assert lrs[total] == pytest.approx(0.0, abs=1e-15)
    # past the end it stays at zero rather than coming back up
    assert all(lr == pytest.approx(0.0, abs=1e-15) for lr in lrs[total:])
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def _plateau_reference(errors: list[float], lr: float, patience: int, max_drops: int) -> list[float]:
    """The paper's rule, independently: divide by 10 after patience+1 epochs without a strictly better
    validation error, at most max_drops times. Returns the lr in force after each epoch's check."""
    best, bad, drops, out = math.inf, 0, 0, []
    for e in errors:
        if e < best:
            best, bad = e, 0
        else:
            bad += 1
        if bad > patience:
            if drops < max_drops:
                lr, drops = lr / 10, drops + 1
            bad = 0
        out.append(lr)
    return out


def _plateau_run(cfg: TrainConfig, errors: list[float]) -> list[float]:
    opt = _optimizer(cfg.lr)
    sched = make_scheduler(opt, cfg, steps_per_epoch=10)
    assert not steps_each_iteration(sched)
    out = []
    for e in errors:
        opt.step()
        sched.step(e)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_plateau_flat_error() -> None:
    cfg = TrainConfig(schedule="plateau")
    assert (cfg.plateau_patience, cfg.max_lr_drops) == (2, 3)
    errors = [0.5] * 20
    got = _plateau_run(cfg, errors)
    # epoch 0 sets the best; epochs 1, 2, 3 do not improve: divided after epoch 3, then 6, then 9, then never
    want = [0.01] * 3 + [1e-3] * 3 + [1e-4] * 3 + [1e-5] * 11
    assert got == pytest.approx(want, rel=1e-9)
    assert got == pytest.approx(_plateau_reference(errors, 0.01, 2, 3), rel=1e-9)
    assert min(got) >= 0.01 * 1e-3 * (1 - 1e-9)


def test_plateau_improvements_reset_the_count() -> None:
    cfg = TrainConfig(schedule="plateau", plateau_patience=2)
    # any improvement counts (threshold 0), even a tiny one
    errors = [0.9, 0.8, 0.8, 0.8, 0.79999, 0.79999, 0.79999, 0.7999, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    got = _plateau_run(cfg, errors)
    want = _plateau_reference(errors, 0.01, 2, 3)
    assert got == pytest.approx(want, rel=1e-9)
    assert got[:11] == pytest.approx([0.01] * 11)  # never 3 non-improving epochs in a row until epoch 11
    assert got[11] == pytest.approx(1e-3)
    assert got[14] == pytest.approx(1e-4)


@pytest.mark.parametrize("patience, max_drops, lr", [(0, 3, 0.01), (1, 2, 0.1), (3, 1, 0.01), (2, 0, 0.01)])
def test_plateau_patience_and_max_drops(patience: int, max_drops: int, lr: float) -> None:
    cfg = TrainConfig(schedule="plateau", plateau_patience=patience, max_lr_drops=max_drops, lr=lr)
    g = torch.Generator().manual_seed(patience * 10 + max_drops)
    errors = (0.5 + 0.1 * torch.rand(40, generator=g)).tolist()
    got = _plateau_run(cfg, errors)
    assert got == pytest.approx(_plateau_reference(errors, lr, patience, max_drops), rel=1e-9)
    flat = _plateau_run(cfg, [0.5] * 40)
    assert min(flat) == pytest.approx(lr * 0.1**max_drops, rel=1e-9)
    assert len({round(math.log10(v), 6) for v in flat}) == max_drops + 1  # exactly max_drops divisions


@pytest.mark.parametrize("lr", [1e-4, 1e-6])
def test_plateau_small_learning_rate_still_divides_max_drops_times(lr: float) -> None:
    # a small base learning rate is valid (TrainConfig only asks lr > 0): the rule is the same
    cfg = TrainConfig(schedule="plateau", lr=lr)
    got = _plateau_run(cfg, [0.5] * 20)
    want = [lr] * 3 + [lr * 1e-1] * 3 + [lr * 1e-2] * 3 + [lr * 1e-3] * 11
    assert got == pytest.approx(want, rel=1e-9)


def test_lr_factor_rejects_plateau() -> None:
    with pytest.raises(ValueError):
        lr_factor(TrainConfig(schedule="plateau"), 10, 0)


@pytest.mark.parametrize("schedule", ["cosine", "step", "inverse-time", "plateau"])
def test_a_rollbacks_tenth_of_the_rate_holds_for_the_rest_of_the_schedule(schedule: str) -> None:
    """--on-nan rollback scales the rate by 0.1 mid-run: every later step runs at a tenth of what the
    schedule would have given, whichever schedule (not only the next step, until it recomputes)."""
    cfg = TrainConfig(schedule=schedule, epochs=8, lr=0.05, step_epochs=2, inverse_time_steps=3, plateau_patience=0)
    runs = []
    for scaled in (False, True):
        opt = _optimizer(cfg.lr)
        sched = make_scheduler(opt, cfg, steps_per_epoch=4)
        lrs = []
        for step in range(32):  # the plateau reaches its floor (3 drops) by then
            if scaled and step == 5:
                scale_learning_rate(opt, sched, 0.1)
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if steps_each_iteration(sched):
                sched.step()
            elif step % 4 == 3:
                sched.step(0.5)  # no improvement: the plateau divides after each epoch
        runs.append(lrs)
    plain, scaled = runs
    assert scaled[:5] == plain[:5]
    assert scaled[5:] == pytest.approx([lr * 0.1 for lr in plain[5:]], rel=1e-9, abs=1e-15)
    assert len(set(plain[5:])) > 1  # the schedule did move the rate after the rollback
