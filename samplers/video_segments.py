"""MEVG-style multi-text video (Oh et al., ECCV 2024) as pure torch: one segment per prompt, seamless joins.

Video latents are [B, C, T, H, W]. Segment 1 is plain sampling from noise. Segment k >= 2 continues from the
previous segment's last frame:
1. Last-frame-aware inversion: the last frame repeated over T frames is inverted with the unconditional
   prediction over the schedule (DDIM inversion, which for flow models is Euler on the flow ODE run backwards);
   at every inversion step x0 is blended toward the previous segment's last-frame x0 at the same noise level with
   weight `last_frame_inversion` (the official code takes a gradient step of strength 1000 on an MSE, about a
   half-way pull at its resolution: a blend says the same at every resolution and needs no autograd; it pulls
   frame 0 toward the previous x0's frame 0, here every frame of the still goes toward the frame it repeats).
   Optional fixed-point rounds make the inversion the exact inverse of the Euler sampler (`invert`).
2. Dynamic Noise: the inverted noise of frame t is mixed with fresh noise, c_t eps_t + sqrt(1 - c_t^2) xi_t,
   c_0 = 1 (the boundary frame keeps its inversion), c_t = a_t / sqrt(1 + a_t^2) with a = exp(-linspace(0, 10,
   T - 1)): later frames get more fresh noise and so more motion. Variance-preserving (the official draws xi with
   std 1 / (1 + a^2), which shrinks the variance: 0.75 on frame 1), and applied once to the final noise rather
   than at every inversion step: at the top of the schedule the noise is what the sampler starts from.
3. Structure-guiding sampling: at every step the predicted x0 is smoothed in time: frame 0, which duplicates the
   previous last frame, follows that frame's x0 at the same step; frames 1.. are pulled toward their predecessor,
   most strongly at the join (guidance.temporal.guide_structure, a closed-form proximal step with the official
   update's weighting along the segment, instead of its gradient step).
Segments are joined in time without frame 0 of each later segment: it duplicates the previous last frame. For
Wan (4n + 1 pixel frames, T = n + 1 latent frames) K segments give 1 + K (T - 1) latent frames = a valid 4m + 1.

Everything works on Denoisers D(x, sigma) -> x0 (samplers.conventions): flow (x = (1 - s) x0 + s eps) and
EPS/VE (x = x0 + s eps) models alike, written with alpha(s) = 1 - s or 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..guidance.temporal import guide_structure
from .basic import sample_euler, sample_euler_ancestral
from .conventions import Denoiser
from .steppers import NoiseFn

FRAME_DIM = 2
SAMPLERS = ("euler", "euler_ancestral")
DYNAMIC_NOISE_DECAY = 10.0  # a_t = exp(-linspace(0, 10, T - 1)), the official schedule
# Per-step proximal weight on the edge into frame 1 = STRUCTURE_PER_UNIT * structure_guidance / steps, so the pull
# summed over a run does not depend on the step count. At the official 50 steps and 7.0 it is 0.175 per step; a
# least-squares fit of the official update at its own resolution (LVDM 256^2, 16 frames) gives 0.1735.
STRUCTURE_PER_UNIT = 1.25

StepHook = Callable[[str, int, Tensor, Tensor], None]  # (phase "inversion" | "sampling", step, x, x0)


def alpha(sigma: float, flow: bool) -> float:
    """Signal scale of x = alpha x0 + sigma eps: 1 - sigma for flow models, 1 for VE/EPS."""
    return 1.0 - sigma if flow else 1.0


def check_video(x: Tensor, name: str = "latent") -> None:
    if x.ndim != 5:
        raise ValueError(f"{name}: expected a video latent [B, C, T, H, W], got shape {tuple(x.shape)}")
    if x.shape[FRAME_DIM] < 2:
        raise ValueError(f"{name}: a segment needs at least 2 latent frames (its first one joins the previous "
                         f"segment), got {x.shape[FRAME_DIM]}")  # fmt: skip


def repeat_last_frame(x: Tensor, frames: int | None = None) -> Tensor:
    """The last frame of video x repeated over `frames` frames (default: as many as x has)."""
    frames = x.shape[FRAME_DIM] if frames is None else frames
    last = x.narrow(FRAME_DIM, x.shape[FRAME_DIM] - 1, 1)
    return last.expand(*x.shape[:FRAME_DIM], frames, *x.shape[FRAME_DIM + 1 :]).clone()


def concatenate_segments(segments: Sequence[Tensor]) -> Tensor:
    """One video from segments in order; a later segment's frame 0 duplicates the previous last frame: dropped."""
    if not segments:
        raise ValueError("no segments to concatenate")
    parts = [segments[0]] + [s.narrow(FRAME_DIM, 1, s.shape[FRAME_DIM] - 1) for s in segments[1:]]
    return torch.cat(parts, dim=FRAME_DIM)


