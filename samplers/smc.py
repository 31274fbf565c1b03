"""Feynman-Kac correctors (Skreta et al. 2025): sequential Monte Carlo over diffusion particles.

The target at every noise level is a weighted product of experts p ∝ Π_k q_k^{β_k}, B = Σ β_k: CFG is
(β_u, β_c) = (1 − w, w), annealing multiplies every β by the exponent, AND-composition gives each prompt its
weight. Each particle follows an SDE whose drift is the target score s* = Σ β_k s_k and carries a log-weight
that corrects for the product not being a diffusion of anything; systematic resampling within each image's
particle group turns the weights into the right population.

Conventions (see conventions.py): a model returns the denoised estimate D. Everything is computed in the VE
form (x_ve = x / α, σ_ve = σ / α, α = 1 or 1 − σ for flow models), but written through ratios and SNRs so
that a flow step from σ = 1 (SNR 0, σ_ve = ∞) stays finite. Writing Δ = σ_ve² − σ_ve′², r² = SNR / SNR′:

- log-weight increment (Δ/2)(‖s*‖² − Σ β_k ‖s_k‖²), with D̄ = Σ β_k D_k / B and ε̄ = (x − α D̄) / σ:
      ½ (1 − r²) (B² − B) ‖ε̄‖²  −  ½ κ Σ β_k ‖D_k − D̄‖²
  where κ = (1 − r²) SNR literally, or κ = SNR′ − SNR ("exact in SNR", the default: the disagreement term is
  a smooth function of SNR, so a left-point rule in SNR is accurate even across long steps). For CFG (B = 1)
  this is ½ w (w − 1) ‖D_c − D_u‖² (SNR′ − SNR).
- move: the ancestral (DDPM-posterior) step with the target denoiser D* = B D̄ + (1 − B) x_ve. Its drift is
  ½ (1 + η²) Δ s* and its noise variance η² Δ to first order, η the ancestral eta; every such SDE has the
  same weights (the Laplacian terms cancel exactly when drift = ½ (1 + η²) s*). η = 1 is the target-score
  SDE, η = 1 / √B the tempered-noise SDE, η = 0 the ODE (which collapses under resampling). With B ≠ 1 the
  weights are noisy (the ‖ε̄‖² term); a larger η decorrelates the particles' noise faster and averages that
  noise out (measured on exact mixtures: η = √B cuts the error of η = 1 by 3-6x for B = 2 and 3; B <= 1 is best
  at 1). The default ("auto") is η = max(1, √B) for the target-score SDE.
- start: the target at σ_max is q^B, so the start noise is annealed to N(0, σ² / B).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .conventions import append_dims, snr
from .steppers import NoiseFn, euler_ancestral_step, seeded_noise

NoiseKind = Literal["target", "tempered"]
ResampleRule = Literal["every_step", "ess"]
OutputMode = Literal["best", "sample", "all"]


@dataclass(frozen=True)
class ExpertPredictions:
    """One model evaluation of every expert: denoised [E, N, ...] and the exponents β [E]."""

    denoised: Tensor
    betas: Tensor


# experts(x [N, ...], sigma [N]) -> ExpertPredictions for those N particles
ExpertsFn = Callable[[Tensor, Tensor], ExpertPredictions]
Callback = Callable[[dict[str, Any]], None]


def _row_sum(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def is_unit_total(total: float) -> bool:
    """B = 1 (CFG, AND-composition): exponents like (1 - 3w) + 3w may miss 1.0 by an ulp."""
    return math.isclose(total, 1.0, rel_tol=0.0, abs_tol=1e-9)


def _alpha(sigma: Tensor, flow: bool) -> Tensor:
    return 1.0 - sigma if flow else torch.ones_like(sigma)


def _betas_like(betas: Tensor, denoised: Tensor) -> Tensor:
    return betas.to(denoised).reshape((-1,) + (1,) * (denoised.ndim - 1))


def mean_denoised(pred: ExpertPredictions) -> Tensor:
    """D̄ = Σ β_k D_k / B: the denoiser whose score is the target score divided by B."""
    total = float(pred.betas.sum())
    return (_betas_like(pred.betas, pred.denoised) * pred.denoised).sum(0) / total


def target_denoised(pred: ExpertPredictions, x: Tensor, sigma: Tensor, flow: bool = False) -> Tensor:
    """D* with (D* − x_ve) / σ_ve² = Σ β_k s_k, in the model's own variable: B D̄ + (1 − B) x / α.

    At SNR 0 (flow σ = 1) and B ≠ 1 the second term is infinite; there D̄ is returned and the move tempers its
    noise instead (see `steppers.euler_ancestral_step`).
    """
    total = float(pred.betas.sum())
    d_mean = mean_denoised(pred)
    if is_unit_total(total):
        return d_mean
    alpha = append_dims(_alpha(sigma, flow), x.ndim)
    x_ve = torch.where(alpha > 0, x / alpha.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    return torch.where(alpha > 0, total * d_mean + (1.0 - total) * x_ve, d_mean)


def snr_ratio(sigma: Tensor, sigma_next: Tensor, flow: bool = False) -> Tensor:
    """r² = SNR(σ) / SNR(σ′) = (σ_ve′ / σ_ve)², finite (0) at flow σ = 1."""
    return snr(sigma, flow) / snr(sigma_next, flow)


def log_weight_increment(
    pred: ExpertPredictions,
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    flow: bool = False,
    exact_in_snr: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """Per-particle Δ log w over σ → σ′ (σ′ > 0), general product-of-experts form. Returns [N].

    `mask` (broadcastable to x, 1 = generated) leaves kept regions (inpainting) out of the sums.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    sigma_next = torch.as_tensor(sigma_next, dtype=x.dtype)
    total = float(pred.betas.sum())
    d_mean = mean_denoised(pred)
    disagreement = pred.denoised - d_mean
    if mask is not None:
        disagreement = disagreement * mask
    spread = (pred.betas.to(x)[:, None] * torch.stack([_row_sum(d**2) for d in disagreement])).sum(0)
    r2 = snr_ratio(sigma, sigma_next, flow)
    snr_now = snr(sigma, flow)
    kappa = snr(sigma_next, flow) - snr_now if exact_in_snr else (1.0 - r2) * snr_now
    increment = -0.5 * kappa * spread
    # The step from SNR 0 (flow σ = 1) moves by the tempered ancestral step instead of the SDE (see sample_fkc), which
    # needs no correction while the data are negligible: without this skip, its (B² − B)‖ε̄‖² term alone left an ESS
    # of about 2 out of 2048 particles.
    if not is_unit_total(total) and float(snr_now) > 0:
        alpha = float(_alpha(sigma, flow))
        eps_mean = (x - alpha * d_mean) / sigma  # predicted noise of D̄
        if mask is not None:
            eps_mean = eps_mean * mask
        increment = increment + 0.5 * (1.0 - r2) * (total**2 - total) * _row_sum(eps_mean**2)
    return increment


