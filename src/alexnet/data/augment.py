"""The paper's augmentation and test crops, applied to whole batches of 256x256 uint8 images.

Every data path (an image folder decoded per image, a prepared dataset) hands batches of the same
kind here, so training sees identical pixels whichever path produced them.

Pixels are normalised as (x - mean) / std with x in [0, 1]. The paper fed raw 0-255 values minus
the training mean, i.e. std = 1/255; torchvision's weights expect std = the ImageNet channel std.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import warn_slower

# Commonly used ImageNet constants (RGB, [0, 1]): docs/reference.md §4. The eigenvalues are those of
# the RGB covariance in [0, 1] units, as the paper's formula uses them (the covariance of ImageNet-like
# images has eigenvalues close to these); the shift they give is then scaled to the inputs' units.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


@dataclass
class PixelStats:
    """What normalisation and lighting need: computed once over the training set, stored with the run."""

    mean: torch.Tensor  # (3, S, S) mean image, or (3, 1, 1) mean colour
    std: torch.Tensor  # (3, 1, 1)
    eigval: torch.Tensor  # (3,) eigenvalues of the RGB covariance in [0, 1] units, largest first
    eigvec: torch.Tensor  # (3, 3) principal axes as columns

    def to(self, device: torch.device | str) -> PixelStats:
        return PixelStats(*(t.to(device) for t in (self.mean, self.std, self.eigval, self.eigvec)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "eigval": self.eigval, "eigvec": self.eigvec}


def lighting_offsets(alpha: torch.Tensor, stats: PixelStats) -> torch.Tensor:
    """The paper's PCA lighting: [p1 p2 p3] @ [a1 l1, a2 l2, a3 l3] per image. alpha: (B, 3) -> (B, 3)."""
    return (alpha * stats.eigval) @ stats.eigvec.T


def _crops_by_gather(images: torch.Tensor, stats: PixelStats, top, left, flip, crop: int) -> torch.Tensor:
    """Normalised crops in one advanced-indexing gather: few, large kernels, for the GPU."""
    b, _, s, _ = images.shape
    steps = torch.arange(crop, device=images.device)
    rows = (top[:, None] + steps)[:, None, :, None]
    cols = left[:, None] + steps
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    bi = torch.arange(b, device=images.device)[:, None, None, None]
    ci = torch.arange(3, device=images.device)[None, :, None, None]
    mean = stats.mean
    if mean.shape[-1] > 1:  # a mean image: crop it where the image is cropped
        mean = mean.expand(b, 3, s, s)[bi, ci, rows, cols]
    return _normalise(images[bi, ci, rows, cols], mean, stats)


