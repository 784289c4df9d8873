"""The training step in each precision and layout, the DDP shares of a batch, and `alexnet benchmark`."""

import pytest
import torch
import torch.nn.functional as F

from alexnet.data.augment import make_pixel_stats, train_batch
from alexnet.data.folders import EpochBatches, rank_share
from alexnet.errors import UserError
from alexnet.inspect.bench import Measure, format_table, plain_twin, run_benchmark
from alexnet.model.net import build_model
from alexnet.train.step import TrainStep, make_optimizer, resolve_precision

STATS = make_pixel_stats(torch.full((3, 240, 240), 0.4), torch.eye(3) * 0.02)


def one_step(precision: str, channels_last: bool, images, labels) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("paper", 10, dropout=0.0, init="caffe")
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = TrainStep(model, optimizer, STATS, 224, 0.1, precision, channels_last)
    loss_sum, correct = step(images, labels, torch.Generator().manual_seed(1))
    assert loss_sum.dtype == torch.float32 and correct.dtype == torch.int64
    return float(loss_sum), model.features[0].weight.detach().clone()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 3, 240, 240), dtype=torch.uint8, generator=g), torch.randint(
        0, 10, (6,), generator=g
    )


def test_bf16_and_channels_last_stay_close_to_fp32(batch):
    loss32, w32 = one_step("fp32", False, *batch)
    loss_nhwc, w_nhwc = one_step("fp32", True, *batch)
    loss16, w16 = one_step("bf16", True, *batch)
    assert loss_nhwc == pytest.approx(loss32, rel=1e-5)
    # Both runs start from the same conv1 weights (N(0, 0.01), up to 0.04): what differs is the update,
    # at most 4e-5 here and scaling with the init (3x with fc6 and fc7 N(0, 0.01)), so the tolerance is
    # relative to it. NCHW matches float64 to 4e-5 of the update's largest value, NHWC to ~1%: where a
    # pool window's two largest values differ by less than fp32's error in them (relu5: 0.34806099 and
    # 0.34806081 in float64, the other way round in NHWC) the window's gradient goes to the other one,
    # and from there back through every earlier layer (measured 0.9%; 1.1% with fc6 and fc7 N(0, 0.01);
    # at most 1.1% over 8 seeds of each). 5% leaves a margin; a layout bug moves the update by its size.
    w0 = one_step_initial_conv1()
    update32, update_nhwc, update16 = w32 - w0, w_nhwc - w0, w16 - w0
    torch.testing.assert_close(update_nhwc, update32, rtol=0, atol=0.05 * update32.abs().max().item())
    assert loss16 == pytest.approx(loss32, rel=2e-2)  # bf16 keeps 8 bits of mantissa
    assert loss16 != loss32  # it did compute in bf16
    cosine = torch.nn.functional.cosine_similarity(update32.flatten(), update16.flatten(), dim=0)
    assert cosine > 0.95  # measured 0.97; an unrelated update would be near 0


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_step_asks_for_the_batch_in_the_type_conv1_computes_in(batch, precision, dtype, monkeypatch):
    """On CUDA the augmentation stores the batch in autocast's 16-bit type (here the CPU: the step asks)."""
    import alexnet.train.step as step_module

    asked = []

    def spy(*args):
        asked.append(args[-1])
        return train_batch(*args)

    monkeypatch.setattr(step_module, "train_batch", spy)
    one_step(precision, True, *batch)
    assert asked == [dtype]


def one_step_initial_conv1() -> torch.Tensor:
    torch.manual_seed(0)
    return build_model("paper", 10, dropout=0.0, init="caffe").features[0].weight.detach()


