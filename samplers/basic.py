"""Euler, Heun and Euler-ancestral samplers in k-diffusion form: fn(model, x, sigmas, extra_args, callback, ...).

`model(x, sigma_batch, **extra_args)` returns the denoised estimate, as ComfyUI's KSAMPLER passes it;
the same functions run on any plain Denoiser in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .steppers import NoiseFn, euler_ancestral_step, euler_step, heun_step, seeded_noise

Callback = Callable[[dict[str, Any]], None]


def bind_model(model: Callable[..., Tensor], x: Tensor, extra_args: dict | None) -> Callable[[Tensor, Tensor], Tensor]:
    """A Denoiser D(x, sigma) over a k-diffusion model, broadcasting a scalar sigma to the batch."""
    kwargs = extra_args or {}
    ones = x.new_ones([x.shape[0]])

    def denoise(x_: Tensor, sigma: Tensor) -> Tensor:
        return model(x_, sigma * ones if sigma.ndim == 0 else sigma, **kwargs)

    return denoise


def _report(callback: Callback | None, x: Tensor, i: int, sigma: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()  # samplers never need gradients through the model (as k-diffusion's)
def sample_euler(model, x: Tensor, sigmas: Tensor, extra_args=None, callback=None, disable=None) -> Tensor:
    denoise = bind_model(model, x, extra_args)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _report(callback, x, i, sigmas[i], denoised)
        x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_heun(model, x: Tensor, sigmas: Tensor, extra_args=None, callback=None, disable=None) -> Tensor:
    denoise = bind_model(model, x, extra_args)
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _report(callback, x, i, sigmas[i], denoised)
        x, _ = heun_step(denoise, x, denoised, sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model,
    x: Tensor,
    sigmas: Tensor,
    extra_args=None,
    callback=None,
    disable=None,
    eta: float = 1.0,
    flow: bool = False,
    noise_fn: NoiseFn | None = None,
) -> Tensor:
    """Ancestral sampling with i.i.d. noise per element (seeded from extra_args["seed"] when given)."""
    denoise = bind_model(model, x, extra_args)
    if noise_fn is None:
        noise_fn = seeded_noise((extra_args or {}).get("seed"))
    for i in range(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        _report(callback, x, i, sigmas[i], denoised)
        x = euler_ancestral_step(x, denoised, float(sigmas[i]), float(sigmas[i + 1]), noise_fn, eta, flow)
    return x