def cfg_log_weight_increment(
    d_uncond: Tensor,
    d_cond: Tensor,
    cfg: float,
    sigma: Tensor,
    sigma_next: Tensor,
    flow: bool = False,
    mask: Tensor | None = None,
) -> Tensor:
    """The CFG special case q_u^{1−w} q_c^w, exact in SNR: ½ w (w − 1) ‖D_c − D_u‖² (SNR′ − SNR). Returns [N]."""
    delta = d_cond - d_uncond
    if mask is not None:
        delta = delta * mask
    sigma = torch.as_tensor(sigma, dtype=delta.dtype)
    sigma_next = torch.as_tensor(sigma_next, dtype=delta.dtype)
    return 0.5 * cfg * (cfg - 1.0) * _row_sum(delta**2) * (snr(sigma_next, flow) - snr(sigma, flow))


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """(Σ w)² / Σ w² per group of log_weights [G, K]: between 1 and K."""
    return torch.exp(2 * torch.logsumexp(log_weights, dim=1) - torch.logsumexp(2 * log_weights, dim=1))


def systematic_resample(log_weights: Tensor, uniforms: Tensor) -> Tensor:
    """Systematic resampling within each group: log_weights [G, K], one uniform in [0, 1) per group.

    Returns ancestor indices [G, K], sorted. Particle i gets floor or ceil of K w_i copies; equal weights give the
    identity. Counts come from ceil(K C_i − u) with the cumulative weights C rounded onto integers of K C when
    within 1e-9 of one, so equal weights stay the identity for every u in [0, 1).
    """
    k = log_weights.shape[1]
    weights = torch.softmax(log_weights.to(torch.float64), dim=1)
    scaled = k * torch.cumsum(weights, dim=1)
    scaled = scaled * (k / scaled[:, -1:])
    nearest = torch.round(scaled)
    scaled = torch.where((scaled - nearest).abs() < 1e-9, nearest, scaled)
    # copies of particles 0..i: ceil(K C_i - u) = floor(K C_i) + [frac(K C_i) > u], exact for every u in [0, 1)
    whole = torch.floor(scaled)
    counts = (whole + (scaled - whole > uniforms.to(torch.float64)[:, None])).clamp(0, k)
    positions = torch.arange(k, dtype=torch.float64, device=log_weights.device).expand_as(counts).contiguous()
    return torch.searchsorted(counts.contiguous(), positions, right=True).clamp_max(k - 1)


