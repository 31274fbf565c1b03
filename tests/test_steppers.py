"""The shared steppers against the exact Gaussian mixture and against ComfyUI's own k-diffusion samplers."""

import math

import numpy as np
import pytest
import torch
from gmm_exact import GaussianMixture, flow_alpha, ve_alpha
from harness import pack
from scipy.integrate import solve_ivp

basic = pack("samplers.basic")

GMM = GaussianMixture(means=[[-2.0], [0.5], [2.5]], weights=[0.3, 0.2, 0.5], stds=[0.4, 0.3, 0.5])


def denoiser(alpha_fn):
    def d(x, sigma):
        return GMM.denoise(x, sigma, alpha_fn)

    return d


def reference_ode(x0, sigmas, alpha_fn):
    """High-accuracy solve of dx/dsigma = (x - D(x, sigma)) / sigma (DOP853, rtol 1e-12)."""
    d = denoiser(alpha_fn)

    def rhs(s, y):
        x = torch.from_numpy(y).reshape(x0.shape)
        st = torch.full((x.shape[0],), s, dtype=torch.float64)
        return ((x - d(x, st)) / s).reshape(-1).numpy()

    sol = solve_ivp(rhs, (float(sigmas[0]), float(sigmas[-1])), x0.reshape(-1).numpy(), method="DOP853",
                    rtol=1e-12, atol=1e-12)  # fmt: skip
    return torch.from_numpy(sol.y[:, -1]).reshape(x0.shape)


def convergence_slope(sampler, schedule, alpha_fn):
    x_start = torch.linspace(-3, 3, 16, dtype=torch.float64)[:, None] * float(schedule(4)[0])
    reference = reference_ode(x_start, schedule(4), alpha_fn)
    steps = [16, 32, 64, 128]
    errors = [(sampler(denoiser(alpha_fn), x_start, schedule(n)) - reference).abs().max().item() for n in steps]
    return np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


def ve_schedule(n):  # log-uniform from 10 down to 0.1 (stop short of 0: the ODE slope is measured, not the last Euler)
    return torch.exp(torch.linspace(math.log(10.0), math.log(0.1), n + 1, dtype=torch.float64))


def flow_schedule(n):
    return torch.linspace(0.95, 0.05, n + 1, dtype=torch.float64)


@pytest.mark.parametrize("schedule,alpha_fn", [(ve_schedule, ve_alpha), (flow_schedule, flow_alpha)])
def test_euler_is_first_order_and_heun_second_order(schedule, alpha_fn):
    euler_slope, euler_err = convergence_slope(basic.sample_euler, schedule, alpha_fn)
    heun_slope, heun_err = convergence_slope(basic.sample_heun, schedule, alpha_fn)
    assert -1.25 < euler_slope < -0.8, (euler_slope, euler_err)
    assert -2.3 < heun_slope < -1.75, (heun_slope, heun_err)
    assert heun_err[-1] < euler_err[-1] / 10


class _ComfyModel:
    """The attribute chain ComfyUI's samplers inspect (model.inner_model.inner_model.model_sampling)."""

    def __init__(self, d, model_sampling):
        self.d = d
        self.inner_model = type("Inner", (), {"inner_model": type("M", (), {"model_sampling": model_sampling})()})()

    def __call__(self, x, sigma, **kwargs):
        return self.d(x, sigma)


def _karras(n, smin=0.03, smax=14.6, rho=7.0):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def test_same_results_as_comfyui_samplers(host):
    import comfy.k_diffusion.sampling as kds

    sigmas = _karras(20)
    x = torch.randn(32, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    model = _ComfyModel(denoiser(ve_alpha), model_sampling=object())
    torch.testing.assert_close(basic.sample_euler(model, x, sigmas), kds.sample_euler(model, x, sigmas, disable=True))
    torch.testing.assert_close(basic.sample_heun(model, x, sigmas), kds.sample_heun(model, x, sigmas, disable=True))

    def noise_stream():
        g = torch.Generator().manual_seed(7)
        return lambda *a: torch.randn(x.shape, generator=g, dtype=x.dtype)

    ours = basic.sample_euler_ancestral(model, x, sigmas, noise_fn=(lambda stream: lambda _x: stream())(noise_stream()))
    theirs = kds.sample_euler_ancestral(model, x, sigmas, disable=True, noise_sampler=noise_stream())
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("flow", [False, True])
def test_euler_ancestral_samples_the_exact_mixture(flow):
    n = 4000
    # Flow schedules start at sigma = 1 (pure noise; infinite in VE form): the step must stay finite there.
    sigmas = torch.linspace(1.0, 0, 201, dtype=torch.float64) if flow else _karras(200, smax=20.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64) * sigmas[0]
    alpha_fn = flow_alpha if flow else ve_alpha
    out = basic.sample_euler_ancestral(
        lambda x_, s: GMM.denoise(x_, s, alpha_fn), x, sigmas, flow=flow, extra_args=None,
        noise_fn=lambda x_: torch.randn(x_.shape, generator=g, dtype=x_.dtype),
    )  # fmt: skip
    modes = GMM.nearest_mode(out)
    for k, w in enumerate(GMM.weights.tolist()):
        frac = (modes == k).double().mean().item()
        # Nearest-mode labels misassign a little tail mass (<1%); binomial sampling error at n = 4000 is <0.8%.
        assert abs(frac - w) < 4 * math.sqrt(w * (1 - w) / n) + 0.01, (k, frac, w)
    # Particles started apart stay independent: i.i.d. noise per particle, no duplicates.
    assert out.unique().numel() == n
