"""Single steps of the probability-flow ODE and of its ancestral SDE, written once for every sampler.

All steps move x from sigma to sigma_next given the denoised estimate at (x, sigma). Flow models use
the same ODE in their own variable; the ancestral step works through the equivalent VE form so that
one formula serves both parametrisations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .conventions import Denoiser, append_dims, ode_derivative

NoiseFn = Callable[[Tensor], Tensor]  # noise_fn(x) -> i.i.d. standard normal noise shaped like x


def euler_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    return x + append_dims(sigma_next - sigma, x.ndim) * ode_derivative(x, denoised, sigma)


def heun_step(
    denoiser: Denoiser, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Heun's second-order step. Returns (x_next, derivative at x_next) for samplers that reuse it.

    A step to sigma_next = 0 is plain Euler: the derivative (x - D) / sigma does not exist at 0.
    """
    d = ode_derivative(x, denoised, sigma)
    h = append_dims(sigma_next - sigma, x.ndim)
    x_euler = x + h * d
    if bool((sigma_next == 0).all()):
        return x_euler, None
    d_next = ode_derivative(x_euler, denoiser(x_euler, sigma_next), sigma_next)
    return x + h * (d + d_next) / 2, d_next


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a VE step sigma -> sigma_next into a deterministic move to sigma_down and fresh noise sigma_up.

    sigma_down^2 + sigma_up^2 = sigma_next^2, so the marginal at sigma_next is exact; eta = 1 is DDPM-like
    ancestral sampling, eta = 0 the ODE. sigma may be infinite (a flow model's sigma = 1 in VE form).
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(1.0 - (sigma_next / sigma) ** 2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def euler_ancestral_step(
    x: Tensor,
    denoised: Tensor,
    sigma: float,
    sigma_next: float,
    noise_fn: NoiseFn,
    eta: float = 1.0,
    flow: bool = False,
    noise_scale: float = 1.0,
) -> Tensor:
    """Euler-ancestral step with fresh i.i.d. noise; `flow` steps a CONST (rectified-flow) sample.
    `noise_scale` multiplies the fresh noise (FKC's tempered SDE uses 1 / sqrt(B)).

    Written as x_next = alpha_next (D + sigma_down eps_hat + sigma_up z) in VE terms, with eps_hat the predicted
    noise, so a flow step from sigma = 1 (pure noise, infinite VE sigma) stays finite.
    """
    s, s_next = float(sigma), float(sigma_next)
    if flow:
        s_ve = math.inf if s >= 1.0 else s / (1.0 - s)
        s_next_ve = math.inf if s_next >= 1.0 else s_next / (1.0 - s_next)
        alpha_next = 1.0 - s_next
        eps_hat = (x - (1.0 - s) * denoised) / s
    else:
        s_ve, s_next_ve, alpha_next = s, s_next, 1.0
        eps_hat = ode_derivative(x, denoised, torch.tensor(s, dtype=x.dtype))
    sigma_down, sigma_up = ancestral_sigmas(s_ve, s_next_ve, eta)
    x_next = denoised + sigma_down * eps_hat
    if sigma_up > 0:
        x_next = x_next + (sigma_up * noise_scale) * noise_fn(x)
    return alpha_next * x_next


def seeded_noise(seed: int | None) -> NoiseFn:
    """i.i.d. N(0, 1) noise from one generator: every element of every particle is independent."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def noise_fn(x: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)

    return noise_fn
