"""Task transforms as whole-tensor operations on (N, C, H, W) images, applied once per task; the
permutation and the normalization also take (N, D) feature vectors (one channel of D values)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def pad(x: Tensor, to: int) -> Tensor:
    """Zero-pad square images to ``to``×``to``, centred (28→32 adds 2 pixels on each side)."""
    h, w = x.shape[-2:]
    if to <= 0 or (h == to and w == to):
        return x
    if to < h or to < w:
        raise ValueError(f"benchmark.pad={to} is smaller than the images ({h}×{w})")
    top, left = (to - h) // 2, (to - w) // 2
    return F.pad(x, (left, to - w - left, top, to - h - top))


def permute_pixels(x: Tensor, perm: Tensor) -> Tensor:
    """Apply one fixed permutation to the flattened pixels (all channels alike), as one gather
    (faster on the CPU than advanced indexing along the last dimension; the same values). Feature
    vectors (N, D): the permutation of the D values."""
    if x.dim() == 2:
        return x.gather(1, perm.to(x.device).expand(x.shape[0], x.shape[1]))
    n, c, h, w = x.shape
    index = perm.to(x.device).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)


def pixel_permutation(n_pixels: int, generator: torch.Generator) -> Tensor:
    return torch.randperm(n_pixels, generator=generator)


def pixel_count(x: Tensor) -> int:
    """The number of positions a permutation acts on: H·W for images, D for feature vectors."""
    return x.shape[-1] * x.shape[-2] if x.dim() == 4 else x.shape[-1]


def normalize(x: Tensor, mean: float | list[float], std: float | list[float]) -> Tensor:
    """(x - mean) / std per channel (one value, or one per channel); feature vectors have one channel."""
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    return (x - mean_t) / std_t


def channel_stats(x: Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a batch of images (used for ``normalize: auto``); feature vectors
    (N, D): one mean and one std over all their values."""
    if x.dim() == 2:
        return [x.mean().item()], [x.std().item()]
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


INTERPOLATIONS = ("bilinear", "nearest")


def rotate(x: Tensor, degrees: float, interpolation: str = "bilinear") -> Tensor:
    """Rotate images counter-clockwise about their centre, filling with zeros. 0° (and multiples of
    360°) returns the input unchanged.

    - ``bilinear``: ``grid_sample`` with bilinear weights (the default).
    - ``nearest``: PIL's ``Image.rotate(angle)`` with its default NEAREST resampling, which is what
      ``torchvision.transforms.functional.rotate`` does to a PIL image (mammoth's R-MNIST, Buzzega et
      al. 2020), computed the way PIL computes it (:func:`_rotate_nearest`): equal to PIL's result pixel
      for pixel (tests/test_der2020.py).
    """
    if interpolation not in INTERPOLATIONS:
        choices = ", ".join(INTERPOLATIONS)
        raise ValueError(f"benchmark.interpolation={interpolation!r} is unknown; choose one of: {choices}")
    if float(degrees) % 360 == 0:
        return x
    if interpolation == "nearest":
        return _rotate_nearest(x, float(degrees))
    theta = torch.deg2rad(torch.tensor(float(degrees), dtype=torch.float64))
    cos, sin = torch.cos(theta).item(), torch.sin(theta).item()
    # affine_grid maps each output pixel to the input point it samples (x to the right, y downwards),
    # so a counter-clockwise turn of the image samples through the matrix below
    mat = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(mat.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _rotate_nearest(x: Tensor, degrees: float) -> Tensor:
    """PIL's ``Image.rotate(degrees)`` (NEAREST, expand=False, centre (W/2, H/2), fill 0) of every image,
    computed as PIL computes it: the matrix in double precision with cos/sin rounded to 15 decimals
    (``Image.rotate``), then libImaging's ``affine_fixed``: 16.16 fixed-point coefficients, output pixel
    centres (x + ½, y + ½), source pixel = the fixed-point coordinate shifted right by 16, zero outside."""
    n, c, h, w = x.shape
    a = -math.radians(degrees % 360.0)
    m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
    cx, cy = w / 2, h / 2
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy

    def fix(v: float) -> int:  # FIX(v) = FLOOR(v * 65536.0 + 0.5)
        return math.floor(v * 65536.0 + 0.5)

    a0, a1, a3, a4 = fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4])
    a2, a5 = fix(m[2] + m[0] * 0.5 + m[1] * 0.5), fix(m[5] + m[3] * 0.5 + m[4] * 0.5)
    xs, ys = torch.arange(w, dtype=torch.int64), torch.arange(h, dtype=torch.int64)
    col = torch.div(a2 + ys[:, None] * a1 + xs[None, :] * a0, 65536, rounding_mode="floor")  # (H, W)
    row = torch.div(a5 + ys[:, None] * a4 + xs[None, :] * a3, 65536, rounding_mode="floor")
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    src = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).flatten().to(x.device)
    out = x.reshape(n, c, h * w).index_select(2, src)
    return out.mul_(inside.flatten().to(device=x.device, dtype=x.dtype)).reshape(n, c, h, w)
