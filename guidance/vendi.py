"""Vendi score and contextualized Vendi Score Guidance (c-VSG, Hemmat et al. 2024) as pure torch.

Vendi score of n feature vectors: VS = exp(H(A)), H(A) = -sum_i lambda_i log lambda_i over the eigenvalues of
A = K / tr(K), K_ij = <f_i, f_j> on L2-normalised features. It is an effective number of distinct items:
1 <= VS <= min(n, d). A = F F^T / n (n x n) and its dual F^T F / n (d x d) share their non-zero eigenvalues, so
the smaller one is decomposed; the official code's SVD route returns NaN once n > d.

The entropy's gradient is the spectral formula dH/dA = -(log A + I), computed from one symmetric
eigendecomposition with eigenvalues clamped away from 0. Autograd through `eigh` instead divides by eigenvalue
gaps and returns NaN/inf for repeated eigenvalues (e.g. identical features), which guidance meets all the time.

c-VSG objective for a candidate f: R(f) = VS(M u {f}) - beta * VS(E u {f}), M the memory of earlier generations,
E the features of real exemplars. Guidance ascends R with a gradient rescaled to scale * ||x_t||.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Floor for eigenvalues inside log: keeps the gradient -(log A + I) finite where the spectrum has zeros (the
# entropy's derivative there is legitimately unbounded; guidance only uses the direction, rescaled).
EIGENVALUE_FLOOR = 1e-12
NORM_FLOOR = 1e-12


class _SpectralEntropy(torch.autograd.Function):
    """H(A) = -tr(A log A) for symmetric PSD A [..., k, k] with trace 1, with the eigen-gap-free gradient."""

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:  # type: ignore[override]
        a = 0.5 * (a + a.mT)  # exact symmetry: eigh reads one triangle
        eigenvalues, eigenvectors = torch.linalg.eigh(a)
        eigenvalues = eigenvalues.clamp_min(0.0)  # round-off makes tiny negatives
        logs = torch.log(eigenvalues.clamp_min(EIGENVALUE_FLOOR))
        ctx.save_for_backward(eigenvectors, logs)
        return -(eigenvalues * logs).sum(-1)  # 0 * log(floor) = 0: the 0 log 0 = 0 convention

    @staticmethod
    def backward(ctx, grad_entropy: Tensor) -> Tensor:  # type: ignore[override]
        eigenvectors, logs = ctx.saved_tensors
        grad_a = -(eigenvectors * (logs + 1.0).unsqueeze(-2)) @ eigenvectors.mT
        return grad_entropy[..., None, None] * grad_a


def spectral_entropy(a: Tensor) -> Tensor:
    """Von Neumann entropy of a trace-1 PSD matrix (batched over leading dims); finite, differentiable."""
    return _SpectralEntropy.apply(a)


def unit_rows(features: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm, in float64; an all-zero row stays zero (it then adds no diversity)."""
    f = features.to(torch.float64).flatten(1)
    return f / f.norm(dim=1, keepdim=True).clamp_min(NORM_FLOOR)


def _entropy_of_gram(k: Tensor) -> Tensor:
    trace = k.diagonal(dim1=-2, dim2=-1).sum(-1)
    a = k / trace.clamp_min(NORM_FLOOR)[..., None, None]
    return spectral_entropy(a)


def vendi_score(features: Tensor) -> Tensor:
    """Vendi score of the rows of `features` [n, ...] (cosine kernel). 1 for identical rows, n for orthogonal ones.

    Decomposes the n x n Gram matrix, or the d x d dual F^T F when n > d. Never NaN; an empty set scores 1.
    """
    f = unit_rows(features)
    if f.shape[0] == 0:
        return torch.ones((), dtype=torch.float64, device=features.device)
    n, d = f.shape
    k = f.T @ f if n > d else f @ f.T
    return torch.exp(_entropy_of_gram(k))


