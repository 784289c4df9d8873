"""Crops, reflections, mean subtraction and PCA lighting, checked on images whose pixels encode
their own coordinates (docs/reference.md §4)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHARED_DATA

from alexnet.data.augment import (
    IMAGENET_EIGVAL,
    IMAGENET_EIGVEC,
    IMAGENET_STD,
    PixelStats,
    center_batch,
    lighting_offsets,
    make_pixel_stats,
    ten_crop_batch,
    train_batch,
)
from alexnet.data.folders import ImageDataset, image_moments, make_loader, open_split

pytestmark = pytest.mark.usefixtures("one_thread")  # many small tensor ops: threads only contend

S, CROP = 256, 224


def coord_images(b: int, s: int = S) -> torch.Tensor:
    """(b, 3, s, s) uint8: channel 0 = row, channel 1 = column, channel 2 = a pattern that also encodes
    the image's index in the batch."""
    r = torch.arange(s).view(s, 1).expand(s, s)
    c = torch.arange(s).view(1, s).expand(s, s)
    imgs = torch.empty(b, 3, s, s, dtype=torch.uint8)
    for i in range(b):
        imgs[i, 0] = r
        imgs[i, 1] = c
        imgs[i, 2] = (7 * r + 3 * c + 11 * i) % 256
    return imgs


def expected_view(i: int, top: int, left: int, flip: bool, crop: int = CROP) -> torch.Tensor:
    """What image i of coord_images looks like, in 0..255 values, cropped at (top, left), mirrored if flip."""
    rows = torch.arange(top, top + crop).view(crop, 1).expand(crop, crop)
    cols = torch.arange(left, left + crop).view(1, crop).expand(crop, crop)
    if flip:
        cols = cols.flip(1)
    return torch.stack([rows, cols, (7 * rows + 3 * cols + 11 * i) % 256]).float()


def identity_stats(mean: torch.Tensor | None = None, std: float = 1.0) -> PixelStats:
    return PixelStats(
        mean=torch.zeros(3, 1, 1) if mean is None else mean,
        std=torch.full((3, 1, 1), std),
        eigval=torch.tensor(IMAGENET_EIGVAL),
        eigvec=torch.tensor(IMAGENET_EIGVEC),
    )


