"""Weights in: torchvision state_dicts, Caffe's .caffemodel and .npy formats, --init-from and --freeze.

The foreign files are synthetic (random weights of the right shapes), written here the way their
tools write them; the end-to-end check runs an independent forward pass in Caffe's conventions.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import scoped_folder

from alexnet.checkpoint import load_checkpoint
from alexnet.cli import main
from alexnet.data.augment import center_batch
from alexnet.data.folders import load_image
from alexnet.errors import UserError
from alexnet.interop.caffe import V1_LAYER_TYPES, messages
from alexnet.interop.export import load_for_inference
from alexnet.interop.weights import convert, load_pretrained, read_pretrained
from alexnet.model.net import build_model
from alexnet.train import train
from alexnet.train.config import TrainConfig, parse_freeze

pytestmark = pytest.mark.usefixtures("one_thread")  # many small tensor ops: threads only contend

TINY = dict(preset="torchvision", batch_size=4, image_size=72, crop=64, workers=0, log_every=1)

# bvlc_alexnet in Caffe's layout: (out, in / groups, kH, kW) and (out, in)
CAFFE_SHAPES = {
    "conv1": (96, 3, 11, 11),
    "conv2": (256, 48, 5, 5),
    "conv3": (384, 256, 3, 3),
    "conv4": (384, 192, 3, 3),
    "conv5": (256, 192, 3, 3),
    "fc6": (4096, 9216),
    "fc7": (4096, 4096),
    "fc8": (1000, 4096),
}
KEYS = {  # where each layer sits in the paper preset's state_dict
    "conv1": "features.0",
    "conv2": "features.4",
    "conv3": "features.8",
    "conv4": "features.10",
    "conv5": "features.12",
    "fc6": "classifier.0",
    "fc7": "classifier.3",
    "fc8": "classifier.6",
}


@pytest.fixture(scope="module")
def caffe_weights():
    """{layer: (weights, biases)}, scaled so that activations neither vanish nor explode."""
    rng = np.random.default_rng(0)
    weights = {}
    for name, shape in CAFFE_SHAPES.items():
        fan_in = int(np.prod(shape[1:]))
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2 / fan_in))
        weights[name] = (w, rng.standard_normal(shape[0], dtype=np.float32) * np.float32(0.1))
    return weights


def make_blob(array: np.ndarray, legacy: bool = False):
    blob = messages()["BlobProto"]()
    values = array.ravel()
    for start in range(0, values.size, 1 << 20):  # in chunks: a list of 37M Python floats is 1 GB
        blob.data.extend(values[start : start + (1 << 20)].tolist())
    blob.shape.dim.extend(array.shape)
    return as_legacy(blob, array) if legacy else blob


def as_legacy(blob, array: np.ndarray):
    """The V1 files' 4-D shape: num, channels, height, width; fc weights 1x1xOUTxIN, biases 1x1x1xOUT."""
    legacy = messages()["BlobProto"]()
    legacy.CopyFrom(blob)
    legacy.ClearField("shape")
    legacy.num, legacy.channels, legacy.height, legacy.width = (1,) * (4 - array.ndim) + array.shape
    return legacy