def test_precision_choices():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(UserError, match="fp16 training needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(UserError, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_of_the_augmentation_make_up_the_whole_batch(batch, world_size):
    images = batch[0]
    whole = train_batch(images, STATS, torch.Generator().manual_seed(5), 64)
    shares = []
    for rank in range(world_size):
        rows = rank_share(list(range(len(images))), rank, world_size)
        gen = torch.Generator().manual_seed(5)
        shares.append(train_batch(images[rows[0] : rows[-1] + 1], STATS, gen, 64, 0.1, rows[0], len(images)))
    assert torch.equal(torch.cat(shares), whole)


def test_epoch_batches_shares_are_disjoint_and_complete():
    n, batch, world = 23, 4, 3
    whole = list(EpochBatches(n, batch, seed=1, epoch=2))
    per_rank = [list(EpochBatches(n, batch, seed=1, epoch=2, rank=r, world_size=world)) for r in range(world)]
    assert len(whole) == 6 and all(len(p) == 6 for p in per_rank)
    for step, indices in enumerate(whole):
        assert sum((p[step] for p in per_rank), []) == indices
    assert list(EpochBatches(n, batch, seed=1, epoch=2, start_step=4)) == whole[4:]


def test_benchmark_measures_against_the_torchvision_baseline(tmp_path, tiny_dataset):
    from alexnet.data.prepare import prepare_dataset

    prepared = tmp_path / "prepared"
    prepare_dataset(tiny_dataset, prepared, workers=0, progress=False)
    results, settings = run_benchmark("paper", 2, "cpu", data=str(prepared), steps=1, warmup=1, rounds=2)
    names = ["torchvision fp32 eager", "plain eager twin", "paper model-only", "paper end-to-end"]
    assert [m.name for m in results] == names
    assert all(m.images_per_s > 0 and len(m.rounds) == 2 for m in results)
    table = format_table(results, settings)
    assert "precision fp32" in table and "1.00x" in table.splitlines()[2]
    twin, ours = results[1].images_per_s, results[2].images_per_s
    assert table.splitlines()[4].split()[4] == f"{ours / twin:.2f}x"  # model-only against the twin
    with pytest.raises(UserError, match="not a prepared dataset"):
        run_benchmark("paper", 2, "cpu", data=str(tiny_dataset))
    with pytest.raises(UserError, match="18 training images, fewer than one batch of 32"):
        run_benchmark("paper", 32, "cpu", data=str(prepared))
    prepare_dataset(tiny_dataset, tmp_path / "small", size=72, workers=0, progress=False)
    with pytest.raises(UserError, match="holds 72px images; the benchmark's 224x224 crops need 224 or more"):
        run_benchmark("paper", 2, "cpu", data=str(tmp_path / "small"))
    # without the baseline, no ratio: not even for the torchvision preset's own first row
    alone = format_table([Measure("torchvision model-only", 10.0, [10.0])], settings)
    assert alone.splitlines()[2].split()[3] == "-"


@pytest.mark.parametrize("preset", ["paper", "seed"])
def test_the_plain_twin_is_the_presets_network(preset):
    """The benchmark's second baseline computes what the preset computes, from the same parameters."""
    torch.manual_seed(0)
    ours, twin = build_model(preset, 10, init="kaiming").eval(), plain_twin(preset, 10).eval()
    mine, its = list(ours.parameters()), list(twin.parameters())
    assert [p.shape for p in mine] == [p.shape for p in its]
    with torch.no_grad():
        for a, b in zip(its, mine, strict=True):
            a.copy_(b)
        x = torch.randn(2, 3, 224, 224) * 60  # the paper's raw 0-255 scale: LRN's terms matter
        expected = ours(x)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(twin(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_benchmark_measures_other_lrn_kernels_where_asked(monkeypatch):
    """--lrn-kernels: the measured step's LRN runs in the kernels named (CPU training's default would
    be 'compiled'); --fuse-lrn and Triton need CUDA, and a preset without LRN has none to change."""
    from alexnet.model import lrn

    used = []  # "eager": the formulas' terms, once per forward; other kernels by name, as lrn._run gets them
    real_kernel, real_terms = lrn._kernel, lrn._lrn_terms
    monkeypatch.setattr(
        lrn, "_kernel", lambda kernels, backward: used.append(kernels) or real_kernel(kernels, backward)
    )
    monkeypatch.setattr(lrn, "_lrn_terms", lambda *a: used.append("eager") or real_terms(*a))
    results, settings = run_benchmark(
        "paper", 2, "cpu", steps=1, warmup=1, rounds=1, baseline=False, lrn_kernels="eager"
    )
    assert used == ["eager"] * 4  # 2 LRN layers, 2 steps
    assert settings["lrn_kernels"] == "eager" and "lrn_kernels eager" in format_table(results, settings)
    for kwargs, message in [
        ({"lrn_kernels": "fast"}, "unknown LRN kernels 'fast'"),
        ({"lrn_kernels": "triton-band"}, "need CUDA"),
        ({"fuse_lrn": True}, "need CUDA"),
    ]:
        with pytest.raises(UserError, match=message):
            run_benchmark("paper", 2, "cpu", **kwargs)
    with pytest.raises(UserError, match="the torchvision preset has no LRN"):
        run_benchmark("torchvision", 2, "cpu", lrn_kernels="eager")


def test_compiled_step_follows_eager(batch):
    """--compile: the same step through torch.compile (inductor; about half a minute to compile here)."""
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model("torchvision", 10, dropout=0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = TrainStep(torch.compile(model) if compiled else model, optimizer, STATS, 64, 0.1, "fp32", True)
        losses[compiled] = [float(step(*batch, torch.Generator().manual_seed(i))[0]) for i in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[False][2] != losses[False][0]  # the steps changed the weights


def test_the_augmented_batch_memory_is_kept_across_a_smaller_last_batch():
    """An epoch's last batch is smaller: it uses the start of the buffer, which stays for the next epoch."""
    torch.manual_seed(0)
    model = build_model("torchvision", 10, dropout=0.0)
    stats = make_pixel_stats(torch.full((3, 72, 72), 0.4), torch.eye(3) * 0.02)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), stats, 64, 0.1, "fp32", False)
    images = torch.randint(0, 256, (6, 3, 72, 72), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    step(images, torch.zeros(6, dtype=torch.int64), torch.Generator().manual_seed(1))
    memory = step.buffer.data_ptr()
    for b in (4, 6):
        step(images[:b], torch.zeros(b, dtype=torch.int64), torch.Generator().manual_seed(2))
        assert step.buffer.data_ptr() == memory and len(step.buffer) == 6
        fresh = train_batch(images[:b], stats, torch.Generator().manual_seed(2), 64)
        reused = train_batch(images[:b], stats, torch.Generator().manual_seed(2), 64, out=step.buffer)
        assert reused.data_ptr() == memory and torch.equal(reused, fresh)


def test_fused_sgd_gives_the_same_weights_bit_for_bit() -> None:
    """make_optimizer's fused SGD against torch's reference loop, over steps with momentum, weight decay
    and a learning-rate change, parameters left without gradient (frozen layers) included."""
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 27), (64,), (4096, 96), (10, 4096)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        if fused:
            optimizer = make_optimizer(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
        else:
            optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=False)
        for i, step_grads in enumerate(grads):
            for p, grad in zip(params, step_grads, strict=True):
                p.grad = None if p is params[1] else grad.clone()
            if i == 2:
                optimizer.param_groups[0]["lr"] = 0.001
            optimizer.step()
        results.append(params)
    assert optimizer.param_groups[0]["fused"]
    for want, got in zip(*results, strict=True):
        assert torch.equal(want, got)
    assert torch.equal(results[1][1], start[1])  # no gradient: untouched


def test_cuda_graph_steps_warm_up_capture_once_and_replay(batch, monkeypatch):
    """The order of a graphed TrainStep, with CUDA's graph and stream calls replaced by recorders (the
    arithmetic of replays is tests/test_cuda.py's): 3 eager steps on a side stream, a capture with the
    learning rate as a device tensor, replays with the current learning rate copied in, another shape
    eager, and after forget_graph() the same again."""
    import contextlib

    import alexnet.train.step as step_module

    events = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def capture(graph, capture_error_mode):
        events.append("capture")
        lrs.append(optimizer.param_groups[0]["lr"])
        yield

    monkeypatch.setattr(step_module, "resolve_cuda_graphs", lambda *a: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: events.append("side") or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    images, labels = batch
    model = build_model("paper", 10, init="caffe")
    optimizer = make_optimizer(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    step = TrainStep(model, optimizer, STATS, 224, 0.1, "fp32", True, cuda_graph=True)
    lrs = []

    def run(n: int = 6) -> str:
        events.clear()
        loss, correct = step(images[:n], labels[:n], torch.Generator().manual_seed(0))
        assert step.graph is None or loss.data_ptr() != step.graph.loss.data_ptr()  # not the graph's own
        return " ".join(events) or "eager"

    assert [run() for _ in range(5)] == ["side", "side", "side", "capture replay", "replay"]
    assert isinstance(lrs[0], torch.Tensor) and isinstance(optimizer.param_groups[0]["lr"], float)
    assert run(4) == "eager" and run() == "replay"  # another shape: eager, and the graph is kept
    optimizer.param_groups[0]["lr"] = 0.002
    run()
    assert step.graph.lrs[0].item() == pytest.approx(0.002)
    step.forget_graph()
    assert [run() for _ in range(4)] == ["side", "side", "side", "capture replay"]


def test_cuda_graphs_are_the_default_where_they_apply_and_say_in_one_line_where_not():
    from alexnet.train.step import resolve_cuda_graphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_cuda_graphs(None, cuda, "bf16", False, False) is True
    assert resolve_cuda_graphs(None, cuda, "fp32", False, False) is True
    assert resolve_cuda_graphs(True, cuda, "bf16", False, False) is True
    assert resolve_cuda_graphs(False, cuda, "bf16", False, False) is False
    for args, says in (
        ((cpu, "fp32", False, False), "need a CUDA device"),
        ((cuda, "fp16", False, False), "not fp16"),
        ((cuda, "bf16", True, False), "--compile"),
        ((cuda, "bf16", False, True), "DDP"),
    ):
        assert resolve_cuda_graphs(None, *args) is False  # the default: off, silently
        assert resolve_cuda_graphs(False, *args) is False
        with pytest.raises(UserError, match=says):
            resolve_cuda_graphs(True, *args)  # asked for: refused in one line
    model = build_model("paper", 10)
    optimizer = make_optimizer(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0)
    with pytest.raises(UserError, match="need a CUDA device"):
        TrainStep(model, optimizer, STATS, 224, 0.1, "fp32", True, cuda_graph=True)
    with pytest.raises(UserError, match="need a CUDA device"):
        run_benchmark("paper", 2, "cpu", cuda_graphs=True)


def test_one_step_is_sgd_on_the_mean_loss_and_counts_the_right_answers():
    """Plain SGD (no momentum, no decay) moves every weight by exactly -lr * d(mean cross-entropy)/dw,
    computed here by autograd on the same augmented batch; the step returns the loss summed over the
    batch and the number of images whose top class is the label (n - 1 of them here)."""
    import copy

    torch.manual_seed(0)
    model = build_model("torchvision", 5, dropout=0.0)
    before = copy.deepcopy(model)
    stats = make_pixel_stats(torch.full((3, 72, 72), 0.4), torch.eye(3) * 0.02)
    images = torch.randint(0, 256, (6, 3, 72, 72), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = train_batch(images, stats, torch.Generator().manual_seed(1), 64, 0.1)  # what the step will train on
    with torch.no_grad():
        labels = before(x).argmax(1)
    labels[0] = (labels[0] + 1) % 5  # one wrong answer: the count is 5, not 1 or 6
    loss = F.cross_entropy(before(x), labels)  # the mean over the batch
    grads = torch.autograd.grad(loss, list(before.parameters()))

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, optimizer, stats, 64, 0.1, "fp32", channels_last=False)
    loss_sum, correct = step(images, labels, torch.Generator().manual_seed(1))

    assert float(loss_sum) == pytest.approx(6 * loss.item(), rel=1e-5) and int(correct) == 5
    for w, w0, g in zip(model.parameters(), before.parameters(), grads, strict=True):
        torch.testing.assert_close(w.detach(), w0.detach() - 0.1 * g, rtol=1e-4, atol=1e-7)
    assert max(g.abs().max() for g in grads) > 1e-3  # the step did move the weights
