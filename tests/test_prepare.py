"""Prepared datasets: the same pixels, labels, statistics and batches as the folder pipeline, a killed
prepare that resumes to identical bytes, bad files left out, and a loader that shards and resumes."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_files, child_processes, running, write_image

from alexnet.data.augment import make_pixel_stats, train_batch
from alexnet.data.folders import EpochSampler, ImageDataset, image_moments, load_image, make_loader, open_split
from alexnet.data.prepare import check_dataset, prepare_dataset
from alexnet.data.prepared import PreparedLoader, open_prepared, read_manifest
from alexnet.errors import UserError
from alexnet.stopping import Interrupted

WNIDS = ("n01440764", "n02102040", "n02979186")  # tench, English springer, cassette player
FMTS = ("raw", "jpeg")


def make_source(root: Path, imagenette: Path, train: int = 6, val: int = 2) -> Path:
    """A 3-class ImageNet-layout folder: links to real Imagenette images (read in place) and one
    non-square PNG, whose short side scaling and centre crop the real 224x224 images do not exercise."""
    for split, n in (("train", train), ("val", val)):
        for wnid in WNIDS:
            (root / split / wnid).mkdir(parents=True)
            for f in sorted((imagenette / split / wnid).iterdir())[:n]:
                (root / split / wnid / f.name).symlink_to(f)
    write_image(root / "train" / WNIDS[1] / "wide.png", size=(300, 200), colour=(90, 160, 60))
    rows = [line for line in (imagenette / "classes.tsv").read_text().splitlines() if line.split("\t")[1] in WNIDS]
    (root / "classes.tsv").write_text("index\twnid\tname\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def source(imagenette_ci, tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "data", imagenette_ci)


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory) -> dict[str, Path]:
    """The source prepared in both formats (2 worker processes, small chunks)."""
    out = {}
    for fmt in FMTS:
        out[fmt] = tmp_path_factory.mktemp(fmt) / "prepared"
        prepare_dataset(source, out[fmt], fmt=fmt, workers=2, progress=False, chunk_size=4)
    return out


def folder_batches(source: Path, batch_size: int, seed: int, epoch: int) -> list:
    split = open_split(source, "train")
    sampler = EpochSampler(len(split.samples), seed, epoch)
    return list(make_loader(ImageDataset(split.samples), batch_size, 0, sampler))


@pytest.mark.parametrize("fmt", FMTS)
def test_round_trip(source, prepared, fmt):
    out = prepared[fmt]
    manifest = read_manifest(out)
    train, val = open_split(source, "train"), open_split(source, "val", classes=list(WNIDS))
    assert manifest["fmt"] == fmt and manifest["size"] == 256 and manifest["stats_split"] == "train"
    assert {k: v["images"] for k, v in manifest["splits"].items()} == {"train": 19, "val": 6}
    assert manifest["classes"] == list(WNIDS) and manifest["names"] == ["tench", "English springer", "cassette player"]
    for name, split in (("train", train), ("val", val)):
        prepared_split = open_prepared(out, name)
        assert prepared_split.labels.tolist() == [label for _, label in split.samples]
        assert (out / f"{name}_files.txt").read_text().splitlines() == [path for path, _ in split.samples]
    assert (out / "classes.tsv").read_text().splitlines()[1:] == [
        "0\tn01440764\ttench",
        "1\tn02102040\tEnglish springer",
        "2\tn02979186\tcassette player",
    ]
    assert (out / "bad.txt").read_text() == "" and not (out / ".progress").exists()
    assert check_dataset(out).startswith(f"{out}: ok, {fmt} 256x256, train 19, val 6 images, 3 classes")


def test_raw_images_are_load_image_exactly(source, prepared):
    split = open_prepared(prepared["raw"], "train")
    for i, (path, _) in enumerate(open_split(source, "train").samples):
        assert np.array_equal(split.images[i], load_image(path).numpy()), path


def test_statistics_are_image_moments_of_the_folder(source, prepared):
    mean, cov, count, _ = image_moments(make_loader(ImageDataset(open_split(source, "train").samples), 8, 0))
    raw = torch.load(prepared["raw"] / "stats.pt", weights_only=True)
    assert raw["images"] == count == 19
    torch.testing.assert_close(raw["mean_image"], mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(raw["covariance"], cov, rtol=0, atol=1e-6)
    # computed from the decoded sources, not the re-encoded JPEGs: the same for both formats
    jpeg = torch.load(prepared["jpeg"] / "stats.pt", weights_only=True)
    assert all(torch.equal(raw[k], jpeg[k]) for k in ("mean_image", "covariance"))


@pytest.mark.parametrize("fmt", FMTS)
def test_training_batches_equal_the_folder_path(source, prepared, fmt):
    moments = torch.load(prepared[fmt] / "stats.pt", weights_only=True)
    stats = make_pixel_stats(moments["mean_image"], moments["covariance"])
    loader = PreparedLoader(open_prepared(prepared[fmt], "train"), batch_size=8, seed=5, epoch=2)
    expected = folder_batches(source, 8, seed=5, epoch=2)
    got = list(loader)
    assert len(got) == len(expected) == len(loader) == 3
    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(a.labels, b.labels) and b.bad == [] and b.images.dtype == torch.uint8
        xa = train_batch(a.images, stats, torch.Generator().manual_seed(step))
        xb = train_batch(b.images, stats, torch.Generator().manual_seed(step))
        if fmt == "raw":
            assert torch.equal(xa, xb)
        else:  # pixels differ by the JPEG re-encoding only: about 1.5 levels of 255 on average at quality 90
            assert (xa - xb).abs().mean() < 3


@pytest.mark.parametrize("fmt", FMTS)
def test_killed_prepare_resumes_to_identical_bytes(source, prepared, fmt, tmp_path):
    out = tmp_path / "prepared"
    # a real SIGKILL part-way: decoding slowed down so that the kill lands inside the training split
    script = (
        "import sys, time\n"
        "import alexnet.data.prepare as p\n"
        "load = p.load_image\n"
        "p.load_image = lambda *a: (time.sleep(0.1), load(*a))[1]\n"
        f"p.prepare_dataset(sys.argv[1], sys.argv[2], fmt={fmt!r}, workers=0, progress=False, chunk_size=2)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(source), str(out)])
    state = out / ".progress" / "train.pt"
    deadline = time.monotonic() + 60
    while not state.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into a later chunk
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL and state.exists() and not (out / "manifest.json").exists()
    done = torch.load(state, weights_only=True)["done"]
    assert 0 < done < 19

    # resumed with other workers and chunks: neither changes a byte
    prepare_dataset(source, out, fmt=fmt, workers=2, progress=False, chunk_size=3)
    assert_same_files(out, prepared[fmt])


# `alexnet prepare` with 2 workers, decoding slowed down (0.4 s a chunk of 2), so that signals land mid-split
SLOW_PREPARE = """
import functools, sys, time
import alexnet.data.prepare as p
from alexnet.cli import main
load = p.load_image
p.load_image = lambda *a: (time.sleep(0.2), load(*a))[1]
p.prepare_dataset = functools.partial(p.prepare_dataset, chunk_size=2)
sys.exit(main(["prepare", *sys.argv[1:], "--workers", "2", "--no-progress"]))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists worker processes from Linux's /proc")
@pytest.mark.parametrize(
    "signum, to",
    [
        (signal.SIGTERM, "process"),  # preemption of the main process alone
        (signal.SIGTERM, "group"),  # the whole group: the workers die of it
        (signal.SIGINT, "group"),  # Ctrl-C in a terminal: the workers ignore it
        (signal.SIGTERM, "process twice"),  # a second signal ends the process at once, and its workers with it
        (signal.SIGKILL, "a worker"),  # the kernel's OOM killer
    ],
)
def test_a_signal_stops_prepare_in_one_line_and_it_resumes_to_identical_bytes(source, prepared, signum, to, tmp_path):
    out = tmp_path / "prepared"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_PREPARE, str(source), str(out)],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a shell gives a command
    )
    deadline = time.monotonic() + 60
    while not (out / ".progress" / "train.pt").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = child_processes(child.pid)
    assert len(workers) == 2, "the pool's workers are running"
    if to == "a worker":
        os.kill(min(workers), signum)
    elif to == "group":
        os.killpg(child.pid, signum)
    else:
        child.send_signal(signum)
        if to == "process twice":
            time.sleep(0.05)
            child.send_signal(signum)
    _, err = child.communicate(timeout=60)

    assert "Traceback" not in err and "Error" not in err, err
    if to == "process twice":  # the default action
        assert child.returncode == -signum
    else:
        done = torch.load(out / ".progress" / "train.pt", weights_only=True)["done"]
        assert 0 < done < 19
        if to == "a worker":
            assert child.returncode == 2
            said = f"error: a worker process of prepare died (killed, or out of memory?) with {done} of 19 train"
        else:
            assert child.returncode == 128 + signum
            said = f"stopped by {signal.Signals(signum).name} with {done} of 19 train"
        assert err.strip().splitlines() == [f"alexnet: {said} images done; run the same prepare again to resume"]
    time.sleep(0.5)  # no worker is left behind, whichever way the main process ended
    assert not [pid for pid in workers if running(pid)]
    assert not (out / "manifest.json").exists()

    prepare_dataset(source, out, fmt="raw", workers=2, progress=False, chunk_size=3)
    assert_same_files(out, prepared["raw"])


