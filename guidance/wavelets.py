"""One-level 2-D discrete wavelet transform (Haar, Daubechies-4) and its inverse, in plain torch.

DiffuseHigh keeps the structure of an upsampled image by replacing the low band (LL) of each predicted clean
image with the reference's. The official code uses pytorch_wavelets (db4, 'symmetric'); this module needs no
dependency. Both filters are orthonormal, so:
- 'periodization' (circular extension, ceil(n / 2) coefficients per axis) is an orthogonal transform: the
  inverse is its transpose, reconstruction is exact, and after a low-band swap the result's low band equals the
  reference everywhere (even sizes). Odd lengths repeat the last sample first (as PyWavelets does) and crop it
  after; there the coefficients that read that invented sample do not survive a swap.
- 'symmetric' (half-sample mirror extension, floor((n + taps - 1) / 2) coefficients) is redundant near the
  borders: reconstruction is exact, but a swapped low band survives a round trip only on the interior
  coefficients, whose filter support lies inside the signal (`exact_low_band_region`).
'symmetric' uses PyWavelets' indexing a[o] = sum_j dec_lo[j] x_ext[2o + 1 - j] (from its documented convolution;
PyWavelets itself is not installed here to compare); 'periodization' is centred so that low coefficient i sits on
samples 2i and 2i + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

# Orthonormal low-pass (scaling) filters, ordered like PyWavelets' rec_lo; the high-pass is
# g[k] = (-1)^k h[taps - 1 - k]. db4 is Daubechies' minimum-phase spectral factor, computed to 40 digits with
# mpmath and rounded to float64 (orthonormal to 1e-16; the tests check it).
LOW_PASS: dict[str, tuple[float, ...]] = {
    "db4": (
        0.2303778133088965,
        0.7148465705529157,
        0.6308807679298589,
        -0.027983769416859854,
        -0.18703481171909309,
        0.030841381835560764,
        0.0328830116668852,
        -0.010597401785069032,
    ),
    "haar": (1 / math.sqrt(2), 1 / math.sqrt(2)),
}
WAVELETS = tuple(LOW_PASS)
MODES = ("symmetric", "periodization")


def filter_bank(wavelet: str, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """[2, 1, taps]: the low- and high-pass analysis filters, as conv1d (correlation) weights."""
    if wavelet not in LOW_PASS:
        raise ValueError(f"wavelet: {wavelet!r} is not one of {WAVELETS}")
    low = torch.tensor(LOW_PASS[wavelet], dtype=torch.float64)
    signs = torch.tensor([(-1.0) ** k for k in range(low.numel())], dtype=torch.float64)
    high = signs * low.flip(0)
    return torch.stack([low, high]).unsqueeze(1).to(dtype=dtype, device=device)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"wavelet mode: {mode!r} is not one of {MODES}")


def coefficient_count(n: int, wavelet: str, mode: str) -> int:
    """Coefficients per band along an axis of n samples."""
    _check_mode(mode)
    taps = len(LOW_PASS[wavelet])
    return (n + 1) // 2 if mode == "periodization" else (n + taps - 1) // 2


def _first_position(taps: int, mode: str) -> int:
    """Sample position where coefficient 0's filter support starts."""
    return -(taps // 2 - 1) if mode == "periodization" else -(taps - 2)


def _extension_indices(n: int, taps: int, mode: str, device) -> Tensor:
    """Source sample of every position the analysis filters read, under the boundary extension."""
    count = (n + 1) // 2 if mode == "periodization" else (n + taps - 1) // 2
    positions = torch.arange(2 * (count - 1) + taps, device=device) + _first_position(taps, mode)
    if mode == "periodization":
        # Circular over the even length n + n % 2, whose extra sample repeats the last one.
        return positions.remainder(n + n % 2).clamp_max(n - 1)
    folded = positions.remainder(2 * n)  # half-sample mirror: ... x1 x0 | x0 x1 ... x_{n-1} | x_{n-1} ...
    return torch.where(folded >= n, 2 * n - 1 - folded, folded)


def _analysis_last_dim(x: Tensor, bank: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    n, taps = x.shape[-1], bank.shape[-1]
    extended = x.index_select(-1, _extension_indices(n, taps, mode, x.device))
    flat = extended.reshape(-1, 1, extended.shape[-1])
    bands = F.conv1d(flat, bank, stride=2).reshape(*x.shape[:-1], 2, -1)
    return bands[..., 0, :], bands[..., 1, :]


def _synthesis_last_dim(low: Tensor, high: Tensor, bank: Tensor, n: int, mode: str) -> Tensor:
    taps = bank.shape[-1]
    stacked = torch.stack([low, high], dim=-2)
    lead = stacked.shape[:-2]
    spread = F.conv_transpose1d(stacked.reshape(-1, 2, stacked.shape[-1]), bank, stride=2)
    spread = spread.reshape(*lead, spread.shape[-1])
    if mode == "symmetric":  # every needed coefficient exists: the signal is the middle of the synthesis
        return spread[..., taps - 2 : taps - 2 + n]
    # Periodization: the transpose of the orthogonal analysis folds the overhang back circularly.
    even = n + n % 2
    positions = (torch.arange(spread.shape[-1], device=spread.device) + _first_position(taps, mode)).remainder(even)
    out = spread.new_zeros(*lead, even).index_add_(-1, positions, spread)
    return out[..., :n]


@dataclass(frozen=True)
class WaveletBands:
    """One level of a 2-D DWT over the last two axes. `high_w`: high-pass along width (low along height),
    `high_h`: high along height, `high_hw`: high along both. `size`: the transformed (height, width)."""

    low: Tensor
    high_w: Tensor
    high_h: Tensor
    high_hw: Tensor
    size: tuple[int, int]
    wavelet: str
    mode: str


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half precision loses the exactness the swap relies on; the official code also transforms in float32.
    return torch.promote_types(dtype, torch.float32)


def dwt2(x: Tensor, wavelet: str = "db4", mode: str = "symmetric") -> WaveletBands:
    """One-level 2-D DWT of x [..., H, W] (any leading axes), computed in at least float32."""
    _check_mode(mode)
    if x.ndim < 2:
        raise ValueError(f"dwt2 needs a tensor with at least 2 axes, got shape {tuple(x.shape)}")
    bank = filter_bank(wavelet, _work_dtype(x.dtype), x.device)
    work = x.to(bank.dtype)
    low_w, high_w = _analysis_last_dim(work, bank, mode)
    ll, lh = (t.transpose(-1, -2) for t in _analysis_last_dim(low_w.transpose(-1, -2), bank, mode))
    hl, hh = (t.transpose(-1, -2) for t in _analysis_last_dim(high_w.transpose(-1, -2), bank, mode))
    return WaveletBands(ll, hl, lh, hh, (x.shape[-2], x.shape[-1]), wavelet, mode)


def idwt2(bands: WaveletBands) -> Tensor:
    """Inverse of `dwt2`: exact reconstruction of the original [..., H, W] (in the bands' dtype)."""
    height, width = bands.size
    bank = filter_bank(bands.wavelet, bands.low.dtype, bands.low.device)
    low_w = _synthesis_last_dim(bands.low.transpose(-1, -2), bands.high_h.transpose(-1, -2), bank, height, bands.mode)
    high_w = _synthesis_last_dim(
        bands.high_w.transpose(-1, -2), bands.high_hw.transpose(-1, -2), bank, height, bands.mode
    )
    return _synthesis_last_dim(low_w.transpose(-1, -2), high_w.transpose(-1, -2), bank, width, bands.mode)


def low_band(x: Tensor, wavelet: str = "db4", mode: str = "symmetric") -> Tensor:
    return dwt2(x, wavelet, mode).low


def replace_low_band(x: Tensor, reference_low: Tensor, wavelet: str = "db4", mode: str = "symmetric") -> Tensor:
    """x with its low band replaced by `reference_low` (the high bands kept), returned in x's dtype."""
    bands = dwt2(x, wavelet, mode)
    if tuple(reference_low.shape) != tuple(bands.low.shape):
        raise ValueError(
            f"reference low band has shape {tuple(reference_low.shape)}, the tensor's low band "
            f"{tuple(bands.low.shape)}: the reference must come from a tensor of the same shape"
        )
    swapped = replace(bands, low=reference_low.to(device=bands.low.device, dtype=bands.low.dtype))
    return idwt2(swapped).to(x.dtype)


def exact_low_band_region(size: tuple[int, int], wavelet: str, mode: str) -> tuple[slice, slice]:
    """Low-band coefficients (rows, columns) that a swap reproduces exactly after a round trip.

    A coefficient survives when its filter support avoids every sample the transform invents: with
    'symmetric', the mirrored extension (only the interior, support [2i - taps + 2, 2i + 1] inside the signal);
    with 'periodization', the repeated last sample of an odd length (so all of them for even lengths).
    """
    _check_mode(mode)
    taps = len(LOW_PASS[wavelet])

    def axis(n: int) -> slice:
        if mode == "symmetric":
            return slice(taps // 2 - 1, max(taps // 2 - 1, n // 2))
        count = coefficient_count(n, wavelet, mode)
        if n % 2 == 0:
            return slice(0, count)
        even, start = n + 1, _first_position(taps, mode)
        clean = [i for i in range(count) if all((2 * i + start + t) % even != n for t in range(taps))]
        return slice(clean[0], clean[-1] + 1) if clean else slice(0, 0)

    return axis(size[0]), axis(size[1])