def as_pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalised output with mean 0 and std 1 back to 0..255 values."""
    return x * 255.0


# ------------------------------------------------------------------------------------ 10 crops

# top-left, top-right, bottom-left, bottom-right, centre (offset 16 = (256 - 224) / 2)
CORNERS = [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]


def test_ten_crop_geometry() -> None:
    imgs = coord_images(2)
    out = ten_crop_batch(imgs, identity_stats(), crop=CROP)
    assert out.shape == (2, 10, 3, 224, 224)
    assert out.dtype == torch.float32
    for i in range(2):
        for v in range(10):
            top, left = CORNERS[v % 5]
            want = expected_view(i, top, left, flip=v >= 5)
            torch.testing.assert_close(as_pixels(out[i, v]), want, rtol=0, atol=1e-3, msg=f"image {i} view {v}")


def test_ten_crop_raw_scale_and_channel_mean() -> None:
    # the paper's raw 0..255 input minus a mean colour: (x / 255 - m) / (1 / 255) = x - 255 m
    imgs = coord_images(1)
    m = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1) / 255
    out = ten_crop_batch(imgs, identity_stats(mean=m, std=1 / 255), crop=CROP)
    for v in range(10):
        top, left = CORNERS[v % 5]
        want = expected_view(0, top, left, flip=v >= 5) - torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)
        torch.testing.assert_close(out[0, v], want, rtol=0, atol=1e-3)


def test_center_batch_is_centre_crop() -> None:
    imgs = coord_images(3)
    stats = identity_stats()
    out = center_batch(imgs, stats, crop=CROP)
    assert out.shape == (3, 3, 224, 224)
    for i in range(3):
        torch.testing.assert_close(as_pixels(out[i]), expected_view(i, 16, 16, False), rtol=0, atol=1e-3)
    torch.testing.assert_close(out, ten_crop_batch(imgs, stats, crop=CROP)[:, 4], rtol=0, atol=0)


def pattern_mean(s: int = S) -> torch.Tensor:
    """A mean image whose channel 2 encodes the coordinates (channels 0 and 1 zero), in [0, 1]."""
    r = torch.arange(s).view(s, 1).expand(s, s)
    c = torch.arange(s).view(1, s).expand(s, s)
    m = torch.zeros(3, s, s)
    m[2] = ((5 * r + 13 * c) % 256).float() / 255
    return m


def expected_with_mean(i: int, top: int, left: int, flip: bool, crop: int = CROP) -> torch.Tensor:
    want = expected_view(i, top, left, flip, crop)
    rows, cols = want[0], want[1]
    want[2] = want[2] - (5 * rows + 13 * cols) % 256
    return want


def test_pixel_mean_cropped_with_the_image_fixed_views() -> None:
    imgs = coord_images(2)
    stats = identity_stats(mean=pattern_mean())
    out = ten_crop_batch(imgs, stats, crop=CROP)
    for i in range(2):
        for v in range(10):
            top, left = CORNERS[v % 5]
            want = expected_with_mean(i, top, left, v >= 5)
            torch.testing.assert_close(as_pixels(out[i, v]), want, rtol=0, atol=1e-3, msg=f"image {i} view {v}")
    torch.testing.assert_close(center_batch(imgs, stats, crop=CROP), out[:, 4], rtol=0, atol=0)


# ----------------------------------------------------------------------------------- training


def _recover(view: torch.Tensor) -> tuple[int, int, bool]:
    """(top, left, flipped) of a training crop of a coordinate image, from its pixel values."""
    px = as_pixels(view).round().long()
    top = int(px[0, 0, 0])
    c0, c1 = int(px[1, 0, 0]), int(px[1, 0, 1])
    flipped = c1 == c0 - 1
    left = c0 - (view.shape[-1] - 1) if flipped else c0
    return top, left, flipped


def test_train_batch_crops_flips_and_mean() -> None:
    b = 64
    imgs = coord_images(b)
    stats = identity_stats(mean=pattern_mean())
    out = train_batch(imgs, stats, torch.Generator().manual_seed(0), crop=CROP, lighting=0.0)
    assert out.shape == (b, 3, 224, 224) and out.dtype == torch.float32
    tops, lefts, flips = [], [], []
    for i in range(b):
        top, left, flipped = _recover(out[i])
        assert 0 <= top <= 32 and 0 <= left <= 32
        # the whole view is that crop of image i (mirrored if flipped), minus the mean image cropped
        # at the very same pixels
        torch.testing.assert_close(
            as_pixels(out[i]), expected_with_mean(i, top, left, flipped), rtol=0, atol=1e-3, msg=f"image {i}"
        )
        tops.append(top)
        lefts.append(left)
        flips.append(flipped)
    assert any(flips) and not all(flips)
    assert len(set(tops)) > 10 and len(set(lefts)) > 10


def test_train_batch_deterministic_per_generator_seed() -> None:
    imgs = coord_images(8)
    stats = identity_stats()
    torch.manual_seed(1)
    a = train_batch(imgs, stats, torch.Generator().manual_seed(42), crop=CROP)
    torch.manual_seed(2)  # the global RNG plays no part
    b = train_batch(imgs, stats, torch.Generator().manual_seed(42), crop=CROP)
    c = train_batch(imgs, stats, torch.Generator().manual_seed(43), crop=CROP)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_train_crop_offsets_cover_full_range() -> None:
    # small images, many samples: every offset 0..s-crop occurs, both as top and as left, and no other
    s, crop, b = 16, 8, 600
    imgs = coord_images(b, s)
    out = train_batch(imgs, identity_stats(), torch.Generator().manual_seed(3), crop=crop, lighting=0.0)
    found = [_recover(out[i]) for i in range(b)]
    for i, (top, left, flipped) in enumerate(found):
        torch.testing.assert_close(as_pixels(out[i]), expected_view(i, top, left, flipped, crop), rtol=0, atol=1e-3)
    assert {t for t, _, _ in found} == set(range(s - crop + 1))
    assert {left for _, left, _ in found} == set(range(s - crop + 1))
    n_flipped = sum(f for _, _, f in found)
    assert abs(n_flipped - b / 2) < 4 * math.sqrt(b / 4)


# ------------------------------------------------------------------------------------ lighting


def _grey_batch(b: int, s: int = 8, value: int = 128) -> torch.Tensor:
    return torch.full((b, 3, s, s), value, dtype=torch.uint8)


def test_lighting_zero_gives_no_offset() -> None:
    out = train_batch(_grey_batch(16), identity_stats(), torch.Generator().manual_seed(0), crop=8, lighting=0.0)
    assert torch.equal(out, torch.full_like(out, 128 / 255))


@pytest.mark.parametrize("lighting", [0.1, 0.3])
def test_lighting_statistics(lighting: float) -> None:
    b = 4000
    stats = identity_stats()
    out = train_batch(_grey_batch(b), stats, torch.Generator().manual_seed(11), crop=8, lighting=lighting)
    offsets = out - 128 / 255
    # one colour offset per image, the same at every pixel
    per_image = offsets[:, :, 0, 0]
    assert (offsets - per_image[:, :, None, None]).abs().max() < 1e-6
    assert per_image.std(dim=0).min() > 0
    # the paper: offset = [p1 p2 p3] @ [a1 l1, a2 l2, a3 l3], a_i ~ N(0, lighting), p_i the columns
    eigvec = torch.tensor(IMAGENET_EIGVEC, dtype=torch.float64)
    eigval = torch.tensor(IMAGENET_EIGVAL, dtype=torch.float64)
    off = per_image.double()
    cov = torch.cov(off.T)
    want = eigvec @ torch.diag((lighting * eigval) ** 2) @ eigvec.T
    assert torch.allclose(cov, want, rtol=0, atol=0.1 * want.abs().max())
    # sharper: in the principal axes the components are uncorrelated, zero mean, std lighting * l_i
    z = off @ eigvec
    n = off.shape[0]
    for i in range(3):
        sd = lighting * eigval[i]
        assert abs(z[:, i].mean()) < 5 * sd / math.sqrt(n)
        assert abs(z[:, i].std() / sd - 1) < 5 / math.sqrt(2 * n)
    corr = torch.corrcoef(z.T)
    off_diag = corr - torch.diag(torch.diag(corr))
    assert off_diag.abs().max() < 5 / math.sqrt(n)


def test_lighting_scaled_by_std() -> None:
    # offsets are in [0, 1] pixel units, so with the raw 0..255 scale they are 255 times larger
    g = 5
    one = train_batch(_grey_batch(64), identity_stats(), torch.Generator().manual_seed(g), crop=8, lighting=0.1)
    raw = train_batch(
        _grey_batch(64), identity_stats(std=1 / 255), torch.Generator().manual_seed(g), crop=8, lighting=0.1
    )
    torch.testing.assert_close(raw - 128, (one - 128 / 255) * 255, rtol=1e-4, atol=1e-4)


def test_lighting_offsets_column_convention() -> None:
    # The ImageNet constants as commonly used (fb.resnet.torch): eigenvectors are the matrix's columns,
    # the first (largest, 0.2175) one the near-grey luminance axis.
    stats = identity_stats()
    e0 = lighting_offsets(torch.tensor([[1.0, 0.0, 0.0]]), stats)[0]
    torch.testing.assert_close(e0, 0.2175 * torch.tensor([-0.5675, -0.5808, -0.5836]))
    alpha = torch.tensor([[0.3, -1.2, 2.0]])
    want = sum(alpha[0, j] * IMAGENET_EIGVAL[j] * torch.tensor([r[j] for r in IMAGENET_EIGVEC]) for j in range(3))
    torch.testing.assert_close(lighting_offsets(alpha, stats)[0], want)


# --------------------------------------------------------------------------------- pixel stats


def _random_covariance(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.1
    return (a @ a.T + 1e-4 * torch.eye(3, dtype=torch.float64)).float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_make_pixel_stats_dataset_pca(seed: int) -> None:
    cov = _random_covariance(seed)
    stats = make_pixel_stats(torch.rand(3, 16, 16), cov, pca="dataset")
    assert stats.eigval.shape == (3,) and stats.eigvec.shape == (3, 3)
    c = cov.double()
    v = stats.eigvec.double()
    lam = stats.eigval.double()
    for i in range(3):
        torch.testing.assert_close(c @ v[:, i], lam[i] * v[:, i], rtol=0, atol=1e-6)
        assert v[:, i].norm().item() == pytest.approx(1.0, abs=1e-5)
    assert lam[0] >= lam[1] >= lam[2]
    true = torch.linalg.eigvalsh(c).flip(0)
    torch.testing.assert_close(lam, true, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(v.T @ v, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-5)


def test_dataset_pca_of_real_photographs_is_on_the_scale_of_the_imagenet_constants() -> None:
    """`--pca dataset` and `--pca imagenet` are the same lighting: the eigenvalues of the RGB covariance
    of photographs (in [0, 1] units) are close to the widely used constants (docs/reference.md §4)."""
    split = open_split(SHARED_DATA / "imagenet-sample-1000", "val")
    mean_image, cov, count, _ = image_moments(make_loader(ImageDataset(split.samples[::10]), 50, 0))
    assert count == 100
    stats = make_pixel_stats(mean_image, cov, pca="dataset")
    torch.testing.assert_close(stats.eigval, torch.tensor(IMAGENET_EIGVAL), rtol=0.35, atol=0)
    for i in range(2):  # the two leading axes (the third is noise at 100 images): the same, up to sign
        assert abs(stats.eigvec[:, i] @ torch.tensor(IMAGENET_EIGVEC)[:, i]) > 0.95


def test_make_pixel_stats_imagenet_constants() -> None:
    stats = make_pixel_stats(torch.rand(3, 16, 16), _random_covariance(0), pca="imagenet")
    torch.testing.assert_close(stats.eigval, torch.tensor([0.2175, 0.0188, 0.0045]))
    torch.testing.assert_close(
        stats.eigvec,
        torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]),
    )


def test_make_pixel_stats_mean_and_scale() -> None:
    mean_image = torch.rand(3, 16, 16)
    cov = _random_covariance(0)
    pixel = make_pixel_stats(mean_image, cov, mean="pixel", scale="raw")
    torch.testing.assert_close(pixel.mean, mean_image)
    torch.testing.assert_close(pixel.std, torch.full((3, 1, 1), 1 / 255))
    channel = make_pixel_stats(mean_image, cov, mean="channel", scale="imagenet")
    assert channel.mean.shape == (3, 1, 1)
    for ch in range(3):
        assert channel.mean[ch, 0, 0].item() == pytest.approx(mean_image[ch].mean().item(), rel=1e-5)
    torch.testing.assert_close(channel.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    assert tuple(IMAGENET_STD) == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("per_pixel", [True, False])
def test_gpu_gather_and_cpu_slicing_crop_alike(per_pixel):
    """train_batch crops by one gather on CUDA and by slicing on the CPU: both must give the same pixels."""
    from alexnet.data.augment import _crops_by_gather, _crops_by_slicing

    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=g)
    mean = torch.rand(3, 40, 40, generator=g) if per_pixel else torch.rand(3, 1, 1, generator=g)
    stats = PixelStats(mean, torch.full((3, 1, 1), 0.2), torch.ones(3), torch.eye(3))
    top, left = torch.randint(0, 9, (6,), generator=g), torch.randint(0, 9, (6,), generator=g)
    flip = torch.tensor([True, False, True, True, False, False])
    shift = torch.randn(6, 3, generator=g) * 0.05
    a = _crops_by_gather(images, stats, top, left, flip, 32) + shift[:, :, None, None] / stats.std
    b = _crops_by_slicing(images, stats, top, left, flip, 32, shift)
    assert a.shape == (6, 3, 32, 32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
