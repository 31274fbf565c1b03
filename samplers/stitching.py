"""Trajectory stitching (T-Stitch, Pan et al. 2024): which model of a chain denoises at a given noise level.

A chain of models is split by cumulative fractions r_1 <= r_2 <= ...: model k takes the steps from floor(r_{k-1} N)
to floor(r_k N) (the official SD rule, floor(r N) steps on the first model), the last model the rest. Each switch
is expressed as a sigma threshold, and a model call at sigma goes to the model whose range holds it: so every
evaluation of a step (Heun's corrector, a multistage solver's midpoints) is routed consistently by its noise
level, and the step rule and the sigma rule ("switch_by = sigma") share one mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """Cumulative switch fractions: each in [0, 1], non-decreasing."""
    values = [float(f) for f in fractions]
    for i, f in enumerate(values):
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"switch fraction {i + 1} is {f}; it must lie in [0, 1]")
        if i and f < values[i - 1]:
            raise ValueError(f"switch fractions must not decrease: {values}")
    return values


def steps_per_model(n_steps: int, fractions: Sequence[float]) -> list[int]:
    """How many of n_steps each model of the chain takes (len(fractions) + 1 models)."""
    bounds = [0] + [math.floor(f * n_steps + 1e-9) for f in check_fractions(fractions)] + [n_steps]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def step_thresholds(sample_sigmas: Sequence[float], fractions: Sequence[float]) -> list[float]:
    """Sigma thresholds from step fractions: switch k lies at the sigma where step floor(r_k N) starts.

    A call at sigma goes to model k while sigma > threshold_k. floor(r N) = N puts the threshold at the final
    sigma (0 for a full schedule), so the first model takes every call; floor(r N) = 0 puts it above all.
    """
    n_steps = len(sample_sigmas) - 1
    thresholds = []
    for f in check_fractions(fractions):
        first_later_step = math.floor(f * n_steps + 1e-9)
        thresholds.append(math.inf if first_later_step == 0 else float(sample_sigmas[first_later_step]))
    return thresholds


def model_index(sigma: float, thresholds: Sequence[float]) -> int:
    """The chain position for a call at sigma: the first model whose threshold lies below sigma."""
    for i, threshold in enumerate(thresholds):
        if sigma > threshold:
            return i
    return len(thresholds)


def segment_bounds(sample_sigmas: Sequence[float], thresholds: Sequence[float]) -> list[tuple[int, int]]:
    """The steps of one schedule grouped by the model that starts them: [(first step, end step), ...], in order.

    A sampler run separately on each group sees a fresh trajectory at every switch, so a multistep solver's
    history (DPM++ 2M, UniPC, ...) restarts there instead of mixing two models' predictions.
    """
    n_steps = len(sample_sigmas) - 1
    bounds: list[tuple[int, int]] = []
    start = 0
    for i in range(1, n_steps):
        if model_index(sample_sigmas[i], thresholds) != model_index(sample_sigmas[i - 1], thresholds):
            bounds.append((start, i))
            start = i
    if n_steps > 0:
        bounds.append((start, n_steps))
    return bounds