@pytest.fixture(scope="module")
def caffemodels(caffe_weights, tmp_path_factory):
    """The same synthetic bvlc_alexnet as a .caffemodel in the old V1 `layers` form and the new `layer` form."""
    m = messages()
    blobs = {}
    for name, arrays in caffe_weights.items():
        blobs[name, "new"] = [make_blob(a) for a in arrays]
        blobs[name, "v1"] = [as_legacy(b, a) for b, a in zip(blobs[name, "new"], arrays, strict=True)]
    order = ["data", "conv1", "relu1", "norm1", "pool1", "conv2", "relu2", "norm2", "pool2", "conv3", "relu3"]
    order += ["conv4", "relu4", "conv5", "relu5", "pool5", "fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8"]
    v1_types = {"data": "DATA", "relu": "RELU", "norm": "LRN", "pool": "POOLING", "drop": "DROPOUT"}
    v1_types |= {"conv": "CONVOLUTION", "fc": "INNER_PRODUCT"}
    new_types = {"data": "Data", "relu": "ReLU", "norm": "LRN", "pool": "Pooling", "drop": "Dropout"}
    new_types |= {"conv": "Convolution", "fc": "InnerProduct"}
    with scoped_folder(tmp_path_factory, "caffe") as folder:
        files = {}
        for form in ("v1", "new"):
            net = m["NetParameter"](name="AlexNet")
            for name in order:
                kind = name.rstrip("0123456789")
                if form == "v1":
                    layer = net.layers.add(name=name, type=V1_LAYER_TYPES[v1_types[kind]])
                else:
                    layer = net.layer.add(name=name, type=new_types[kind])
                for blob in blobs.get((name, form), []):
                    layer.blobs.add().CopyFrom(blob)
            files[form] = folder / f"bvlc_alexnet_{form}.caffemodel"
            files[form].write_bytes(net.SerializeToString())
        yield files


def expected_state(caffe_weights):
    """What the conversion must produce: Caffe's arrays, conv1's input channels reversed (BGR -> RGB)."""
    state = {}
    for name, (w, b) in caffe_weights.items():
        w = torch.from_numpy(w)
        state[f"{KEYS[name]}.weight"] = w.flip(1) if name == "conv1" else w
        state[f"{KEYS[name]}.bias"] = torch.from_numpy(b)
    return state


def assert_layers_equal(model_state, caffe_weights):
    for key, value in expected_state(caffe_weights).items():
        assert torch.equal(model_state[key], value), key


def test_caffemodel_v1_form_through_the_cli(caffemodels, caffe_weights, tmp_path):
    synsets = tmp_path / "synset_words.txt"
    synsets.write_text("".join(f"n{i:08d} class number {i}, a test\n" for i in range(1000)))
    out = tmp_path / "bvlc.pt"
    assert (
        main(["convert", "--from", "caffe", str(caffemodels["v1"]), "--out", str(out), "--classes", str(synsets)]) == 0
    )
    ckpt = load_checkpoint(out)
    assert_layers_equal(ckpt["model"], caffe_weights)
    cfg = ckpt["config"]
    assert (cfg["preset"], cfg["lrn"], cfg["crop"], cfg["scale"]) == ("paper", "caffe", 227, "raw")
    assert cfg["lrn_per_tower"] is False  # bvlc_alexnet's LRN runs across both towers' maps
    assert ckpt["classes"][7] == "n00000007" and ckpt["names"][7] == "class number 7, a test"
    # no mean file: Caffe's per-channel mean [104, 117, 123] BGR, as RGB in [0, 1]; raw 0-255 pixels
    assert torch.allclose(ckpt["stats"]["mean"].flatten(), torch.tensor([123.0, 117.0, 104.0]) / 255)
    assert torch.allclose(ckpt["stats"]["std"].flatten(), torch.full((3,), 1 / 255))