def annealed_start_scale(total_beta: float) -> float:
    """Start noise of the target q_T^B: N(0, σ_T² / B), i.e. the usual noise times 1 / √B."""
    return 1.0 / math.sqrt(total_beta)


def auto_eta(total_beta: float) -> float:
    """The default move noise for the target-score SDE: max(1, √B). B = 1 (CFG, AND-composition) is best at 1; for
    B > 1 the weights carry the noisy (B² − B)‖ε̄‖² term, and √B beat both 1 and 2 on the exact mixtures (W1, flow
    GMM, 300 steps, 32 x 128 particles, 3 seeds): annealing β = 2: 0.027 vs 0.079 (η = 1) and 0.048 (η = 2), floor
    0.029; β = 3: 0.021 vs 0.119 / 0.031, floor 0.018; product of two prompts: 0.023 vs 0.043 / 0.033, floor 0.029.
    For B < 1 (β = 0.5) η = 1 was best (0.029 vs 0.059 at √B, floor 0.042), hence the floor of 1."""
    return max(1.0, math.sqrt(total_beta))


def move_eta(noise: NoiseKind, total_beta: float, eta: float | None = None) -> float:
    """Ancestral eta of the move: the target-score SDE with `eta` (None: auto_eta(B)), or the tempered-noise SDE,
    1/√B times `eta` (None: 1, the tempered SDE itself)."""
    if noise == "target":
        return auto_eta(total_beta) if eta is None else eta
    return (1.0 if eta is None else eta) / math.sqrt(total_beta)


def particle_start_noise(noise: Tensor, particles: int, seed: int | None) -> Tensor:
    """[K·B, ...] start noise, particle-major (row k·B + b): particle 0 of each image is `noise` itself, the
    others are fresh i.i.d. draws from a generator seeded apart from the sampler's step noise. An image whose
    noise is all zeros (ComfyUI's DisableNoise, add_noise off: start from the latent as it is) gets zero noise
    for every particle; the particles then part through the move's i.i.d. noise."""
    if particles == 1:
        return noise
    noisy = append_dims(noise.flatten(1).ne(0).any(dim=1), noise.ndim)  # [B, 1, ...]: which images get noise
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed((int(seed) * 6364136223846793005 + 1442695040888963407) % 2**63)
    shape = ((particles - 1) * noise.shape[0],) + tuple(noise.shape[1:])
    extra = torch.randn(shape, generator=generator, dtype=torch.float32).to(device=noise.device, dtype=noise.dtype)
    return torch.cat([noise, torch.where(repeat_particles(noisy, particles - 1), extra, 0.0)])


def repeat_particles(t: Tensor, particles: int) -> Tensor:
    """A per-image tensor [B, ...] for every particle, particle-major [K·B, ...] (what repeat_to_batch tiles)."""
    return t.repeat((particles,) + (1,) * (t.ndim - 1))


