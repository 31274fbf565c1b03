"""An exact Gaussian mixture: closed-form denoiser, score and samples at every noise level.

Ground truth for the sampler cores. Data x0 ~ sum_k w_k N(mu_k, s_k^2 I); a noisy sample is
x = alpha * x0 + sigma * eps, with alpha = 1 (VE / EPS models, x = x0 + sigma * eps) or
alpha = 1 - sigma (rectified flow, ComfyUI's CONST sampling). Given component k,
x ~ N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), so the posterior mean E[x0 | x] is closed form.
Mode weights may be given per batch row, so a "prompt" can select modes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def flow_alpha(sigma: Tensor) -> Tensor:
    return 1.0 - sigma


def ve_alpha(sigma: Tensor) -> Tensor:
    return torch.ones_like(sigma)


class GaussianMixture:
    """Isotropic Gaussian mixture in d dimensions (float64 for reference accuracy)."""

    def __init__(self, means, weights, stds) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError("means must be [K, d]")
        k = self.means.shape[0]
        self.weights = torch.as_tensor(weights, dtype=torch.float64).reshape(k)
        self.weights = self.weights / self.weights.sum()
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_modes(self) -> int:
        return self.means.shape[0]

    def _row_weights(self, batch: int, weights: Tensor | None) -> Tensor:
        if weights is None:
            return self.weights.expand(batch, -1)
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1, self.n_modes)
        w = w / w.sum(dim=1, keepdim=True)
        return w.expand(batch, -1) if w.shape[0] == 1 else w

    def _log_responsibilities(self, x: Tensor, sigma: Tensor, alpha: Tensor, weights: Tensor) -> Tensor:
        # log w_k + log N(x; alpha mu_k, v_k I), v_k = alpha^2 s_k^2 + sigma^2, per row.
        var = alpha[:, None] ** 2 * self.stds[None, :] ** 2 + sigma[:, None] ** 2  # [B, K]
        diff = x[:, None, :] - alpha[:, None, None] * self.means[None, :, :]  # [B, K, d]
        sq = (diff**2).sum(-1)
        log_n = -0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.log(weights.clamp_min(1e-300)) + log_n

    def denoise(self, x: Tensor, sigma, alpha_fn=ve_alpha, weights: Tensor | None = None) -> Tensor:
        """E[x0 | x] for x = alpha(sigma) x0 + sigma eps. x: [B, d]; sigma: scalar or [B]."""
        dtype = x.dtype
        x = x.to(torch.float64)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(b)
        alpha = alpha_fn(sigma)
        w = self._row_weights(b, weights)
        resp = torch.softmax(self._log_responsibilities(x, sigma, alpha, w), dim=1)  # [B, K]
        s2 = self.stds[None, :] ** 2
        gain = alpha[:, None] * s2 / (alpha[:, None] ** 2 * s2 + sigma[:, None] ** 2)  # [B, K]
        cond_mean = self.means[None] + gain[..., None] * (x[:, None, :] - alpha[:, None, None] * self.means[None])
        return (resp[..., None] * cond_mean).sum(1).to(dtype)

    def log_prob(self, x: Tensor, sigma=0.0, alpha_fn=ve_alpha, weights: Tensor | None = None) -> Tensor:
        """Log density of the noisy marginal at x (sigma = 0: the data density)."""
        x = x.to(torch.float64)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(b)
        lr = self._log_responsibilities(x, sigma, alpha_fn(sigma), self._row_weights(b, weights))
        return torch.logsumexp(lr, dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None, weights: Tensor | None = None) -> Tensor:
        w = self._row_weights(n, weights)
        k = torch.multinomial(w, 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def nearest_mode(self, x: Tensor) -> Tensor:
        """Index of the closest mean for each row: classifies samples of well-separated mixtures."""
        d = torch.cdist(x.to(torch.float64), self.means)
        return d.argmin(dim=1)
