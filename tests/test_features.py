import numpy as np
import pytest
import torch

from alexnet.cli import main
from alexnet.data.augment import PixelStats
from alexnet.data.folders import display_names, imagenet_class_names, load_image
from alexnet.errors import UserError
from alexnet.inspect.features import extract, filter_mosaic
from alexnet.interop.export import load_for_inference
from alexnet.model.net import build_model
from alexnet.train import train
from alexnet.train.config import TrainConfig

torch.set_num_threads(1)

TINY = dict(preset="torchvision", batch_size=4, image_size=72, crop=64, workers=0, log_every=1)


def plain_stats(size: int) -> PixelStats:
    return PixelStats(torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25), torch.ones(3), torch.eye(3))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import make_tiny_dataset, scoped_folder

    with scoped_folder(tmp_path_factory, "features") as root:
        data = make_tiny_dataset(root / "tiny")
        yield data, train(TrainConfig(data=str(data), run_dir=str(root / "run"), epochs=1, **TINY), progress=False)


def test_paper_preset_shapes_at_224():
    torch.manual_seed(0)
    model = build_model("paper", num_classes=1000)
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    expected = {
        "conv1": (96, 55, 55),
        "conv2": (256, 27, 27),
        "conv3": (384, 13, 13),
        "conv4": (384, 13, 13),
        "conv5": (256, 13, 13),
        "pool5": (256, 6, 6),
        "fc6": (4096,),
        "fc7": (4096,),
        "fc8": (1000,),
    }
    feats = extract(model, images, plain_stats(256), list(expected), crop=224)
    assert list(feats) == list(expected)
    for name, shape in expected.items():
        assert tuple(feats[name].shape) == (2, *shape), name
    for name in ("conv1", "conv5", "fc6", "fc7"):  # taken after the ReLU
        assert feats[name].min() >= 0, name
    # fc8 is the model's output; pool5 is what fc6 sees
    from alexnet.data.augment import center_batch

    with torch.no_grad():
        logits = model.eval()(center_batch(images, plain_stats(256), 224))
        assert torch.allclose(feats["fc8"], logits, atol=1e-5)
        fc6 = torch.relu(model.classifier[0](feats["pool5"].flatten(1)))
    assert torch.allclose(feats["fc6"], fc6, atol=1e-4)


def test_extract_leaves_the_model_unchanged():
    model = build_model("torchvision", num_classes=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randint(0, 256, (2, 3, 72, 72), dtype=torch.uint8)
    extract(model, images, plain_stats(72), ["conv2", "fc7"], crop=64)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="unknown layer 'fc9'"):
        extract(model, images, plain_stats(72), ["fc9"], crop=64)


def test_filter_mosaic_blocks():
    w = torch.randn(96, 3, 11, 11)
    one, two = filter_mosaic(w, 1), filter_mosaic(w, 2)
    assert one.shape == (6 * 12 + 1, 16 * 12 + 1, 3) and two.shape[0] > one.shape[0]
    assert 0 <= two.min() and two.max() <= 1
    # each kernel is scaled on its own: its first pixel row shows kernel 0 min-max scaled
    k0 = (w[0] - w[0].min()) / (w[0].max() - w[0].min())
    assert np.allclose(one[1 : 1 + 11, 1 : 1 + 11], k0.permute(1, 2, 0).numpy(), atol=1e-6)


def test_features_cli_npz_and_npy(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    bad = tmp_path / "extra" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg")
    outside = tmp_path / "extra" / "other.JPEG"
    outside.write_bytes((data / "val" / "n002_green" / "n002_green_0.JPEG").read_bytes())
    out = tmp_path / "f.npz"
    args = ["features", "--checkpoint", str(run), "--layer", "conv1", "--layer", "fc7", "--layer", "pool5"]
    assert main([*args, str(data / "val"), str(tmp_path / "extra"), "--out", str(out), "--workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "1 unreadable" in captured.out
    z = np.load(out)
    assert set(z.files) == {"conv1", "fc7", "pool5", "files", "labels", "classes"}
    # torchvision preset at crop 64; pool5 is the last max pooling (before the adaptive average pooling)
    assert z["conv1"].shape == (7, 64, 15, 15) and z["fc7"].shape == (7, 4096) and z["pool5"].shape == (7, 256, 1, 1)
    names = [str(f) for f in z["files"]]
    assert names[-1].endswith("other.JPEG") and len(names) == 7
    assert z["labels"].tolist() == [0, 0, 1, 1, 2, 2, -1]
    assert z["classes"].tolist() == ["n001_red", "n002_green", "n003_blue"]
    # each row belongs to its file: fc7 of the file alone, read independently
    model, stats, ckpt = load_for_inference(run, torch.device("cpu"))
    for i in (0, 3, 6):
        image = load_image(names[i], ckpt["config"]["image_size"])[None]
        alone = extract(model, image, stats, ["fc7"], ckpt["config"]["crop"])["fc7"][0]
        assert torch.allclose(torch.from_numpy(z["fc7"][i]), alone, atol=1e-5), names[i]

    npy = tmp_path / "fc8.npy"
    assert main(["features", "--checkpoint", str(run), "--layer", "fc8", str(data / "val"), "--out", str(npy)]) == 0
    assert np.load(npy).shape == (6, 3)
    assert main([*args, str(data / "val"), "--out", str(tmp_path / "x.npy")]) == 2
    assert "one layer" in capsys.readouterr().err


def test_imagenet_names_for_bare_wnids():
    names = imagenet_class_names()
    assert len(names) == 1000 and names["n01440764"] == "tench"
    wnids = sorted(names)[:3]
    assert display_names(wnids, wnids) == [names[w] for w in wnids]
    assert display_names(wnids, ["a", "b", "c"]) == ["a", "b", "c"]  # the checkpoint's own names win
    assert display_names(["n001_red"], ["n001_red"]) == ["n001_red"]  # not ImageNet wnids


def test_hidden_files_and_folders_are_not_images(tmp_path):
    from conftest import write_image

    from alexnet.inspect.features import list_image_files

    photos = tmp_path / "photos"
    for name in ("b.jpg", "a.jfif", ".hidden.jpg", "._b.jpg", ".ipynb_checkpoints/b-checkpoint.jpg", "x/c.png"):
        write_image(photos / name)
    assert list_image_files([str(photos)]) == [photos / "a.jfif", photos / "b.jpg", photos / "x" / "c.png"]
    assert list_image_files([str(photos / ".hidden.jpg")]) == [photos / ".hidden.jpg"]  # named: taken as given
