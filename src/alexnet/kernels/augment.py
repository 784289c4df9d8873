"""The training augmentation's pixel work on CUDA in one hand-written Triton kernel.

For each image b, channel c, output row r and column j (augment.py draws the numbers):

    out[b, c, r, j] = (shift[b, c] - mean[c, y, x]) / std[c] + images[b, c, y, x] / (255 std[c])
    y = top[b] + r,   x = left[b] + (crop - 1 - j if flip[b] else j)

the arithmetic of augment.py's CPU path, so both give the same batch. In PyTorch's operations the same
work took a gather of the images, another of the mean image, four passes over the float batch and a
copy into channels_last: 4.6 ms for 512 images on an H200 (benchmarks/RESULTS.md, "augmentation only").
This kernel reads the uint8 crops once and writes the batch once, in channels_last, the layout the
network takes, and in bf16/fp16 when training in those (the type conv1 would cast it to first).

Imported only on CUDA. Tested on the CPU in Triton's interpreter (tests/test_triton_kernels.py,
test_augmentation_kernel_equals_the_cpu_path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.autotune(configs=[triton.Config({"BLOCK_R": r}, num_warps=4) for r in (2, 4, 8)], key=["crop"])
@triton.jit
def _train_crops_kernel(
    images_ptr, out_ptr, top_ptr, left_ptr, flip_ptr, shift_ptr, mean_ptr, scale_ptr, crop,
    image_stride_b, image_stride_c, image_stride_h,  # the images' columns are contiguous
    out_stride_b, out_stride_c, out_stride_h, out_stride_w,
    mean_stride_c, mean_stride_h, mean_stride_w,  # 0, 0 for a mean colour
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.arange(0, BLOCK_W)
    flip = tl.load(flip_ptr + b)
    y = (tl.load(top_ptr + b) + r)[:, None]
    x = (tl.load(left_ptr + b) + tl.where(flip != 0, crop - 1 - j, j))[None, :]
    ok = (r < crop)[:, None] & (j < crop)[None, :]
    image = images_ptr + b.to(tl.int64) * image_stride_b
    out = out_ptr + b.to(tl.int64) * out_stride_b + r[:, None] * out_stride_h + j[None, :] * out_stride_w
    for c in tl.static_range(3):
        pixel = tl.load(image + c * image_stride_c + y * image_stride_h + x, mask=ok, other=0).to(tl.float32)
        mean = tl.load(mean_ptr + c * mean_stride_c + y * mean_stride_h + x * mean_stride_w, mask=ok, other=0.0)
        value = (tl.load(shift_ptr + b * 3 + c) - mean) + pixel * tl.load(scale_ptr + c)
        tl.store(out + c * out_stride_c, value.to(out_ptr.dtype.element_ty), mask=ok)


def train_crops(
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor,
    crop: int,
    shift: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """augment._crops_by_slicing's batch for (B, 3, S, S) uint8 images on one device, in channels_last,
    computed in float32 and stored as `dtype`; `mean` and `std` are a PixelStats' (data/augment.py)."""
    b, _, s, _ = images.shape
    if images.stride(3) != 1:
        images = images.contiguous()
    mean = (mean / std).expand(3, s, s)  # a mean colour is read with strides 0
    std = std.view(3)
    shift = (shift / std).float().contiguous()
    scale = (1.0 / (255.0 * std)).float().contiguous()
    out = torch.empty((b, 3, crop, crop), dtype=dtype, device=images.device, memory_format=torch.channels_last)
    _train_crops_kernel[lambda meta: (b, triton.cdiv(crop, meta["BLOCK_R"]))](
        images, out, top, left, flip.to(torch.uint8), shift, mean, scale, crop,
        images.stride(0), images.stride(1), images.stride(2), *out.stride(), *mean.stride(),
        BLOCK_W=triton.next_power_of_2(crop),
    )  # fmt: skip
    return out