def dynamic_noise_coefficients(frames: int, decay: float = DYNAMIC_NOISE_DECAY) -> Tensor:
    """c_t, the share of the inverted noise frame t keeps: 1 for frame 0, then a / sqrt(1 + a^2), a = exp(-lin)."""
    coefficients = torch.ones(frames, dtype=torch.float64)
    if frames > 1:
        a = torch.exp(-torch.linspace(0.0, decay, frames - 1, dtype=torch.float64))
        coefficients[1:] = a / torch.sqrt(1.0 + a**2)
    return coefficients


def mix_dynamic_noise(noise: Tensor, fresh: Tensor, coefficients: Tensor) -> Tensor:
    """c_t noise_t + sqrt(1 - c_t^2) fresh_t per frame: unit-variance inputs give a unit-variance result."""
    shape = [1] * noise.ndim
    shape[FRAME_DIM] = noise.shape[FRAME_DIM]
    c = coefficients.to(dtype=noise.dtype, device=noise.device).reshape(shape)
    return c * noise + torch.sqrt(1.0 - c**2) * fresh.to(dtype=noise.dtype, device=noise.device)


@dataclass
class FrameTrajectory:
    """A segment's predicted x0 of its last frame at every sampling step, for the next segment to follow."""

    sigmas: list[float] = field(default_factory=list)
    frames: list[Tensor] = field(default_factory=list)

    def record(self, sigma: float, denoised: Tensor) -> None:
        self.sigmas.append(float(sigma))
        self.frames.append(denoised.narrow(FRAME_DIM, denoised.shape[FRAME_DIM] - 1, 1).detach().clone())

    def at(self, sigma: float) -> Tensor:
        """The recorded frame nearest in log sigma (the same step when both segments share a schedule)."""
        if not self.frames:
            raise ValueError("the previous segment recorded no steps")
        target = math.log(max(float(sigma), 1e-12))
        index = min(range(len(self.sigmas)), key=lambda k: abs(math.log(max(self.sigmas[k], 1e-12)) - target))
        return self.frames[index]


@dataclass
class Inversion:
    """The end of an inversion as x = alpha(sigma) denoised + sigma noise."""

    x: Tensor
    denoised: Tensor
    noise: Tensor
    sigma: float


def invert(
    denoiser: Denoiser,
    clean: Tensor,
    sigmas: Tensor,
    flow: bool,
    reference: FrameTrajectory | None = None,
    pull: float = 0.0,
    on_step: StepHook | None = None,
    refine: int = 0,
) -> Inversion:
    """DDIM inversion of `clean` over ascending `sigmas` (sigmas[0] = 0), x0 blended toward `reference` by `pull`.

    Step s -> s' (s < s'): eps = (x' - alpha(s') D(x', s')) / s' at the guess x' = x (the model queried at the
    target level with the current sample, as DDIM inversion does); then x0 = (x - s eps) / alpha(s),
    x0 <- lerp(x0, reference(s'), pull), x' = alpha(s') x0 + s' eps. For VE models this is Euler with the
    derivative taken at s'; for flow models the same in the flow variable. `refine` more fixed-point rounds
    re-evaluate eps at the new x' (one model call each): they converge to the exact inverse of the Euler step
    s' -> s, so that sampling retraces the inversion. The step to alpha(s') = 0 (flow models at sigma 1, where
    x' is all noise) is solved in closed form, x' = (x - alpha(s) D(x, 1)) / s, exact when D(., 1) is constant.
    """
    if not 0.0 <= pull <= 1.0:
        raise ValueError(f"last_frame_inversion: {pull} must lie in [0, 1]")
    if refine < 0:
        raise ValueError(f"inversion refinement: {refine} must be >= 0")
    values = [float(s) for s in sigmas]
    if len(values) < 2 or values[0] != 0.0 or any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError("inversion sigmas must rise strictly from 0")
    x = clean
    denoised, noise = clean, torch.zeros_like(clean)
    for i in range(len(values) - 1):
        s, s_next = values[i], values[i + 1]
        a, a_next = alpha(s, flow), alpha(s_next, flow)
        if a_next == 0.0 and s > 0:
            denoised = denoiser(x, sigmas[i + 1])
            noise = (x - a * denoised) / s
        else:
            guess = x
            for _ in range(1 + refine):
                noise = (guess - a_next * denoiser(guess, sigmas[i + 1])) / s_next
                denoised = (x - s * noise) / a
                guess = a_next * denoised + s_next * noise
        if reference is not None and pull > 0:
            denoised = torch.lerp(denoised, reference.at(s_next).to(denoised), pull)
        x = a_next * denoised + s_next * noise
        if on_step is not None:
            on_step("inversion", i, x, denoised)
    return Inversion(x, denoised, noise, values[-1])


def with_dynamic_noise(inversion: Inversion, fresh: Tensor, flow: bool) -> Tensor:
    """The inverted sample with Dynamic Noise mixed into its noise part (frame 0 keeps its own noise)."""
    coefficients = dynamic_noise_coefficients(inversion.x.shape[FRAME_DIM])
    noise = mix_dynamic_noise(inversion.noise, fresh, coefficients)
    return alpha(inversion.sigma, flow) * inversion.denoised + inversion.sigma * noise