def chunk_rows(rows: int, unit: int, max_rows: int) -> list[slice]:
    """Slices of `rows` in multiples of `unit` (one particle of every image), each at most `max_rows` rows where
    possible (never below one unit). max_rows <= 0: one chunk."""
    if max_rows <= 0 or max_rows >= rows:
        return [slice(0, rows)]
    step = max(1, max_rows // unit) * unit
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


@dataclass(frozen=True)
class FKCOptions:
    particles: int = 8
    noise: NoiseKind = "target"
    resample: ResampleRule = "every_step"
    ess_threshold: float = 0.5
    eta: float | None = None  # None: auto (see auto_eta)
    # Resample only at steps with resample_sigma_min <= sigma <= resample_sigma_max (weights always accumulate).
    resample_sigma_max: float = math.inf
    resample_sigma_min: float = 0.0
    increment_clamp: float = 0.0  # > 0: clamp each step's centred increment to ±clamp (official EDM2 code)
    exact_in_snr: bool = True

    def validate(self) -> None:
        if self.particles < 1:
            raise ValueError(f"particles must be at least 1 (got {self.particles})")
        if self.noise not in ("target", "tempered"):
            raise ValueError(f"noise must be 'target' or 'tempered' (got {self.noise!r})")
        if self.resample not in ("every_step", "ess"):
            raise ValueError(f"resample must be 'every_step' or 'ess' (got {self.resample!r})")
        if not 0.0 <= self.ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1] (got {self.ess_threshold})")
        if self.eta is not None and self.eta < 0:
            raise ValueError(f"eta must be >= 0 (got {self.eta})")
        if self.eta == 0 and self.particles > 1:
            raise ValueError(
                "eta = 0 makes every move deterministic: resampled copies of a particle would stay identical and "
                "the population would collapse onto a few paths. Use eta > 0 (1 = the FKC SDE) or particles = 1."
            )
        if self.increment_clamp < 0:
            raise ValueError(f"increment_clamp must be >= 0, 0 = off (got {self.increment_clamp})")


@dataclass
class StepReport:
    step: int
    sigma: float
    ess: list[float]  # per image group, after this step's increment
    resampled: list[bool]  # per image group


@dataclass
class FKCResult:
    x: Tensor  # [K·B, ...] particle-major
    log_weights: Tensor  # [B, K] since each group's last resampling
    ranking: Tensor  # [B, K]: each particle's log-weight, or its ancestor's at the last resampling
    steps: list[StepReport] = field(default_factory=list)


def _group_view(v: Tensor, particles: int) -> Tensor:
    """Per-row values [K·B] (particle-major) as [B, K]."""
    return v.reshape(particles, -1).T


def _permutation(indices: Tensor) -> Tensor:
    """Row permutation [K·B] that gives particle k of group b the row of its ancestor indices[b, k]."""
    groups = indices.shape[0]
    rows = indices * groups + torch.arange(groups, device=indices.device)[:, None]
    return rows.T.reshape(-1)


def resample_generator(seed: int | None) -> torch.Generator:
    """CPU generator for resampling uniforms and output draws, seeded apart from the step noise (which stays the
    stream ComfyUI's euler_ancestral draws for one particle)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed((int(seed) + 0x5DEECE66D) % 2**63)
    return generator


def _resample(
    x: Tensor, denoised: Tensor, log_weights: Tensor, resampled: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Systematic resampling of the flagged groups. Returns x, denoised, reset log-weights, and the ranking (each
    particle's ancestor's log-weight)."""
    groups, k = log_weights.shape
    uniforms = torch.rand(groups, generator=generator, dtype=torch.float64)
    ancestors = torch.arange(k).expand(groups, k)
    ancestors = torch.where(resampled[:, None], systematic_resample(log_weights, uniforms), ancestors)
    rows = _permutation(ancestors).to(x.device)
    ranking = torch.gather(log_weights, 1, ancestors)
    log_weights = torch.where(resampled[:, None], torch.zeros_like(log_weights), log_weights)
    return x[rows], denoised[rows], log_weights, ranking


