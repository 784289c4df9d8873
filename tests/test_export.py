"""Weights out: every export format, loaded back, gives PyTorch's logits on real images."""

import json
import os
import warnings

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import scoped_folder

from alexnet.checkpoint import load_checkpoint, save_checkpoint
from alexnet.cli import main
from alexnet.data.augment import center_batch, make_pixel_stats
from alexnet.data.folders import load_image
from alexnet.errors import UserError
from alexnet.interop.export import export_checkpoint, load_exported, load_for_inference, max_abs_difference
from alexnet.model.net import build_model
from alexnet.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # many small tensor ops: threads only contend


def make_checkpoint(path, preset: str, mean: str) -> str:
    """A checkpoint as training writes it (random weights, 10 classes), with a mean image or colour."""
    torch.manual_seed(0)
    model = build_model(preset, 10, init="kaiming" if preset == "paper" else None)
    cfg = TrainConfig(preset=preset, mean=mean).resolved()
    mean_image = torch.rand(3, 256, 256) * 0.2 + 0.4
    stats = make_pixel_stats(mean_image, torch.eye(3) * 0.01, cfg.mean, cfg.scale, cfg.pca)
    classes = [f"n{i:08d}" for i in range(10)]
    save_checkpoint(
        {
            "config": cfg.__dict__,
            "classes": classes,
            "names": [f"class {i}" for i in range(10)],
            "stats": stats.state_dict(),
            "model": model.state_dict(),
        },
        path,
    )
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    with scoped_folder(tmp_path_factory, "ckpt") as folder:
        yield {
            "torchvision": make_checkpoint(folder / "torchvision.pt", "torchvision", "channel"),
            "paper": make_checkpoint(folder / "paper.pt", "paper", "pixel"),  # a mean image, raw pixels
        }


@pytest.fixture(scope="module")
def images(imagenette_ci):
    folders = sorted((imagenette_ci / "val").iterdir())[:4]  # one photograph from each of 4 classes
    return [str(sorted(f.glob("*.JPEG"))[0]) for f in folders]


def assert_metadata_gives_predicts_input(run, meta: dict, folder, checkpoint: str, image: str) -> None:
    """A user with the export, its alexnet.json and mean file alone gets predict's logits for `image`."""
    info = meta["input"]
    size, std = info["shape"][2], np.array(info["std"], dtype=np.float32).reshape(3, 1, 1)
    pixels = load_image(image, info["image_size"])  # the shorter side scaled to image_size, the centre kept
    top = (info["image_size"] - size) // 2
    crop = pixels[:, top : top + size, top : top + size].numpy() / np.float32(255)
    x = torch.from_numpy((crop - np.load(folder / info["mean_file"])) / std)[None]
    model, stats, ckpt = load_for_inference(checkpoint, torch.device("cpu"))
    fed = center_batch(pixels[None], stats, ckpt["config"]["crop"])  # what predict gives the model
    assert (x - fed).abs().max() < 1e-5
    with torch.no_grad():
        assert (run(x).float() - model(fed)).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("preset", "size"),
    [("torchvision", 224), ("torchvision", 160), ("paper", 227), ("paper", 224)],
)
def test_onnx_matches_pytorch(checkpoints, images, tmp_path, preset, size):
    out = export_checkpoint(checkpoints[preset], "onnx", tmp_path / "model.onnx", input_size=size)
    diff, count, _ = max_abs_difference(out, checkpoints[preset], images, size)
    print(f"ONNX {preset} {size}x{size}: largest absolute difference {diff:.3g} over {count} images")
    assert count == 4 and diff < 1e-4
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    assert shape[1:] == [3, size, size] and not isinstance(shape[0], int)  # dynamic batch axis
    meta = json.loads(session.get_modelmeta().custom_metadata_map["alexnet.json"])
    assert meta["classes"][3] == "n00000003" and meta["input"]["shape"][2] == size
    if preset == "torchvision":  # a mean colour: alexnet.json holds it all
        assert meta["input"]["mean_file"] is None and not list(tmp_path.glob("*.npy"))
    elif size == 224:  # the paper checkpoint's crop, subtracting a mean image
        assert meta["input"]["mean_file"] == "model.onnx.mean.npy"
        assert_metadata_gives_predicts_input(load_exported(out), meta, tmp_path, checkpoints[preset], images[0])


