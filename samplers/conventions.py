"""Conversions between the quantities a diffusion model can predict, in ComfyUI's conventions.

Every ComfyUI model call returns the denoised estimate D(x, sigma). Two parametrisations:
- VE / EPS models (SD1.x, SDXL): x = x0 + sigma * eps.
- Flow models (SD3, Flux, Wan; model_sampling CONST): x = (1 - sigma) * x0 + sigma * eps, sigma in [0, 1].
  Dividing by (1 - sigma) gives the VE form x_ve = x0 + sigma_ve * eps with sigma_ve = sigma / (1 - sigma)
  and the same D, so every VE formula applies to flow models after `flow_to_ve`.
In both, the probability-flow ODE in ComfyUI's variable is dx/dsigma = (x - D) / sigma, which is the
velocity v = eps - x0 for flow models (ComfyUI's sign) and the predicted noise for VE models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# A model as the cores see it: D(x, sigma) -> x0 estimate, with sigma a scalar or one value per batch row.
Denoiser = Callable[[Tensor, Tensor], Tensor]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-row tensor [B] (or a scalar) to broadcast against an ndim tensor."""
    v = torch.as_tensor(v)
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def ode_derivative(x: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE: the VE noise prediction, or the flow velocity."""
    return (x - denoised) / append_dims(sigma, x.ndim)


eps_from_denoised = ode_derivative  # VE: eps_hat = (x - D) / sigma
velocity_from_denoised = ode_derivative  # flow: v = eps - x0 = (x - D) / sigma


def denoised_from_eps(x: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    return x - append_dims(sigma, x.ndim) * eps


denoised_from_velocity = denoised_from_eps


def score_from_denoised(x: Tensor, denoised: Tensor, sigma: Tensor) -> Tensor:
    """VE score grad log p_sigma(x) = (D - x) / sigma^2 (Tweedie). For flow models convert to VE first."""
    return (denoised - x) / append_dims(sigma, x.ndim) ** 2


def flow_sigma_to_ve(sigma: Tensor) -> Tensor:
    return sigma / (1.0 - sigma)


def ve_sigma_to_flow(sigma_ve: Tensor) -> Tensor:
    return sigma_ve / (1.0 + sigma_ve)


def flow_to_ve(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """A flow sample and sigma as the equivalent VE pair (x / (1 - sigma), sigma / (1 - sigma))."""
    return x / append_dims(1.0 - sigma, x.ndim), flow_sigma_to_ve(sigma)


def ve_to_flow(x_ve: Tensor, sigma_ve: Tensor) -> tuple[Tensor, Tensor]:
    sigma = ve_sigma_to_flow(sigma_ve)
    return x_ve * append_dims(1.0 - sigma, x_ve.ndim), sigma


def snr(sigma: Tensor, flow: bool = False) -> Tensor:
    """Signal-to-noise ratio alpha^2 / sigma^2: 1 / sigma^2 (VE) or ((1 - sigma) / sigma)^2 (flow)."""
    ratio = (1.0 - sigma) / sigma if flow else 1.0 / sigma
    return ratio**2
