"""Unsharp masking with a 3x3 Gaussian: G' = (1 + a) G - a blur(G), as DiffuseHigh sharpens its upsampled image.

The official code draws the blur's sigma from U(0.1, 2.0) on every call (torchvision's GaussianBlur); here sigma is
a fixed argument so that a workflow gives the same image every run. Edges are reflected, as torchvision does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_kernel_3x3(sigma: float, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """[3, 3] normalised Gaussian: the outer product of exp(-x^2 / (2 sigma^2)) at x = -1, 0, 1."""
    if sigma <= 0:
        raise ValueError(f"sharpen_sigma: {sigma} must be > 0")
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    line = torch.exp(-0.5 * (x / sigma) ** 2)
    line = line / line.sum()
    return torch.outer(line, line).to(dtype=dtype, device=device)


def gaussian_blur_3x3(image: Tensor, sigma: float) -> Tensor:
    """Blur each channel of image [N, C, H, W] with the 3x3 Gaussian (reflected edges)."""
    channels = image.shape[1]
    kernel = gaussian_kernel_3x3(sigma, image.dtype, image.device).expand(channels, 1, 3, 3)
    # Reflection needs two samples per axis; a single row or column can only be replicated.
    pad_mode = "reflect" if min(image.shape[-2:]) > 1 else "replicate"
    return F.conv2d(F.pad(image, (1, 1, 1, 1), mode=pad_mode), kernel, groups=channels)


def sharpen(image: Tensor, amount: float, sigma: float = 1.0) -> Tensor:
    """(1 + amount) image - amount blur(image) for image [N, C, H, W]; amount 0 returns the image itself."""
    if amount == 0:
        return image
    return (1.0 + amount) * image - amount * gaussian_blur_3x3(image, sigma)
