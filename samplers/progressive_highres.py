"""DiffuseHigh (Kim et al. 2024) as pure torch: the stage plan, the per-step low-band replacement, the stage loop.

Per stage: upsample the current image bicubically, sharpen it, take the low band (LL) of its one-level DWT as the
structure reference, encode it, noise it to the `denoise` level and denoise; during the first `dwt_steps` steps the
denoised estimate x0 gets its low band replaced by the reference before the step is taken from it. In "image"
space x0 is decoded, swapped and re-encoded (the paper); in "latent" space the swap is done on the latent itself
(no VAE call per step; the reference is the LL of the encoded guide image).

The VAE, the sampler and the model stay outside: the loop takes decode / encode / sample callables, and the
replacement is a function over a Denoiser (samplers.conventions), so the ComfyUI layer only adapts them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..guidance.sharpen import sharpen
from ..guidance.wavelets import low_band, replace_low_band
from .conventions import Denoiser

GUIDANCE_SPACES = ("image", "latent")
MAX_SIDE_PIXELS = 16384  # ComfyUI's MAX_RESOLUTION
SIGMA_RTOL = 1e-4  # a sampler's model calls may carry its sigmas through float32 arithmetic

LatentFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class StagePlan:
    """Latent (height, width) of every stage, and what rounding changed (one line per stage that was rounded)."""

    sizes: tuple[tuple[int, int], ...]
    warnings: tuple[str, ...]


_SIZE = re.compile(r"^(\d+)\s*[x×*]\s*(\d+)$")


def parse_target_sizes(text: str) -> list[tuple[int, int]]:
    """'2048x2048, 3072x3072' -> [(2048, 2048), (3072, 3072)]: pixel (width, height) per stage; '' -> []."""
    sizes = []
    for token in (t.strip() for t in re.split(r"[,;\n]+", text.strip())):
        if not token:
            continue
        m = _SIZE.match(token.lower())
        if not m:
            raise ValueError(f"target_sizes: {token!r} is not WIDTHxHEIGHT in pixels, e.g. '2048x2048, 3072x3072'")
        width, height = int(m.group(1)), int(m.group(2))
        if width < 1 or height < 1:
            raise ValueError(f"target_sizes: {token!r} has a zero side")
        sizes.append((width, height))
    return sizes


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, multiple * round(value / multiple))


def plan_stages(
    base_size: tuple[int, int],
    scale_factor: float,
    stages: int,
    latent_multiple: int = 1,
    compression: int = 8,
    target_sizes: Sequence[tuple[int, int]] = (),
) -> StagePlan:
    """Latent sizes per stage, each side a multiple of `latent_multiple` (the model's patch size).

    base_size: the input latent's (height, width). Without target_sizes, stage k (from 1) is base * scale^k,
    rounded from the exact product so rounding never accumulates. target_sizes: pixel (width, height) per
    stage, which overrides scale_factor and stages; each becomes latent = pixels / compression, rounded.
    """
    if latent_multiple < 1 or compression < 1:
        raise ValueError(f"latent_multiple ({latent_multiple}) and compression ({compression}) must be >= 1")
    height, width = base_size
    warnings = []
    sizes = []
    if target_sizes:
        requested = [(h / compression, w / compression, f"{w}x{h} px") for w, h in target_sizes]
        source = "target_sizes"
    else:
        if not math.isfinite(scale_factor) or scale_factor < 1.0:
            raise ValueError(f"scale_factor: {scale_factor} must be a number >= 1.0 (the upscale per stage)")
        if stages < 1:
            raise ValueError(f"stages: {stages} must be at least 1")
        requested = [
            (height * scale_factor**k, width * scale_factor**k, f"x{scale_factor:g}^{k}") for k in range(1, stages + 1)
        ]
        source = "scale_factor"
    for k, (want_h, want_w, label) in enumerate(requested, start=1):
        got = (_round_to(want_h, latent_multiple), _round_to(want_w, latent_multiple))
        if max(got) * compression > MAX_SIDE_PIXELS:
            raise ValueError(
                f"{source}: stage {k} would be {got[1] * compression}x{got[0] * compression} px, beyond ComfyUI's "
                f"maximum side of {MAX_SIDE_PIXELS}"
            )
        if not (math.isclose(got[0], want_h, abs_tol=1e-6) and math.isclose(got[1], want_w, abs_tol=1e-6)):
            warnings.append(
                f"stage {k} ({label}): latent {want_w:g}x{want_h:g} rounded to {got[1]}x{got[0]} "
                f"({got[1] * compression}x{got[0] * compression} px; the model takes multiples of {latent_multiple})"
            )
        sizes.append(got)
    return StagePlan(tuple(sizes), tuple(warnings))


# ------------------------------------------------------------------ per-step low-band replacement


def guided_sigma_floor(sigmas: Sequence[float] | Tensor, guided_steps: int) -> float:
    """The lowest noise level still guided: the sigma of step `guided_steps` (1-based); inf when none is."""
    values = [float(s) for s in sigmas]
    steps = len(values) - 1
    if guided_steps <= 0 or steps <= 0:
        return math.inf
    return values[min(guided_steps, steps) - 1]


def is_guided(sigma: float, floor: float) -> bool:
    """Whether a model call at `sigma` belongs to the guided steps (calls between two steps count with the
    earlier one only if they are at or above its sigma, so a Heun corrector of the last guided step is not)."""
    return sigma >= floor * (1.0 - SIGMA_RTOL)


def guide_denoised(
    denoised: Tensor, sigma: float, sigmas: Sequence[float] | Tensor, guided_steps: int, replace: LatentFn
) -> Tensor:
    """The denoised estimate with its low band replaced when `sigma` is within the first `guided_steps` steps."""
    return replace(denoised) if is_guided(sigma, guided_sigma_floor(sigmas, guided_steps)) else denoised


def structure_guided_denoiser(
    denoiser: Denoiser, sigmas: Sequence[float] | Tensor, guided_steps: int, replace: LatentFn
) -> Denoiser:
    """D'(x, sigma) = replace(D(x, sigma)) for the first `guided_steps` steps of `sigmas`, D otherwise."""

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        level = float(torch.as_tensor(sigma).flatten()[0])
        return guide_denoised(denoiser(x, sigma), level, sigmas, guided_steps, replace)

    return guided


def low_band_replacer(
    reference_low: Tensor,
    wavelet: str,
    mode: str,
    decode: LatentFn | None = None,
    encode: LatentFn | None = None,
) -> LatentFn:
    """x0 -> encode(swap(decode(x0))): the swap on images (with the VAE) or, without decode/encode, on latents."""

    def replace(x0: Tensor) -> Tensor:
        signal = decode(x0) if decode is not None else x0
        swapped = replace_low_band(signal, reference_low, wavelet, mode)
        return encode(swapped) if encode is not None else swapped

    return replace


# ------------------------------------------------------------------ the stage loop


def upsample_bicubic(image: Tensor, size: tuple[int, int]) -> Tensor:
    """image [N, C, H, W] -> [N, C, *size], bicubic without clamping (as ComfyUI's ImageScale 'bicubic')."""
    return F.interpolate(image, size=size, mode="bicubic")


@dataclass(frozen=True)
class StructureGuidance:
    """How each stage builds and enforces its structure reference."""

    guided_steps: int = 5
    wavelet: str = "db4"
    mode: str = "symmetric"
    sharpen: float = 1.0
    sharpen_sigma: float = 1.0
    space: str = "image"

    def __post_init__(self):
        if self.space not in GUIDANCE_SPACES:
            raise ValueError(f"guidance_space: {self.space!r} is not one of {GUIDANCE_SPACES}")
        if self.guided_steps < 0:
            raise ValueError(f"dwt_steps: {self.guided_steps} must be >= 0")


# sample(stage index, start latent, x0 replacement for the guided steps) -> the denoised latent
StageSampler = Callable[[int, Tensor, LatentFn], Tensor]


def progressive_upscale(
    latent: Tensor,
    sizes: Sequence[tuple[int, int]],
    compression: int,
    guidance: StructureGuidance,
    decode: LatentFn,
    encode: LatentFn,
    sample: StageSampler,
) -> Tensor:
    """Run every stage; decode/encode map latents to images [N, C, H, W] and back, frames folded into N."""
    image = decode(latent)
    for stage, (height, width) in enumerate(sizes):
        guide = upsample_bicubic(image, (height * compression, width * compression))
        guide = sharpen(guide, guidance.sharpen, guidance.sharpen_sigma)
        start = encode(guide)
        if guidance.space == "image":
            reference = low_band(guide, guidance.wavelet, guidance.mode)
            replace = low_band_replacer(reference, guidance.wavelet, guidance.mode, decode, encode)
        else:
            reference = low_band(start, guidance.wavelet, guidance.mode)
            replace = low_band_replacer(reference, guidance.wavelet, guidance.mode)
        latent = sample(stage, start, replace)
        if stage + 1 < len(sizes):
            image = decode(latent)
    return latent