def sample_fkc(
    experts: ExpertsFn,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,  # k-diffusion signature; progress is the caller's callback
    *,
    options: FKCOptions,
    flow: bool = False,
    noise_fn: NoiseFn | None = None,
    generator: torch.Generator | None = None,
    weight_mask: Tensor | None = None,
) -> FKCResult:
    """The particle loop, k-diffusion style over a callable returning every expert's prediction.

    x: [K·B, ...] start particles, particle-major (row k·B + b), drawn from the annealed start
    (`annealed_start_scale`). extra_args["seed"] seeds the step noise and the resampling unless `noise_fn` /
    `generator` are given. Per step: evaluate the experts, add the weight increment (not on the final step to
    σ = 0), resample the groups that call for it (before the move, so copies diverge through their own noise),
    move every particle with i.i.d. noise. The callback gets x, i, sigma, denoised (the target denoiser), ess,
    resampled and log_weights.
    """
    options.validate()
    k = options.particles
    if x.shape[0] % k:
        raise ValueError(f"{x.shape[0]} rows are not a whole number of groups of {k} particles")
    seed = (extra_args or {}).get("seed")
    noise_fn = noise_fn or seeded_noise(seed)
    generator = generator or resample_generator(seed)
    groups = x.shape[0] // k
    # Weights live on the CPU in float64: a [B, K] array (one sync a step, which the ESS report needs anyway), and
    # devices without float64 (MPS, DirectML) run the model as usual.
    log_weights = torch.zeros((groups, k), dtype=torch.float64)
    ranking = log_weights.clone()
    steps: list[StepReport] = []
    sigma_row = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        pred = experts(x, sigma * sigma_row)
        total_beta = float(pred.betas.sum())
        if total_beta <= 0:
            raise ValueError(f"the experts' exponents must sum to a positive B (got {total_beta})")
        denoised = target_denoised(pred, x, sigma, flow)
        if sigma_next > 0:
            increment = log_weight_increment(pred, x, sigma, sigma_next, flow, options.exact_in_snr, weight_mask)
            increment = _group_view(increment.to("cpu", torch.float64), k)
            increment = increment - increment.mean(dim=1, keepdim=True)  # a constant per group changes nothing
            if options.increment_clamp > 0:
                increment = increment.clamp(-options.increment_clamp, options.increment_clamp)
            log_weights = log_weights + increment
            ranking = log_weights.clone()
        ess = effective_sample_size(log_weights)
        resampled = torch.zeros(groups, dtype=torch.bool)
        if k > 1 and sigma_next > 0 and options.resample_sigma_min <= float(sigma) <= options.resample_sigma_max:
            resampled = ess < options.ess_threshold * k if options.resample == "ess" else ~resampled
        if resampled.any():
            x, denoised, log_weights, ranking = _resample(x, denoised, log_weights, resampled, generator)
        steps.append(StepReport(i, float(sigma), ess.tolist(), resampled.tolist()))
        if callback is not None:
            info = {"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised}
            callback({**info, "ess": ess, "resampled": resampled, "log_weights": ranking})
        # At SNR 0 with B != 1 the drift term (1 - B) x_ve is infinite: D-bar moves the particle and the noise is
        # tempered instead, which is exact while the data are negligible against the noise.
        noise_scale = 1.0
        if float(snr(torch.as_tensor(sigma), flow)) == 0.0 and not is_unit_total(total_beta):
            noise_scale = annealed_start_scale(total_beta)
        eta = move_eta(options.noise, total_beta, options.eta)
        x = euler_ancestral_step(x, denoised, float(sigma), float(sigma_next), noise_fn, eta, flow, noise_scale)
    return FKCResult(x, log_weights, ranking, steps)


def select_output(result: FKCResult, mode: OutputMode, generator: torch.Generator | None = None) -> Tensor:
    """best: each image's highest-ranked particle; sample: one particle drawn by final weight (uniform after a
    resampling); all: every particle, image-major [B·K, ...] (image b's particles at rows b·K ... b·K + K − 1)."""
    groups, k = result.log_weights.shape
    per_particle = result.x.reshape((k, groups) + tuple(result.x.shape[1:]))
    if mode == "all":
        return per_particle.transpose(0, 1).reshape(result.x.shape)
    if mode == "best":
        chosen = result.ranking.argmax(dim=1).to(result.x.device)
    elif mode == "sample":
        probs = torch.softmax(result.log_weights, dim=1).cpu()
        chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(result.x.device)
    else:
        raise ValueError(f"output must be 'best', 'sample' or 'all' (got {mode!r})")
    return per_particle[chosen, torch.arange(groups, device=result.x.device)]
