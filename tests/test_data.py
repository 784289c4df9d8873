import os
import shutil

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, write_image
from PIL import Image

from alexnet.data.folders import (
    EpochSampler,
    ImageDataset,
    collate,
    image_moments,
    listing,
    load_image,
    make_loader,
    open_split,
)
from alexnet.errors import UserError


def test_imagenet_layout_with_class_names(imagenette_ci):
    train = open_split(imagenette_ci, "train")
    val = open_split(imagenette_ci, "val", classes=train.classes)
    assert len(train.classes) == 10 and train.classes == sorted(train.classes)
    assert (len(train.samples), len(val.samples)) == (400, 100)
    assert train.names[0] == "tench" and train.classes[0] == "n01440764"
    # labels index the sorted wnid list, as torchvision's ImageFolder assigns them
    for path, label in train.samples[::37]:
        assert f"/{train.classes[label]}/" in path


def test_class_mismatch_between_train_and_val(tiny_dataset):
    train = open_split(tiny_dataset, "train")
    (tiny_dataset / "val" / "n001_red").rename(tiny_dataset / "val" / "n009_other")
    with pytest.raises(UserError, match="differ from the training classes.*n001_red.*n009_other"):
        open_split(tiny_dataset, "val", classes=train.classes)


def test_hidden_folders_and_files_are_not_classes_or_images_and_jfif_is(tiny_dataset):
    val = tiny_dataset / "val"
    write_image(val / ".ipynb_checkpoints" / "n001_red_0-checkpoint.JPEG")  # Jupyter's, beside the classes
    write_image(val / "n001_red" / ".ipynb_checkpoints" / "n001_red_1-checkpoint.JPEG")
    write_image(val / "n001_red" / "._n001_red_0.JPEG")  # macOS's resource fork, not an image
    write_image(val / "n001_red" / "photo.jfif")
    train = open_split(tiny_dataset, "train")
    split = open_split(tiny_dataset, "val", classes=train.classes)
    assert split.classes == ["n001_red", "n002_green", "n003_blue"]
    assert sorted(os.path.basename(p) for p, label in split.samples if label == 0) == [
        "n001_red_0.JPEG",
        "n001_red_1.JPEG",
        "photo.jfif",
    ]


def test_listing_of_a_name_that_is_not_utf8(tmp_path):
    """What DDP's ranks compare and prepare records: a name that is not UTF-8 counts as its bytes."""
    good = write_image(tmp_path / "d" / "val" / "a" / "1.png")
    with open(os.fsencode(good.parent) + b"/caf\xe9.png", "wb") as f:
        f.write(good.read_bytes())
    assert listing(open_split(tmp_path / "d", "val"), tmp_path / "d")["sources"] == 2


def test_a_models_classes_label_any_subset_of_the_folders_in_its_order(tiny_dataset):
    """Evaluation: the checkpoint's class order (a conversion's, not sorted) labels the folders by name,
    and a dataset may hold some of its classes only; a folder not among them is named."""
    model = ["n003_blue", "n009_other", "n001_red", "n002_green"]
    split = open_split(tiny_dataset, "val", classes=model, subset=True)
    assert split.classes == model and len(split.samples) == 6
    assert all(f"/{model[label]}/" in path for path, label in split.samples)
    (tiny_dataset / "val" / "n002_green").rename(tiny_dataset / "val" / "n007_new")
    shutil.copytree(tiny_dataset / "val" / "n007_new", tiny_dataset / "val" / "n008_new")
    with pytest.raises(UserError, match=r"2 class folders of .*val are not among the model's 4 classes: n007_new, n"):
        open_split(tiny_dataset, "val", classes=model, subset=True)
    with pytest.raises(UserError, match="differ from the training classes"):  # training's check is unchanged
        open_split(tiny_dataset, "val", classes=["n001_red", "n002_green", "n003_blue"])


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_split(tmp_path / "nowhere", "train")
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        open_split(tmp_path / "d", "train")
    with pytest.raises(UserError, match="no 'val' folder"):
        open_split(tmp_path / "d", "val")


def test_empty_class_folder_is_reported(tiny_dataset):
    (tiny_dataset / "train" / "n004_empty").mkdir()
    split = open_split(tiny_dataset, "train")
    assert split.empty_classes == ["n004_empty"] and len(split.classes) == 4


def _flat_val(tmp_path, n=4):
    root = tmp_path / "ilsvrc"
    wnids = ["n01440764", "n01443537"]
    for i in range(1, n + 1):
        write_image(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    return root, wnids


def test_ilsvrc_flat_validation_with_loc_solution(tmp_path):
    root, wnids = _flat_val(tmp_path)
    lines = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{i:08d},{wnids[i % 2]} 1 2 3 4 {wnids[i % 2]} 5 6 7 8" for i in range(1, 5)
    ]
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    split = open_split(root, "val", classes=wnids)
    assert [label for _, label in split.samples] == [1, 0, 1, 0]