@pytest.mark.parametrize(("fmt", "preset"), [("export", "torchvision"), ("export", "paper"), ("torchscript", "paper")])
def test_torch_formats_round_trip(checkpoints, images, tmp_path, capsys, fmt, preset):
    suffix = {"export": ".pt2", "torchscript": ".torchscript"}[fmt]
    out = export_checkpoint(checkpoints[preset], fmt, tmp_path / f"model{suffix}")
    diff, count, _ = max_abs_difference(out, checkpoints[preset], images)
    assert count == 4 and diff < 1e-4, diff
    run = load_exported(out)
    with torch.no_grad():  # another batch size than the export's example; the checkpoints' crop is 224
        assert run(torch.zeros(3, 3, 224, 224)).shape == (3, 10)
    if fmt == "torchscript":
        extra = {"alexnet.json": ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            torch.jit.load(str(out), _extra_files=extra)
        assert_metadata_gives_predicts_input(
            run, json.loads(extra["alexnet.json"]), tmp_path, checkpoints[preset], images[0]
        )
        # given as a checkpoint: one line that says what it is, not torch's notice first
        capsys.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["predict", "--checkpoint", str(out), images[0]]) == 2
        assert not [str(w.message) for w in caught]
        assert capsys.readouterr().err == (
            f"alexnet: error: {out} is a TorchScript export, not a checkpoint: give a checkpoint, run directory or"
            " .safetensors export\n"
        )


