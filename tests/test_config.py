"""The paper's recipe as the default run (docs/reference.md §1 and §4): the values TrainConfig holds,
what resolved() fills in per preset, and the optimiser built from them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from alexnet.errors import UserError
from alexnet.model.lrn import LocalResponseNorm
from alexnet.model.net import build_model
from alexnet.train.config import TrainConfig
from alexnet.train.step import decay_groups, make_optimizer


def test_defaults_are_the_papers_recipe() -> None:
    # docs/reference.md §1: SGD, momentum 0.9, weight decay 5e-4, batch 128, 90 epochs, lr 0.01 divided
    # by 10 when the validation error stops improving (3 times in the paper); section 4: 256x256 images,
    # 224 crops, the mean image subtracted, PCA lighting with alpha ~ N(0, 0.1) along the training set's
    # colour axes, dropout 0.5
    c = TrainConfig()
    recipe = {
        "epochs": 90,
        "batch_size": 128,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "dropout": 0.5,
        "crop": 224,
        "image_size": 256,
        "mean": "pixel",
        "pca": "dataset",
        "lighting": 0.1,
        "schedule": "plateau",
        "plateau_patience": 2,
        "max_lr_drops": 3,
    }
    assert {k: getattr(c, k) for k in recipe} == recipe
    assert c.preset == "paper"


def test_resolved_fills_the_presets_scale_and_init() -> None:
    # the paper fed raw 0-255 pixels minus the mean (augment.py); torchvision's weights expect its std
    paper = TrainConfig().resolved()
    assert (paper.scale, paper.init) == ("raw", "kaiming")  # the paper's own init gives a flat loss (docs/learning.md)
    assert TrainConfig(preset="torchvision").resolved().scale == "imagenet"
    assert TrainConfig(scale="imagenet", init="caffe").resolved().scale == "imagenet"  # given ones are kept


def test_optimizer_is_sgd_with_the_given_momentum_and_weight_decay() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = make_optimizer([w], lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 5e-4)
    assert (group["dampening"], group["nesterov"]) == (0, False)
    # two steps against the paper's update (docs/reference.md §4):
    # v <- 0.9 v - 0.0005 lr w - lr grad; w <- w + v
    grads = [torch.tensor([0.3, 0.0, -0.1], dtype=torch.float64), torch.tensor([0.0, 0.2, 0.4], dtype=torch.float64)]
    want, v = w.detach().clone(), torch.zeros(3, dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        v = 0.9 * v - 0.0005 * 0.01 * want - 0.01 * g
        want = want + v
    torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-12)


def test_resolved_fills_the_presets_bias_decay() -> None:
    # cuda-convnet, the paper's code, gives biases no weight decay (wc = 0), nor does Caffe's bvlc_alexnet
    # (decay_mult: 0); torchvision's reference recipe decays every parameter
    assert TrainConfig().resolved().bias_decay is False
    assert TrainConfig(preset="seed").resolved().bias_decay is False
    assert TrainConfig(preset="torchvision").resolved().bias_decay is True
    assert TrainConfig(bias_decay=True).resolved().bias_decay is True  # a given one is kept
    # a run made before the option existed decayed its biases, and resumes doing so
    old = {k: v for k, v in dataclasses.asdict(TrainConfig().resolved()).items() if k != "bias_decay"}
    assert TrainConfig.from_dict(old).bias_decay is True


def test_resolved_fills_the_presets_lrn_per_tower() -> None:
    # the paper's two GPUs each normalised the maps they held; one tower (groups 1) or no towers: across
    assert TrainConfig().resolved().lrn_per_tower is True
    assert TrainConfig(groups=1).resolved().lrn_per_tower is False
    assert TrainConfig(preset="seed").resolved().lrn_per_tower is False
    assert TrainConfig(lrn_per_tower=False).resolved().lrn_per_tower is False  # Caffe's, asked for
    for bad in ({"preset": "seed"}, {"preset": "torchvision"}, {"groups": 1}):
        with pytest.raises(UserError, match="lrn_per_tower applies to the paper preset with its two towers"):
            TrainConfig(lrn_per_tower=True, **bad).resolved()
    # a run made before the option existed normalised across the towers, and resumes doing so
    old = {k: v for k, v in dataclasses.asdict(TrainConfig().resolved()).items() if k != "lrn_per_tower"}
    assert TrainConfig.from_dict(old).lrn_per_tower is False
    lrns = [m for m in TrainConfig.from_dict(old).build_model(10).modules() if isinstance(m, LocalResponseNorm)]
    assert [m.towers for m in lrns] == [1, 1]


@pytest.mark.parametrize("preset", ["paper", "torchvision"])
def test_the_optimizer_decays_the_biases_only_where_the_preset_does(preset: str) -> None:
    cfg = TrainConfig(preset=preset).resolved()
    # initialisations with biases that decay would visibly move (the paper's 1s, PyTorch's uniform ones)
    model = build_model(preset, num_classes=3, init="paper" if preset == "paper" else "default")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = make_optimizer(decay_groups(model, cfg.bias_decay), lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(before)  # every parameter, once
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # a zero gradient: what moves is the decay alone, w <- w - lr * 5e-4 * w
    for name, p in model.named_parameters():
        decayed = not name.endswith(".bias") or preset == "torchvision"
        want = before[name] * (1 - 0.01 * 5e-4) if decayed else before[name]
        torch.testing.assert_close(p.detach(), want, rtol=0 if not decayed else 1e-6, atol=0, msg=name)
    biases = [before[n] for n in before if n.endswith(".bias")]
    assert any(b.abs().max() > 0.01 for b in biases)  # biases that decay would visibly move (paper: 1s)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"momentum": 1.0}, r"^momentum must be below 1, not 1\.0$"),
        ({"momentum": 1.5}, r"^momentum must be below 1"),
        ({"momentum": -0.1}, r"^momentum must be a finite number >= 0"),
        ({"momentum": float("nan")}, r"^momentum must be a finite number >= 0"),
        ({"crop": 225, "image_size": 224}, r"^crop \(225\) must be positive and at most image_size \(224\)$"),
        ({"crop": 0}, r"^crop \(0\) must be positive"),
        ({"checkpoint_every": -1}, r"checkpoint_every cannot be negative$"),
    ],
    ids=["momentum=1", "momentum=1.5", "momentum<0", "momentum=nan", "crop>image_size", "crop=0", "checkpoint_every<0"],
)
def test_resolved_refuses_out_of_range_values(bad: dict, match: str) -> None:
    """momentum in [0, 1), 0 < crop <= image_size, checkpoint_every >= 0: else one line naming the option."""
    with pytest.raises(UserError, match=match) as e:
        TrainConfig(**bad).resolved()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edge",
    [{"momentum": 0.0}, {"momentum": 0.999}, {"crop": 224, "image_size": 224}, {"checkpoint_every": 0}],
    ids=["momentum=0", "momentum=0.999", "crop=image_size", "checkpoint_every=0"],
)
def test_resolved_accepts_values_just_inside_the_range(edge: dict) -> None:
    """The edges themselves are allowed: no momentum, a crop the whole image, a checkpoint per epoch."""
    c = TrainConfig(**edge).resolved()
    assert {k: getattr(c, k) for k in edge} == edge