def test_ilsvrc_flat_validation_with_devkit_ground_truth(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    root, _ = _flat_val(tmp_path)
    # devkit ids are not in sorted-wnid order: id 1 is n02119789 (kit fox) in the real devkit
    synsets = np.array([(1, "n02119789"), (2, "n01440764")], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    scipy_io.savemat(root / "val" / "meta.mat", {"synsets": synsets})
    (root / "val" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n2\n1\n")
    split = open_split(root, "val", classes=["n01440764", "n02119789"])
    assert [label for _, label in split.samples] == [1, 0, 0, 1]


def test_flat_validation_without_labels_is_a_clear_error(tmp_path):
    root, wnids = _flat_val(tmp_path)
    with pytest.raises(UserError, match="no class folders and no label file"):
        open_split(root, "val", classes=wnids)


GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


@pytest.mark.parametrize(
    "label_file,text,meta,error",  # meta: the meta.mat beside the labels: none, "devkit" or "truncated"
    [
        (
            "LOC_val_solution.csv",
            "ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\nILSVRC2012_val_00000002,\n",
            None,
            "LOC_val_solution.csv line 3: ILSVRC2012_val_00000002 has an empty PredictionString",
        ),
        (
            "LOC_val_solution.csv",
            "ImageId,Label\nILSVRC2012_val_00000001,n01440764\n",
            None,
            "LOC_val_solution.csv has no PredictionString column: its header is 'ImageId,Label', not 'ImageId,Predic",
        ),
        ("LOC_val_solution.csv", b"\xff\xfe\x00I\x00d", None, "LOC_val_solution.csv has no ImageId column"),
        (GROUND_TRUTH, "1\nn01440764\n", "devkit", f"{GROUND_TRUTH} line 2: 'n01440764' is not one of the 2 class"),
        (GROUND_TRUTH, "1\n\n7\n", "devkit", f"{GROUND_TRUTH} line 3: '7' is not one of the 2 class ids in meta.mat"),
        (GROUND_TRUTH, "1\n2\n", "truncated", "cannot read {root}/val/meta.mat: "),
    ],
    ids=["empty-prediction", "no-prediction-column", "not-utf8", "not-a-number", "unknown-id", "corrupt-meta"],
)
def test_flat_validation_with_bad_labels_is_a_one_line_error(tmp_path, label_file, text, meta, error):
    root, wnids = _flat_val(tmp_path, n=2)
    label = root / "val" / label_file
    label.write_bytes(text if isinstance(text, bytes) else text.encode())
    if meta:  # the devkit's, with class ids 1 and 2; or cut short
        scipy_io = pytest.importorskip("scipy.io")
        synsets = np.array([(1, wnids[1]), (2, wnids[0])], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
        scipy_io.savemat(root / "val" / "meta.mat", {"synsets": synsets})
        if meta == "truncated":
            (root / "val" / "meta.mat").write_bytes((root / "val" / "meta.mat").read_bytes()[:300])
    with pytest.raises(UserError) as caught:
        open_split(root, "val", classes=wnids)
    assert error.format(root=root) in str(caught.value) and "\n" not in str(caught.value)


def _palette_image(size):
    im = Image.new("P", size, 3)
    im.putpalette([0, 0, 0] * 3 + [10, 200, 30])
    return im


@pytest.mark.parametrize(
    "make,ext,rgb",
    [
        (lambda: Image.new("L", (300, 200), 100), "png", (100, 100, 100)),
        (lambda: Image.new("LA", (200, 300), (90, 10)), "png", (90, 90, 90)),
        # alpha is dropped, not composited over any background: a faint pixel keeps its full colour
        (lambda: Image.new("RGBA", (200, 300), (200, 40, 60, 100)), "png", (200, 40, 60)),
        # CMYK to RGB as PIL does it: channel = (255 - C|M|Y) * (255 - K) / 255
        (lambda: Image.new("CMYK", (64, 64), (20, 200, 100, 40)), "jpg", (198, 46, 131)),
        (lambda: _palette_image((257, 256)), "png", (10, 200, 30)),
        (lambda: Image.fromarray(np.full((50, 60), 40000, dtype=np.uint16)), "png", (156, 156, 156)),
        (lambda: Image.new("RGB", (1, 1), (250, 120, 0)), "png", (250, 120, 0)),
        (lambda: Image.new("RGB", (2000, 100), (0, 80, 255)), "png", (0, 80, 255)),
    ],
    ids=["L", "LA", "RGBA", "CMYK", "P", "I;16", "RGB-1x1", "RGB-wide"],
)
def test_load_image_any_mode_and_shape(tmp_path, make, ext, rgb):
    """Every mode comes out (3, 256, 256) uint8 in its own RGB colour: greyscale as equal channels, palette
    entries looked up, CMYK converted, alpha dropped; colour is never thrown away."""
    path = tmp_path / f"x.{ext}"
    make().save(path)
    x = load_image(str(path))
    assert x.shape == (3, 256, 256) and x.dtype == torch.uint8
    got = [(int(channel.min()), int(channel.max())) for channel in x]  # per channel: (min, max)
    assert all(c - 2 <= lo and hi <= c + 2 for (lo, hi), c in zip(got, rgb, strict=True)), (got, rgb)


def test_load_image_16_bit_keeps_brightness(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((50, 60), 40000, dtype=np.uint16)).save(path)
    x = load_image(str(path))
    assert abs(int(x[0, 100, 100]) - 40000 // 256) <= 1


def test_load_image_short_side_256_then_centre(tmp_path):
    # a 512x256 image whose left and right quarters are black, centre half white
    pixels = np.zeros((256, 512, 3), dtype=np.uint8)
    pixels[:, 128:384] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    x = load_image(str(tmp_path / "wide.png"))
    assert x.shape == (3, 256, 256) and int(x.min()) == 255


@pytest.mark.parametrize("name", ["n02492660_howler_monkey", "n03345487_fire_engine", "n02100583_vizsla"])
def test_a_large_jpeg_is_what_a_full_decode_gives(name):
    """Decoding a large JPEG at a reduced scale (for speed) gives what decoding it whole and scaling it
    gives, to rounding: PIL's bilinear resize, shorter side 256, the centre kept (no draft)."""
    path = SHARED_DATA / "imagenet-sample-1000" / "val" / name.split("_")[0] / f"{name}.JPEG"
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        im = im.resize((round(w * 256 / min(w, h)), round(h * 256 / min(w, h))), Image.BILINEAR)
        left, top = (im.size[0] - 256) // 2, (im.size[1] - 256) // 2
        want = torch.from_numpy(np.asarray(im.crop((left, top, left + 256, top + 256))).copy()).permute(2, 0, 1)
    got = load_image(str(path))
    assert (got.float() - want.float()).abs().mean() < 1.0  # grey levels; a draft of 256 itself: 9.7, 6.9, 5.0


def test_bad_files_are_skipped_and_named(tmp_path):
    good = write_image(tmp_path / "good.JPEG")
    truncated = tmp_path / "truncated.JPEG"
    truncated.write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.JPEG").write_text("not an image")
    (tmp_path / "empty.JPEG").write_bytes(b"")
    samples = [(str(p), 0) for p in (good, truncated, tmp_path / "text.JPEG", tmp_path / "empty.JPEG")]
    batches = list(make_loader(ImageDataset(samples), batch_size=4, workers=0))
    assert len(batches) == 1 and batches[0].images.shape == (1, 3, 256, 256)
    assert sorted(b.split("\t")[0] for b in batches[0].bad) == sorted(s for s, _ in samples[1:])


def test_collate_of_only_bad_files_is_an_empty_batch():
    batch = collate([(None, 0, "a\tbroken"), (None, 1, "b\tbroken")])
    assert len(batch.labels) == 0 and batch.bad == ["a\tbroken", "b\tbroken"]


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a, b = EpochSampler(100, seed=1, epoch=0), EpochSampler(100, seed=1, epoch=0)
    assert list(a) == list(b) and sorted(a) == list(range(100))
    assert list(EpochSampler(100, seed=1, epoch=1)) != list(a)
    assert list(EpochSampler(100, seed=2, epoch=0)) != list(a)  # the seed counts, not the epoch alone
    assert list(EpochSampler(100, seed=1, epoch=0, start=30)) == list(a)[30:]


def test_image_moments_of_constant_colours(tmp_path):
    samples = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (300, 260), colour).save(path)
        samples.append((str(path), i))
    mean, cov, count, bad = image_moments(make_loader(ImageDataset(samples), 2, 0))
    assert count == 2 and not bad
    assert torch.allclose(mean[:, 0, 0], torch.tensor([0.5, 0.0, 0.5]))
    # R and B are each 0 or 1 with equal weight: variance 1/4, covariance -1/4
    expected = torch.tensor([[0.25, 0, -0.25], [0, 0, 0], [-0.25, 0, 0.25]])
    assert torch.allclose(cov, expected, atol=1e-5)