def test_a_signal_before_the_decoding_stops_at_once_in_one_line(source, tmp_path, monkeypatch):
    import alexnet.data.prepare as prepare_module

    def listing_then_signal(*args):
        found = real(*args)
        os.kill(os.getpid(), signal.SIGTERM)
        return found

    real = prepare_module._open_splits
    monkeypatch.setattr(prepare_module, "_open_splits", listing_then_signal)
    with pytest.raises(Interrupted, match="^stopped by SIGTERM before any image was prepared$") as stopped:
        prepare_dataset(source, tmp_path / "out", workers=0, progress=False)
    assert stopped.value.then == "run the same prepare again to resume"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_bad_files_are_listed_and_left_out(imagenette_ci, tmp_path):
    src = make_source(tmp_path / "src", imagenette_ci, train=3, val=1)
    good = next((src / "train" / WNIDS[0]).iterdir())
    (src / "train" / WNIDS[0] / "truncated.JPEG").write_bytes(good.read_bytes()[:300])
    (src / "train" / WNIDS[2] / "text.JPEG").write_text("not an image")
    out = tmp_path / "prepared"
    manifest = prepare_dataset(src, out, workers=0, progress=False, chunk_size=4)

    bad = (out / "bad.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in bad) == sorted(
        str(src / "train" / d / f) for d, f in ((WNIDS[0], "truncated.JPEG"), (WNIDS[2], "text.JPEG"))
    )
    counts = manifest["splits"]["train"]
    assert (counts["sources"], counts["images"], counts["excluded"]) == (12, 10, 2)
    split = open_prepared(out, "train")
    files = (out / "train_files.txt").read_text().splitlines()
    assert len(files) == len(split) == 10 and not any(f.endswith(("truncated.JPEG", "text.JPEG")) for f in files)
    for i, path in enumerate(files):  # labels, files and images stay aligned after the gaps
        assert f"/{WNIDS[split.labels[i]]}/" in path
        assert np.array_equal(split.images[i], load_image(path).numpy())
    assert torch.load(out / "stats.pt", weights_only=True)["images"] == 10
    check_dataset(out)