def test_exports_of_one_stem_keep_their_own_mean_files(checkpoints, images, tmp_path):
    """model.torchscript at 224 and model.pt2 at 227 subtract different crops of the mean image."""
    for fmt, suffix, size in [("torchscript", ".torchscript", 224), ("export", ".pt2", 227)]:
        export_checkpoint(checkpoints["paper"], fmt, tmp_path / f"model{suffix}", input_size=size)
    for suffix, size in [(".torchscript", 224), (".pt2", 227)]:
        assert np.load(tmp_path / f"model{suffix}.mean.npy").shape == (3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        extra = {"alexnet.json": ""}
        torch.jit.load(str(tmp_path / "model.torchscript"), _extra_files=extra)
    run = load_exported(tmp_path / "model.torchscript")
    assert_metadata_gives_predicts_input(
        run, json.loads(extra["alexnet.json"]), tmp_path, checkpoints["paper"], images[0]
    )


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_an_export_stopped_halfway_leaves_the_previous_files_alone(checkpoints, tmp_path, monkeypatch, stop):
    out = tmp_path / "model.pt2"
    export_checkpoint(checkpoints["paper"], "export", out, input_size=224)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["model.pt2", "model.pt2.mean.npy"]

    real_save = torch.export.save

    def save_then_stop(program, path, **kwargs):
        real_save(program, path, **kwargs)  # the new graph is written in full, then the stop comes
        raise stop

    monkeypatch.setattr(torch.export, "save", save_then_stop)
    with pytest.raises(type(stop)) as e:
        export_checkpoint(checkpoints["paper"], "export", out, input_size=227)
    if isinstance(stop, OSError):
        assert "the previous model.pt2 is unchanged" in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no orphan, no temporary, no mix


def test_safetensors_loads_back_without_pickle(checkpoints, images, tmp_path, capsys):
    out = tmp_path / "paper.safetensors"
    assert main(["export", "--checkpoint", checkpoints["paper"], "--format", "safetensors", "--out", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask == os.stat(checkpoints["paper"]).st_mode & 0o777
    assert not list(tmp_path.glob("*.npy"))  # the mean image is in the file
    model, stats, ckpt = load_for_inference(out, torch.device("cpu"))
    reference, ref_stats, ref_ckpt = load_for_inference(checkpoints["paper"], torch.device("cpu"))
    assert ckpt["classes"] == ref_ckpt["classes"] and ckpt["config"] == ref_ckpt["config"]
    assert torch.equal(stats.mean, ref_stats.mean)  # the mean image travels as a tensor
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert max_abs_difference(out, checkpoints["paper"], images)[0] == 0
    # the rest of the project takes it as a checkpoint
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), "--json", images[0]]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 5


def off_by_one(checkpoint: str, path) -> str:
    """`checkpoint` with fc8's bias for class 0 raised by 1: its logits differ from the original's by 1."""
    state = load_checkpoint(checkpoint)
    fc8_bias = [k for k in state["model"] if k.endswith(".bias")][-1]
    state["model"][fc8_bias][0] += 1
    save_checkpoint(state, path)
    return str(path)


def test_cli_export_checks_against_pytorch(checkpoints, images, tmp_path, capsys, monkeypatch):
    import alexnet.interop.export

    out = tmp_path / "tv.pt2"
    args = ["export", "--checkpoint", checkpoints["torchvision"], "--format", "export", "--out", str(out)]
    assert main([*args, "--check", *images[:2]]) == 0
    printed = capsys.readouterr().out
    assert "largest absolute difference from PyTorch's logits on 2 images" in printed
    assert float(printed.rsplit(": ", 1)[1]) < 1e-4
    # an export that is off (one weight changed) is reported off: the check cannot pass whatever it gets
    off, export = off_by_one(checkpoints["torchvision"], tmp_path / "off.pt"), alexnet.interop.export.export_checkpoint
    monkeypatch.setattr(alexnet.interop.export, "export_checkpoint", lambda _, *rest: export(off, *rest))
    assert main([*args, "--check", *images[:2]]) == 0
    assert abs(float(capsys.readouterr().out.rsplit(": ", 1)[1]) - 1) < 1e-3


def test_bad_export_requests(checkpoints, tmp_path):
    with pytest.raises(UserError, match="unknown export format"):
        export_checkpoint(checkpoints["torchvision"], "tflite", tmp_path / "m.tflite")
    with pytest.raises(UserError, match="cannot take 100x100"):
        export_checkpoint(checkpoints["paper"], "onnx", tmp_path / "m.onnx", input_size=100)
    with pytest.raises(UserError, match="input size must be positive, not 0"):  # not the default crop
        export_checkpoint(checkpoints["torchvision"], "export", tmp_path / "m.pt2", input_size=0)
    with pytest.raises(UserError, match="cannot tell the format"):
        load_exported(tmp_path / "model.bin")
    not_safetensors = tmp_path / "x.safetensors"
    not_safetensors.write_bytes(b"nope")
    with pytest.raises(UserError, match="cannot read"):
        load_for_inference(not_safetensors, torch.device("cpu"))
    assert not list(tmp_path.glob("m.*"))


def test_bad_export_requests_are_refused_before_any_work(checkpoints, tmp_path, capsys, monkeypatch):
    import alexnet.interop.export

    monkeypatch.setattr(alexnet.interop.export, "load_for_inference", None)  # no checkpoint is read, nothing exported
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    export = ["export", "--checkpoint", checkpoints["torchvision"], "--format"]
    for args, said in [
        (["safetensors", "--input-size", "100", "--out", f"{tmp_path}/m.safetensors"], "--input-size is for onnx"),
        (["onnx", "--out", str(tmp_path)], f"{tmp_path} is a directory; --out names the file to write"),
        (["onnx", "--out", f"{a_file}/m.onnx"], f"cannot write {a_file}/m.onnx: {a_file} is not a directory"),
        (
            ["onnx", "--out", f"{tmp_path}/m.onnx", "--check", f"{tmp_path}/gone.jpg"],
            f"{tmp_path}/gone.jpg does not exist",
        ),
    ]:
        assert main([*export, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"alexnet: error: {said}") and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == ["a_file"]


def test_check_skips_unreadable_files_and_compares_in_batches(checkpoints, images, tmp_path, capsys, monkeypatch):
    """As predict and features do: an unreadable file is skipped and named, not the end of the check;
    and the images go through in batches, not all in one (some 24 MB an image at 227)."""
    import alexnet.interop.export

    out = export_checkpoint(checkpoints["torchvision"], "export", tmp_path / "tv.pt2")
    broken = tmp_path / "photos" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"not a jpeg")
    sizes, load = [], alexnet.interop.export.load_exported

    def counting(*args):
        run = load(*args)
        return lambda x: (sizes.append(len(x)), run(x))[1]

    monkeypatch.setattr(alexnet.interop.export, "load_exported", counting)
    diff, count, bad = max_abs_difference(out, checkpoints["torchvision"], [broken.parent, *images], batch_size=3)
    assert count == 4 and diff < 1e-4 and sizes == [2, 2]  # batches of 3 files, the broken one left out
    assert len(bad) == 1 and bad[0].startswith(f"{broken}\t")
    off = off_by_one(checkpoints["torchvision"], tmp_path / "off.pt")  # logits 1 away from the export's
    assert abs(max_abs_difference(out, off, [broken.parent, *images], batch_size=3)[0] - 1) < 1e-3
    args = ["export", "--checkpoint", checkpoints["torchvision"], "--format", "export", "--out", str(out)]
    assert main([*args, "--check", str(broken), *images[:2]]) == 0
    captured = capsys.readouterr()
    assert "on 2 images" in captured.out and "1 unreadable files skipped" in captured.out
    assert f"skipped (cannot read): {broken}" in captured.err
