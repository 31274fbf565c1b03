"""Conventions checked against the exact Gaussian mixture (closed-form posterior mean and density)."""

import torch
from gmm_exact import GaussianMixture, flow_alpha, ve_alpha
from harness import pack

conv = pack("samplers.conventions")

torch.manual_seed(0)
GMM = GaussianMixture(means=[[-2.0, 0.5], [1.5, -1.0], [0.5, 2.0]], weights=[0.2, 0.5, 0.3], stds=[0.3, 0.6, 0.4])
X = torch.randn(64, 2, dtype=torch.float64) * 2


def autograd_score(x, sigma, alpha_fn):
    x = x.clone().requires_grad_(True)
    GMM.log_prob(x, sigma, alpha_fn).sum().backward()
    return x.grad


def test_score_from_denoised_is_the_gradient_of_the_log_density():
    for sigma in (0.05, 0.7, 8.0):
        d = GMM.denoise(X, sigma)
        expected = autograd_score(X, sigma, ve_alpha)
        got = conv.score_from_denoised(X, d, torch.full((64,), sigma, dtype=torch.float64))
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_flow_denoiser_equals_ve_denoiser_after_flow_to_ve():
    # Same data, two parametrisations: D_flow(x, s) must equal D_ve(x / (1 - s), s / (1 - s)).
    for sigma in (0.02, 0.5, 0.97):
        s = torch.full((64,), sigma, dtype=torch.float64)
        x_ve, s_ve = conv.flow_to_ve(X, s)
        torch.testing.assert_close(
            GMM.denoise(X, s, flow_alpha), GMM.denoise(x_ve, s_ve, ve_alpha), rtol=1e-9, atol=1e-9
        )
        x_back, s_back = conv.ve_to_flow(x_ve, s_ve)
        torch.testing.assert_close(x_back, X)
        torch.testing.assert_close(s_back, s)


def test_flow_score_via_ve_matches_autograd_of_the_flow_marginal():
    # grad_x log p_flow(x) = grad_{x_ve} log p_ve(x_ve) / (1 - sigma).
    sigma = 0.6
    s = torch.full((64,), sigma, dtype=torch.float64)
    x_ve, s_ve = conv.flow_to_ve(X, s)
    score_ve = conv.score_from_denoised(x_ve, GMM.denoise(X, s, flow_alpha), s_ve)
    torch.testing.assert_close(score_ve / (1 - sigma), autograd_score(X, sigma, flow_alpha), rtol=1e-9, atol=1e-9)


def test_velocity_and_eps_round_trip_and_snr():
    s = torch.full((64,), 0.3, dtype=torch.float64)
    d = GMM.denoise(X, s, flow_alpha)
    v = conv.velocity_from_denoised(X, d, s)
    torch.testing.assert_close(conv.denoised_from_velocity(X, v, s), d)
    # Flow velocity = E[eps - x0 | x]: with x = (1-s) x0 + s eps, E[eps | x] = (x - (1-s) D) / s.
    torch.testing.assert_close(v, (X - (1 - s[:, None]) * d) / s[:, None] - d)
    torch.testing.assert_close(conv.snr(s, flow=True), 1 / conv.flow_sigma_to_ve(s) ** 2)
    torch.testing.assert_close(conv.snr(s), 1 / s**2)