def test_mostly_unreadable_split_is_a_user_error(tmp_path):
    for i in range(5):
        (tmp_path / "src" / "val" / "n0" / f"{i}.JPEG").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "val" / "n0" / f"{i}.JPEG").write_text("not an image")
    write_image(tmp_path / "src" / "val" / "n1" / "ok.png")
    with pytest.raises(UserError, match=r"of 6 files in val/ cannot be read as images"):
        prepare_dataset(tmp_path / "src", tmp_path / "out", workers=0, progress=False, chunk_size=2)


def test_a_dataset_with_only_a_val_split(tmp_path):
    for wnid, colour in (("n0", (200, 20, 20)), ("n1", (20, 20, 200))):
        for i in range(3):
            write_image(tmp_path / "src" / "val" / wnid / f"{i}.png", colour=colour)
    manifest = prepare_dataset(tmp_path / "src", tmp_path / "out", workers=0, progress=False)
    assert list(manifest["splits"]) == ["val"] and manifest["stats_split"] == "val"
    assert torch.load(tmp_path / "out" / "stats.pt", weights_only=True)["images"] == 6


def test_rerun_and_foreign_folders(source, prepared, tmp_path):
    before = (prepared["raw"] / "manifest.json").stat().st_mtime_ns
    prepare_dataset(source, prepared["raw"], workers=0, progress=False)  # finished, same settings: nothing to do
    assert (prepared["raw"] / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="already holds a prepared dataset"):
        prepare_dataset(source, prepared["raw"], fmt="jpeg", workers=0, progress=False)
    (tmp_path / "other" / "x").mkdir(parents=True)
    with pytest.raises(UserError, match="is not a prepared dataset; pick a new or empty folder"):
        prepare_dataset(source, tmp_path / "other", workers=0, progress=False)
    with pytest.raises(UserError, match="format must be 'raw' or 'jpeg'"):
        prepare_dataset(source, tmp_path / "new", fmt="png", progress=False)