class VendiMemory:
    """A fixed feature set M, kept as what VS(M u {f}) needs for many candidates f: the Gram matrix of M while
    |M| + 1 <= d, else the d x d moment sum_m f_m f_m^T, whose cost no longer grows with |M|."""

    def __init__(self, features: Tensor) -> None:
        self._build(unit_rows(features), None)

    def _build(self, unit: Tensor | None, moment: Tensor | None, count: int = 0, dim: int = 0) -> None:
        if unit is not None:
            count, dim = unit.shape
        self.count, self.dim = count, dim
        self.dual = count + 1 > dim
        self.unit: Tensor | None = None
        self.gram: Tensor | None = None
        self.moment: Tensor | None = None
        if self.dual:
            if moment is None:
                assert unit is not None
                moment = unit.T @ unit
            self.moment = moment
        else:
            assert unit is not None
            self.unit, self.gram = unit, unit @ unit.T

    def __len__(self) -> int:
        return self.count

    def extended(self, more: Tensor) -> VendiMemory:
        """M u `more` (rows), as a new memory; the moment form adds the new rows' outer products only."""
        if more.shape[0] == 0:
            return self
        extra = unit_rows(more)
        grown = VendiMemory.__new__(VendiMemory)
        if self.dual:
            assert self.moment is not None
            grown._build(None, self.moment + extra.T.to(self.moment) @ extra.to(self.moment), self.count + len(extra),
                         self.dim)  # fmt: skip
        else:
            assert self.unit is not None
            grown._build(torch.cat([self.unit, extra.to(self.unit)]), None)
        return grown

    def score_with(self, candidates: Tensor) -> Tensor:
        """VS(M u {c}) for each row c of `candidates` [b, d], as [b]; differentiable in the candidates."""
        c = unit_rows(candidates)
        if c.shape[1] != self.dim:
            raise ValueError(f"candidate features have {c.shape[1]} dimensions, the memory {self.dim}")
        b = c.shape[0]
        if self.dual:
            assert self.moment is not None
            k = self.moment.to(c) + c[:, :, None] * c[:, None, :]  # [b, d, d]
        else:
            assert self.unit is not None and self.gram is not None
            cross = c @ self.unit.to(c).T  # [b, m]
            top = torch.cat([self.gram.to(c).expand(b, -1, -1), cross[:, :, None]], dim=2)
            bottom = torch.cat([cross, (c * c).sum(1, keepdim=True)], dim=1)[:, None, :]
            k = torch.cat([top, bottom], dim=1)  # [b, m + 1, m + 1]
        return torch.exp(_entropy_of_gram(k))


def cvsg_objective(candidates: Tensor, memory: VendiMemory, exemplars: VendiMemory | None, beta: float) -> Tensor:
    """R(f) = VS(M u {f}) - beta * VS(E u {f}) per candidate row [b]; beta = 0 or no exemplars is plain VSG."""
    objective = memory.score_with(candidates)
    if exemplars is not None and len(exemplars) > 0 and beta != 0.0:
        objective = objective - beta * exemplars.score_with(candidates)
    return objective


def rescale_rows(gradient: Tensor, reference: Tensor, scale: float) -> Tensor:
    """Each row of `gradient` rescaled to norm scale * ||reference row||; zero or non-finite rows become zero."""
    g = gradient.to(torch.float64)
    g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
    dims = tuple(range(1, g.ndim))
    g_norm = g.flatten(1).norm(dim=1)
    x_norm = reference.to(torch.float64).flatten(1).norm(dim=1)
    factor = torch.where(g_norm > 0, scale * x_norm / g_norm.clamp_min(1e-300), torch.zeros_like(g_norm))
    return (g * factor.reshape(-1, *([1] * len(dims)))).to(gradient.dtype)


def noise_fraction(sigma: float, flow: bool) -> float:
    """sqrt(1 - alpha_bar): the noise share of x_t in variance-preserving terms (flow: sigma itself)."""
    return sigma if flow else sigma / (1.0 + sigma**2) ** 0.5


def feature_input(denoised: Tensor, x: Tensor, sigma: float, flow: bool) -> Tensor:
    """What the paper feeds the feature extractor: sqrt(1 - a) x0_hat + (1 - sqrt(1 - a)) x_t, with x_t in
    variance-preserving scale (x / sqrt(1 + sigma^2) for VE / EPS models; a flow model's x already is)."""
    w = noise_fraction(sigma, flow)
    x_t = x if flow else x / (1.0 + sigma**2) ** 0.5
    return w * denoised + (1.0 - w) * x_t


def kick_factor(sigma: float, sigma_next: float, flow: bool) -> float | None:
    """c such that returning D + c g from the model makes one Euler / DDIM step land exactly where the paper's
    update does: x_t += g with the step's eps kept. None where that is undefined (no step, or a flow model at
    sigma = 1, where x_t holds no signal).

    Derivation: the step maps (x, D) to x + (sigma_next - sigma) (x - D) / sigma; the paper's shifted state gives
    the same eps with x0_hat + g / alpha, moving the next state by g alpha_next / alpha (alpha = 1 for VE,
    1 - sigma for flow). Equating: c = (alpha_next / alpha) sigma / (sigma - sigma_next).
    """
    if sigma <= sigma_next:
        return None
    if flow:
        if sigma >= 1.0 - 1e-4:
            return None
        return (1.0 - sigma_next) / (1.0 - sigma) * sigma / (sigma - sigma_next)
    return sigma / (sigma - sigma_next)