def _crops_by_slicing(
    images: torch.Tensor,
    stats: PixelStats,
    top,
    left,
    flip,
    crop: int,
    shift: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same with the lighting `shift` (B, 3) added, one image at a time in two fused passes:
    out = x * 1/(255 std) - (mean - shift) / std. On a CPU about 10x faster than the gather."""
    b, _, s, _ = images.shape
    if out is None or len(out) < b or out.shape[1:] != (3, crop, crop):
        out = torch.empty(b, 3, crop, crop, device=images.device)
    out = out[:b]  # an epoch's last, smaller batch takes the start of the buffer
    scale = 1.0 / (255.0 * stats.std)
    mean = stats.mean / stats.std
    per_pixel = mean.shape[-1] > 1
    mirrored = mean.flip(-1) if per_pixel else mean  # the mean image of mirrored crops, cut like them
    shift = (shift / stats.std.view(1, 3))[:, :, None, None]
    for i, (t, le, f) in enumerate(zip(top.tolist(), left.tolist(), flip.tolist(), strict=True)):
        x = images[i, :, t : t + crop, le : le + crop]
        if f:
            x = x.flip(-1)  # flipping bytes is cheaper than flipping floats
        if per_pixel:
            m = mirrored[:, t : t + crop, s - le - crop : s - le] if f else mean[:, t : t + crop, le : le + crop]
            torch.sub(shift[i], m, out=out[i])
        else:
            out[i].copy_(shift[i] - mean)
        out[i].addcmul_(x, scale)
    return out


def _normalise(crops_u8: torch.Tensor, mean_crops: torch.Tensor, stats: PixelStats) -> torch.Tensor:
    return (crops_u8.float().div_(255.0) - mean_crops) / stats.std


def train_batch(
    images: torch.Tensor,
    stats: PixelStats,
    generator: torch.Generator,
    crop: int = 224,
    lighting: float = 0.1,
    first: int = 0,
    total: int | None = None,
    out: torch.Tensor | None = None,
    cuda_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random crop, horizontal reflection, PCA lighting and mean subtraction for (B, 3, S, S) uint8.

    All random numbers come from `generator` (on the CPU, in a fixed order), so a batch is a
    function of the images and the generator's seed alone, on any device. `images` may be rows
    first..first+B of a larger batch of `total` images (a DDP rank's share): the numbers are drawn
    for all `total` and this share's are used, so the shares together equal the whole batch.

    On CUDA the pixels are done in one Triton kernel (kernels/augment.py), and the batch comes in
    channels_last and of type `cuda_dtype`: computed in float32, stored in autocast's 16-bit type when
    training in it (the first convolution would cast it anyway; half the bytes written and read). On
    the CPU it is float32. `out`: a (B' >= B, 3, crop, crop) float tensor to reuse on the CPU; the batch
    is its first B rows. A new 77 MB batch costs some 20,000 page faults each time (big blocks come from
    mmap), which is most of the augmentation's time.
    """
    b, _, s, _ = images.shape
    total = b if total is None else total
    rows = slice(first, first + b)

    def draw(values: torch.Tensor) -> torch.Tensor:
        if images.is_cuda:  # from pinned memory, asynchronously: a pageable copy would wait for the GPU
            return values[rows].pin_memory().to(images.device, non_blocking=True)
        return values[rows]

    top = draw(torch.randint(0, s - crop + 1, (total,), generator=generator))
    left = draw(torch.randint(0, s - crop + 1, (total,), generator=generator))
    flip = draw(torch.rand(total, generator=generator) < 0.5)
    alpha = draw(torch.randn(total, 3, generator=generator) * lighting)

    shift = lighting_offsets(alpha, stats) if lighting > 0 else torch.zeros(b, 3, device=images.device)
    if not images.is_cuda:
        return _crops_by_slicing(images, stats, top, left, flip, crop, shift, out)
    if not _TRITON_FAILED:
        try:
            from ..kernels.augment import train_crops  # Triton ships with PyTorch's CUDA wheels on Linux

            return train_crops(images, stats.mean, stats.std, top, left, flip, crop, shift, cuda_dtype)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # a GPU older than Triton supports (a P100), no Triton: PyTorch's operations
            _TRITON_FAILED.append(warn_slower("the augmentation's Triton kernel", e))
    batch = _crops_by_gather(images, stats, top, left, flip, crop) + shift[:, :, None, None] / stats.std
    return batch.to(cuda_dtype)


_TRITON_FAILED: list[str] = []  # why the Triton kernel cannot run here, once it has failed


def crop_offsets(size: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of the four corner crops and the centre crop, in that order."""
    far, mid = size - crop, (size - crop) // 2
    return [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]


def _fixed_crop(images: torch.Tensor, stats: PixelStats, top: int, left: int, crop: int, flip: bool) -> torch.Tensor:
    x = images[:, :, top : top + crop, left : left + crop]
    m = stats.mean[:, top : top + crop, left : left + crop] if stats.mean.shape[-1] > 1 else stats.mean
    out = _normalise(x, m, stats)
    return out.flip(-1) if flip else out


def center_batch(images: torch.Tensor, stats: PixelStats, crop: int = 224) -> torch.Tensor:
    """The central crop of each image, normalised: (B, 3, S, S) uint8 -> (B, 3, crop, crop) float."""
    top, left = crop_offsets(images.shape[-1], crop)[4]
    return _fixed_crop(images, stats, top, left, crop, flip=False)


def ten_crop_batch(images: torch.Tensor, stats: PixelStats, crop: int = 224) -> torch.Tensor:
    """The paper's test views: four corners and centre, then the same five mirrored. -> (B, 10, 3, crop, crop)."""
    offsets = crop_offsets(images.shape[-1], crop)
    views = [_fixed_crop(images, stats, t, left, crop, flip) for flip in (False, True) for t, left in offsets]
    return torch.stack(views, dim=1)


def make_pixel_stats(
    mean_image: torch.Tensor,
    covariance: torch.Tensor,
    mean: str = "pixel",
    scale: str = "raw",
    pca: str = "dataset",
) -> PixelStats:
    """Choose what to subtract ('pixel' image or 'channel' colour), divide by ('raw': 1/255, as the
    paper's 0-255 inputs; 'imagenet': torchvision's std) and which colour axes lighting uses."""
    m = mean_image if mean == "pixel" else mean_image.mean(dim=(1, 2), keepdim=True)
    std = torch.full((3, 1, 1), 1 / 255) if scale == "raw" else torch.tensor(IMAGENET_STD).view(3, 1, 1)
    if pca == "dataset":
        eigval, eigvec = torch.linalg.eigh(covariance.double())  # ascending; the paper lists largest first
        eigval, eigvec = eigval.flip(0).clamp(min=0).float(), eigvec.flip(1).float()
    else:
        eigval, eigvec = torch.tensor(IMAGENET_EIGVAL), torch.tensor(IMAGENET_EIGVEC)
    return PixelStats(m.float().contiguous(), std.float(), eigval, eigvec)