def test_ranks_take_disjoint_shares_that_make_up_each_batch(prepared):
    split = open_prepared(prepared["raw"], "train")
    whole = PreparedLoader(split, batch_size=8, seed=1, epoch=0, threads=0)
    for world in (2, 3):
        ranks = [PreparedLoader(split, 8, seed=1, epoch=0, rank=r, world_size=world) for r in range(world)]
        for step in range(len(whole)):
            shares = [r.batch_indices(step) for r in ranks]
            assert np.array_equal(np.concatenate(shares), whole.batch_indices(step))
        seen = np.concatenate([r.batch_indices(s) for r in ranks for s in range(len(whole))])
        assert sorted(seen.tolist()) == list(range(19))  # every image once per epoch
        for step, (batch, *shares) in enumerate(zip(whole, *ranks, strict=True)):
            assert torch.equal(batch.images, torch.cat([s.images for s in shares])), step
    dropped = [PreparedLoader(split, 8, rank=r, world_size=3, drop_last=True) for r in range(3)]
    assert all(len(d) == 2 and all(len(b.labels) > 0 for b in d) for d in dropped)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("threads", [0, 2])
def test_mid_epoch_start_gives_the_remaining_batches(prepared, fmt, threads):
    split = open_prepared(prepared[fmt], "train")
    full = list(PreparedLoader(split, batch_size=4, seed=3, epoch=1, threads=threads))
    rest = list(PreparedLoader(split, batch_size=4, seed=3, epoch=1, start_step=2, threads=threads, prefetch=1))
    assert len(full) == 5 and len(rest) == 3
    for a, b in zip(full[2:], rest, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("threads", [0, 2])
def test_batch_memory_is_reused_only_once_no_tensor_uses_it(prepared, fmt, threads):
    split = open_prepared(prepared[fmt], "train")
    expected = [b.images.clone() for b in PreparedLoader(split, batch_size=2, seed=4, threads=0)]
    kept, views, addresses = {}, {}, set()
    for step, batch in enumerate(PreparedLoader(split, batch_size=2, seed=4, threads=threads, prefetch=2)):
        addresses.add(batch.images.data_ptr())
        if step % 3 == 0:
            kept[step] = batch.images  # still in use: must never be overwritten
        elif step % 3 == 1:
            views[step] = batch.images[:, 1:].numpy()  # a view keeps it in use too
        # else dropped: its memory may hold a later batch
    assert len(expected) == 10
    for step, images in kept.items():
        assert torch.equal(images, expected[step]), step
    for step, view in views.items():
        assert np.array_equal(view, expected[step][:, 1:].numpy()), step
    assert len(addresses) < 10  # the dropped batches' memory was used again


def test_a_raw_file_cut_short_while_open_is_a_user_error(prepared, tmp_path):
    shutil.copytree(prepared["raw"], tmp_path / "copy")
    split = open_prepared(tmp_path / "copy", "train")
    with open(split.path, "r+b") as f:
        f.truncate(split.path.stat().st_size // 2)
    with pytest.raises(UserError, match=r"train_images\.u8 ends before image \d+; check it with alexnet prepare"):
        list(PreparedLoader(split, batch_size=4, threads=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("fmt", FMTS)
def test_loader_on_the_gpu(prepared, fmt):
    split = open_prepared(prepared[fmt], "train")
    cpu = list(PreparedLoader(split, batch_size=8))
    gpu = list(PreparedLoader(split, batch_size=8, device="cuda", pin_memory=True))
    for a, b in zip(cpu, gpu, strict=True):
        assert b.images.is_cuda and torch.equal(a.labels, b.labels.cpu())
        assert (a.images.float() - b.images.cpu().float()).abs().mean() < 1  # nvjpeg vs libjpeg-turbo IDCT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_raw_batches_reach_the_gpu_while_the_consumers_stream_is_busy(prepared):
    """The copy runs on the loader's stream, not after the kernels queued on the consumer's stream, and
    what the consumer queues next waits for it."""
    split = open_prepared(prepared["raw"], "train")
    want = [int(b.images.sum(dtype=torch.int64)) for b in PreparedLoader(split, batch_size=8)]
    loader = PreparedLoader(split, batch_size=8, device="cuda", pin_memory=True)
    batches = iter(loader)
    first = next(batches)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # the consumer's stream busy for some 0.1 s
    busy = torch.cuda.Event()
    busy.record()
    second = next(batches)
    reader = torch.cuda.Stream()  # reads the batch as soon as the loader's copy is done
    reader.wait_stream(loader.copy_stream)
    with torch.cuda.stream(reader):
        early = second.images.sum(dtype=torch.int64)
    reader.synchronize()
    assert not busy.query() and int(early) == want[1]  # there before the consumer's stream was free
    sums = [first.images.sum(dtype=torch.int64), second.images.sum(dtype=torch.int64)]
    while True:  # each copy held back on its stream: the consumer's sums still wait for it
        with torch.cuda.stream(loader.copy_stream):
            torch.cuda._sleep(20_000_000)
        batch = next(batches, None)
        if batch is None:
            break
        sums.append(batch.images.sum(dtype=torch.int64))
    assert [int(s) for s in sums] == want


@pytest.mark.parametrize("fmt", FMTS)
def test_check_dataset_finds_damage(prepared, fmt, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared[fmt], out)
    assert "ok" in check_dataset(out)
    images = out / ("train_images.u8" if fmt == "raw" else "train_jpegs.bin")
    with open(images, "r+b") as f:
        f.truncate(images.stat().st_size - 1000)
    with pytest.raises(UserError, match=r"train_(images\.u8|jpegs\.bin) holds \d+ bytes"):
        check_dataset(out)
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match="is not a finished prepared dataset"):
        check_dataset(out)


def test_names_not_utf8_are_prepared_and_line_breaks_left_out(tmp_path):
    """A file name that is not UTF-8 is prepared and listed as the bytes it is on disk; one holding a
    line break, which the line-per-file lists cannot hold, is left out and named (escaped) in bad.txt.
    Either way the finished dataset passes its own check."""
    src = tmp_path / "src"
    for wnid, colour in (("n0", (200, 20, 20)), ("n1", (20, 20, 200))):
        for i in range(2):
            write_image(src / "train" / wnid / f"{i}.png", colour=colour)
    n0, n1 = os.fsencode(src / "train" / "n0"), src / "train" / "n1"
    with open(n0 + b"/caf\xe9.png", "wb") as f:
        f.write((src / "train" / "n0" / "0.png").read_bytes())
    (n1 / "new\nline.png").write_bytes((n1 / "0.png").read_bytes())
    for fmt, workers in (("raw", 0), ("jpeg", 2)):
        out = tmp_path / fmt
        counts = prepare_dataset(src, out, fmt=fmt, workers=workers, progress=False)["splits"]["train"]
        assert (counts["sources"], counts["images"], counts["excluded"]) == (6, 5, 1)
        files = (out / "train_files.txt").read_bytes().splitlines()
        assert len(files) == 5 and n0 + b"/caf\xe9.png" in files
        assert (out / "bad.txt").read_bytes().decode() == (
            f"{n1}/new\\nline.png\tfile name holds a line break, which the lists of files cannot hold\n"
        )
        assert check_dataset(out, progress=False).startswith(f"{out}: ok")
        split = open_prepared(out, "train")
        assert split.sources[files.index(n0 + b"/caf\xe9.png")] == os.fsdecode(n0 + b"/caf\xe9.png")


def damage_jpeg(out: Path, split: str, i: int) -> None:
    """Image i of a JPEG-format split no longer decodes: its first bytes (the JPEG marker) zeroed."""
    offset = int(open_prepared(out, split).offsets[i])
    with open(out / f"{split}_jpegs.bin", "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * 4)


def test_check_decodes_every_jpeg_and_names_the_bad_ones(prepared, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared["jpeg"], out)
    damage_jpeg(out, "train", 5)  # not one of the 16 images an earlier check sampled
    source = (out / "train_files.txt").read_text().splitlines()[5]
    with pytest.raises(UserError, match=rf"1 of 19 images in .*train_jpegs\.bin do not decode: image 5 \({source}\)"):
        check_dataset(out, progress=False)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("threads", [0, 2])
def test_a_jpeg_that_does_not_decode_is_skipped_and_named(prepared, tmp_path, device, threads):
    """As the folder path does with an unreadable file: left out of its batch and named in the batch's
    bad list (and so in the run's bad_files.txt); the rest of the batch and the other batches as before."""
    out = tmp_path / "copy"
    shutil.copytree(prepared["jpeg"], out)
    damage_jpeg(out, "train", 5)
    source = (out / "train_files.txt").read_text().splitlines()[5]
    options = dict(batch_size=4, seed=2, device=device, pin_memory=device == "cuda", threads=threads)
    expected = list(PreparedLoader(open_prepared(prepared["jpeg"], "train"), **options))
    loader = PreparedLoader(open_prepared(out, "train"), **options)
    got = list(loader)
    assert len(got) == len(expected) == 5
    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        idx = loader.batch_indices(step).tolist()
        keep = [j for j, i in enumerate(idx) if i != 5]
        assert torch.equal(b.labels.cpu(), a.labels.cpu()[keep]) and torch.equal(b.images.cpu(), a.images.cpu()[keep])
        if 5 in idx:
            assert len(b.bad) == 1 and b.bad[0].startswith(f"{source}\tRuntimeError: ")
            assert b.bad[0].endswith("(image 5 of train_jpegs.bin)")
        else:
            assert b.bad == []