def caffe_reference_logits(bgr: torch.Tensor, weights) -> torch.Tensor:
    """bvlc_alexnet's forward pass written out in Caffe's terms, independent of alexnet.model.net:
    BGR input minus the mean, grouped convolutions as two convolutions on channel halves, Caffe's
    LRN (k = 1, alpha / 5), ceil-mode pooling."""
    w = {name: (torch.from_numpy(a), torch.from_numpy(b)) for name, (a, b) in weights.items()}

    def conv(x, name, stride=1, pad=0, groups=1):
        kernel, bias = w[name]
        if groups == 1:
            return F.relu(F.conv2d(x, kernel, bias, stride, pad))
        half_in, half_out = x.shape[1] // 2, kernel.shape[0] // 2
        tower_a = F.conv2d(x[:, :half_in], kernel[:half_out], bias[:half_out], stride, pad)
        tower_b = F.conv2d(x[:, half_in:], kernel[half_out:], bias[half_out:], stride, pad)
        return F.relu(torch.cat([tower_a, tower_b], 1))

    def lrn(x, size=5, alpha=1e-4, beta=0.75, k=1.0):
        squares = F.pad(x.square(), (0, 0, 0, 0, size // 2, size // 2))  # zero channels at both ends
        window = sum(squares[:, i : i + x.shape[1]] for i in range(size))
        return x / (k + alpha / size * window) ** beta

    def pool(x):
        return F.max_pool2d(x, 3, 2, ceil_mode=True)

    x = pool(lrn(conv(bgr, "conv1", stride=4)))
    x = pool(lrn(conv(x, "conv2", pad=2, groups=2)))
    x = conv(x, "conv3", pad=1)
    x = conv(x, "conv4", pad=1, groups=2)
    x = pool(conv(x, "conv5", pad=1, groups=2)).flatten(1)  # (C, H, W) order, as Caffe
    x = F.relu(F.linear(x, *w["fc6"]))
    x = F.relu(F.linear(x, *w["fc7"]))
    return F.linear(x, *w["fc8"])


def test_caffemodel_new_form_with_mean_file_matches_a_caffe_forward_pass(
    caffemodels, caffe_weights, imagenette_ci, tmp_path
):
    # a mean image as Caffe writes it: a BlobProto, 1 x 3 x 256 x 256, BGR, 0-255
    rng = np.random.default_rng(1)
    mean_bgr = (np.array([104.0, 117.0, 123.0])[:, None, None] + rng.uniform(-20, 20, (3, 256, 256))).astype(np.float32)
    blob = messages()["BlobProto"](num=1, channels=3, height=256, width=256)
    blob.data.extend(mean_bgr.ravel().tolist())
    mean_file = tmp_path / "imagenet_mean.binaryproto"
    mean_file.write_bytes(blob.SerializeToString())

    out = convert("caffe", caffemodels["new"], tmp_path / "bvlc.pt", mean=mean_file)
    model, stats, ckpt = load_for_inference(out, torch.device("cpu"))
    assert_layers_equal(ckpt["model"], caffe_weights)
    assert ckpt["config"]["mean"] == "pixel" and ckpt["classes"][:2] == ["0", "1"]

    files = sorted((imagenette_ci / "val").rglob("*.JPEG"))[:2]
    images = torch.stack([load_image(str(f), 256) for f in files])  # (2, 3, 256, 256) uint8 RGB
    with torch.no_grad():
        ours = model(center_batch(images, stats, 227))
        bgr = images.flip(1).float() - torch.from_numpy(mean_bgr)
        off = (256 - 227) // 2
        reference = caffe_reference_logits(bgr[:, :, off : off + 227, off : off + 227], caffe_weights)
    assert reference.abs().max() > 1  # the random weights give logits that say something
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_numpy_dictionary_format(caffe_weights, tmp_path):
    """bvlc_alexnet.npy as the TensorFlow port has it: conv (kH, kW, in, out), fc (in, out), fc6's inputs
    in TensorFlow's (H, W, C) flatten order."""
    tf = {}
    for name, (w, b) in caffe_weights.items():
        if w.ndim == 4:
            tf[name] = [w.transpose(2, 3, 1, 0), b]
        elif name == "fc6":  # caffe-tensorflow: reshape to (out, C, H, W), move C after H, W
            tf[name] = [w.reshape(4096, 256, 6, 6).transpose(2, 3, 1, 0).reshape(9216, 4096), b]
        else:
            tf[name] = [w.T, b]
    path = tmp_path / "bvlc_alexnet.npy"
    np.save(path, tf, allow_pickle=True)

    ckpt = load_checkpoint(convert("caffe-npy", path, tmp_path / "npy.pt"))
    assert_layers_equal(ckpt["model"], caffe_weights)
    # fc6 as TensorFlow computes it (NHWC pool5 flattened) equals fc6 of the converted model (NCHW)
    pool5 = torch.randn(2, 256, 6, 6)
    tf_fc6 = pool5.permute(0, 2, 3, 1).flatten(1) @ torch.from_numpy(tf["fc6"][0]) + torch.from_numpy(tf["fc6"][1])
    ours = F.linear(pool5.flatten(1), ckpt["model"]["classifier.0.weight"], ckpt["model"]["classifier.0.bias"])
    torch.testing.assert_close(ours, tf_fc6, rtol=1e-4, atol=1e-3)


def test_bad_caffe_files_give_one_line_errors(caffe_weights, tmp_path):
    garbage = tmp_path / "garbage.caffemodel"
    garbage.write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(UserError, match="garbage.caffemodel"):
        convert("caffe", garbage, tmp_path / "out.pt")

    # groups=1 conv2 (256 x 96 x 5 x 5) does not fit bvlc_alexnet's two towers
    m = messages()
    net = m["NetParameter"]()
    for name in ("conv2", "fc8"):
        w = np.zeros((256, 96, 5, 5) if name == "conv2" else (1000, 4096), np.float32)
        layer = net.layer.add(name=name, type="Convolution")
        for array in (w, np.zeros(w.shape[0], np.float32)):
            layer.blobs.add().CopyFrom(make_blob(array))
    wrong = tmp_path / "wrong.caffemodel"
    wrong.write_bytes(net.SerializeToString())
    with pytest.raises(UserError, match="no layer named 'conv1'"):
        convert("caffe", wrong, tmp_path / "out.pt")
    with pytest.raises(UserError, match="unknown source format"):
        convert("keras", wrong, tmp_path / "out.pt")
    not_npy = tmp_path / "not.npy"
    not_npy.write_text("hello")
    with pytest.raises(UserError, match="not a NumPy dictionary"):
        convert("caffe-npy", not_npy, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


# --- torchvision weights and fine-tuning -----------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    """A torchvision AlexNet state_dict file, randomly initialised, saved as people save them."""
    torch.manual_seed(0)
    net = torchvision.models.alexnet(weights=None).eval()
    with scoped_folder(tmp_path_factory, "tv") as folder:
        torch.save(net.state_dict(), folder / "alexnet-owt.pth")
        yield folder / "alexnet-owt.pth", net


def test_torchvision_state_dict_gives_identical_logits(torchvision_file, imagenette_ci, tmp_path):
    path, net = torchvision_file
    model, stats, ckpt = load_for_inference(convert("torchvision", path, tmp_path / "tv.pt"), torch.device("cpu"))
    assert ckpt["config"]["scale"] == "imagenet" and ckpt["config"]["mean"] == "channel"
    files = sorted((imagenette_ci / "val").rglob("*.JPEG"))[:2]
    x = center_batch(torch.stack([load_image(str(f), 256) for f in files]), stats, 224)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    # an alexnet checkpoint is refused: its mean image and classes would give way to ImageNet's
    with pytest.raises(UserError, match="is an alexnet checkpoint already"):
        convert("torchvision", tmp_path / "tv.pt", tmp_path / "again.pt")
    assert not (tmp_path / "again.pt").exists()


def test_new_classes_replace_fc8_only(torchvision_file):
    path, net = torchvision_file
    model = build_model("torchvision", 10)
    fresh_fc8 = model.classifier[6].weight.detach().clone()
    message = load_pretrained(
        model, read_pretrained(path, TrainConfig(preset="torchvision")), [str(i) for i in range(10)]
    )
    assert "fc8 new" in message and "1000 classes there, 10 here" in message
    source, loaded = net.state_dict(), model.state_dict()
    for key in source:
        if key.startswith("classifier.6."):
            assert loaded[key].shape[0] == 10
        else:
            assert torch.equal(loaded[key], source[key]), key
    assert torch.equal(loaded["classifier.6.weight"], fresh_fc8)
    # 1000 classes: everything comes from the file
    model = build_model("torchvision", 1000)
    load_pretrained(model, read_pretrained(path, TrainConfig(preset="torchvision")), [str(i) for i in range(1000)])
    assert torch.equal(model.classifier[6].weight, net.classifier[6].weight)
    # a source whose classes are known: as many classes but other ones, or the same ones reordered, is
    # a new fc8 too (its rows would score the wrong classes); the same list in the same order is not
    wnids = [f"n{i:08d}" for i in range(1000)]
    pre = dataclasses.replace(read_pretrained(path, TrainConfig(preset="torchvision")), classes=wnids)
    for classes in (wnids[::-1], wnids[:999] + ["n99999999"]):
        model = build_model("torchvision", 1000)
        fresh_fc8 = model.classifier[6].weight.detach().clone()
        message = load_pretrained(model, pre, classes)
        assert "fc8 new (1000 classes there, 1000 here)" in message
        assert torch.equal(model.classifier[6].weight, fresh_fc8)
        assert torch.equal(model.classifier[4].weight, net.classifier[4].weight)  # fc7 from the file
    model = build_model("torchvision", 1000)
    assert load_pretrained(model, pre, list(wnids)) == f"weights: all layers from {path}"
    assert torch.equal(model.classifier[6].weight, net.classifier[6].weight)


def test_freeze_features_keeps_them_while_training(torchvision_file, tiny_dataset, tmp_path):
    path, net = torchvision_file
    cfg = TrainConfig(data=str(tiny_dataset), run_dir=str(tmp_path / "run"), epochs=1, **TINY)
    run = train(dataclasses.replace(cfg, init_from=str(path), freeze="features"), progress=False)
    stored = json.loads((run / "config.json").read_text())
    assert stored["init_from"] == str(path) and stored["freeze"] == "features"
    trained, source = load_checkpoint(run / "last.pt")["model"], net.state_dict()
    for key in source:
        if key.startswith("features."):
            assert torch.equal(trained[key], source[key]), key  # frozen
    assert not torch.equal(trained["classifier.1.weight"], source["classifier.1.weight"])  # fc6 trained
    assert trained["classifier.6.weight"].shape[0] == 3  # the tiny dataset's classes


def test_freeze_names(tmp_path):
    assert parse_freeze("features") == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    assert parse_freeze("conv2..conv4, fc8") == ["conv2", "conv3", "conv4", "fc8"]
    assert parse_freeze("fc6,conv1") == ["conv1", "fc6"]
    for bad in ("conv6", "conv4..conv2", "pool1"):
        with pytest.raises(UserError, match="freeze"):
            parse_freeze(bad)


def test_mismatched_preset_is_a_one_line_error(caffemodels, tiny_dataset, tmp_path, capsys):
    paper = convert("caffe", caffemodels["new"], tmp_path / "paper.pt")
    run_dir = tmp_path / "run"
    args = ["train", "--data", str(tiny_dataset), "--preset", "torchvision", "--init-from", str(paper)]
    assert main([*args, "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a 'paper' model" in err[0] and "--preset paper" in err[0], err
    assert not run_dir.exists()  # stopped before leaving a half-made run behind
    # the same network but Caffe's LRN convention missing: also refused, with the reason
    with pytest.raises(UserError, match="lrn='caffe'"):
        read_pretrained(paper, TrainConfig(preset="paper"))
    # and Caffe's window across both towers' maps, where the paper preset's stays within each
    with pytest.raises(UserError, match="made with LRN across the towers, unlike this run: pass --no-lrn-per-tower"):
        read_pretrained(paper, TrainConfig(preset="paper", lrn="caffe"))
    read_pretrained(paper, TrainConfig(preset="paper", lrn="caffe", lrn_per_tower=False))
    # a bare state_dict of the other network: refused when its shapes are checked
    bare = tmp_path / "paper_state.pth"
    torch.save(load_checkpoint(paper)["model"], bare)
    with pytest.raises(UserError, match="does not fit the torchvision preset"):
        read_pretrained(bare, TrainConfig(preset="torchvision"))