def structure_weight_per_step(structure_guidance: float, steps: int) -> float:
    if structure_guidance < 0:
        raise ValueError(f"structure_guidance: {structure_guidance} must be >= 0")
    return STRUCTURE_PER_UNIT * structure_guidance / max(steps, 1)


def structure_guided(denoiser: Denoiser, reference: FrameTrajectory, weight: float) -> Denoiser:
    """D with its x0 guided in time at each call, anchored to the reference's last-frame x0 at that sigma."""
    if weight == 0:
        return denoiser

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        return guide_structure(denoiser(x, sigma), reference.at(float(sigma.flatten()[0])), weight)

    return guided


@dataclass(frozen=True)
class SegmentSettings:
    flow: bool
    last_frame_inversion: float = 0.5
    dynamic_noise: bool = True
    structure_guidance: float = 7.0
    sampler: str = "euler"
    inversion_refinement: int = 0  # fixed-point rounds per inversion step (see invert)


@dataclass
class Continuation:
    """What a later segment starts from: the repeated last frame, the previous x0 trajectory, the inversion schedule."""

    clean: Tensor
    reference: FrameTrajectory
    inversion_sigmas: Tensor


@dataclass
class SegmentResult:
    samples: Tensor
    trajectory: FrameTrajectory


def sample_segment(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    settings: SegmentSettings,
    noise_fn: NoiseFn | None = None,
    on_step: StepHook | None = None,
) -> SegmentResult:
    """Sample from x at sigmas[0] with the settings' sampler; records the last frame's x0 at every step."""
    if settings.sampler not in SAMPLERS:
        raise ValueError(f"sampler: {settings.sampler!r} is not one of {SAMPLERS}")
    trajectory = FrameTrajectory()

    def callback(info: dict) -> None:
        trajectory.record(float(info["sigma"]), info["denoised"])
        if on_step is not None:
            on_step("sampling", info["i"], info["x"], info["denoised"])

    if settings.sampler == "euler":
        return SegmentResult(sample_euler(denoiser, x, sigmas, callback=callback), trajectory)
    # From a flow model's sigma 1 (pure noise) an ancestral step would replace x by fresh noise, discarding the
    # inverted noise (and the VE form it steps in does not exist there): that first step is a plain Euler step.
    head = 1 if settings.flow and float(sigmas[0]) >= 1.0 else 0
    if head:
        x = sample_euler(denoiser, x, sigmas[:2], callback=callback)

    def shifted(info: dict) -> None:
        callback({**info, "i": info["i"] + head})

    samples = sample_euler_ancestral(denoiser, x, sigmas[head:], callback=shifted, flow=settings.flow,
                                     noise_fn=noise_fn)  # fmt: skip
    return SegmentResult(samples, trajectory)


def run_segment(
    guided: Denoiser,
    unconditional: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    settings: SegmentSettings,
    continuation: Continuation | None = None,
    noise_fn: NoiseFn | None = None,
    on_step: StepHook | None = None,
) -> SegmentResult:
    """One segment. Without a continuation: plain sampling from x (noise at sigmas[0]). With one: x is ignored;
    inversion of the repeated last frame (+ Dynamic Noise), then structure-guided sampling."""
    if continuation is None:
        return sample_segment(guided, x, sigmas, settings, noise_fn, on_step)
    inversion = invert(unconditional, continuation.clean, continuation.inversion_sigmas, settings.flow,
                       continuation.reference, settings.last_frame_inversion, on_step,
                       settings.inversion_refinement)  # fmt: skip
    start = inversion.x
    if settings.dynamic_noise:
        if noise_fn is None:
            raise ValueError("dynamic noise needs a noise source")
        start = with_dynamic_noise(inversion, noise_fn(start), settings.flow)
    # Sampling starts at the top of its own schedule; the inversion ended at the top of its own.
    if not math.isclose(inversion.sigma, float(sigmas[0]), rel_tol=1e-4):
        raise ValueError(
            f"the inversion ends at sigma {inversion.sigma:.6g}, sampling starts at {float(sigmas[0]):.6g}"
        )
    weight = structure_weight_per_step(settings.structure_guidance, len(sigmas) - 1)
    return sample_segment(structure_guided(guided, continuation.reference, weight), start, sigmas, settings, noise_fn,
                          on_step)  # fmt: skip


def inversion_schedule(sigmas: Tensor) -> Tensor:
    """A descending sampling schedule ending at 0, reversed: the inversion's ascending one."""
    if float(sigmas[-1]) != 0.0:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.flip(0)


SegmentRunner = Callable[[int, "Continuation | None"], SegmentResult]


def generate_segments(
    count: int, run: SegmentRunner, continue_from: Callable[[SegmentResult], Tensor], inversion_sigmas: Tensor
) -> list[SegmentResult]:
    """The segment loop: run(k, continuation) per segment; continue_from(previous) gives the repeated last frame."""
    if count < 1:
        raise ValueError("prompts: the sequence is empty")
    results: list[SegmentResult] = []
    for k in range(count):
        continuation = None
        if results:
            continuation = Continuation(continue_from(results[-1]), results[-1].trajectory, inversion_sigmas)
        results.append(run(k, continuation))
    return results
