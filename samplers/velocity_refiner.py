"""FlowTurbo's velocity refiner: a small network that updates a cached velocity to a nearby point and time,
and its distillation from the base model (pure torch; the node layer supplies the model and the files).

Objective (FlowTurbo): from a model-generated sample at noise level s with velocity v = v(x, s), move a small
step along v to (x', s'), and fit r(x', s', v) to v(x', s') - v. Here s' is drawn up to 12% of the schedule
further along it, in schedule-position units, so the same rule serves flow and VE (EPS) schedules.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .conventions import append_dims

Velocity = Callable[[Tensor, Tensor], Tensor]  # the base model's velocity v(x, sigma), sigma per row


def tile_rows(t: Tensor, rows: int) -> Tensor:
    """`t` [P, ...] cycled to `rows` rows, as ComfyUI tiles a conditioning batch onto a latent batch."""
    return t.repeat((math.ceil(rows / t.shape[0]),) + (1,) * (t.ndim - 1))[:rows]


class VelocityRefinerNet(nn.Module):
    """Conv net on [x, v] with a noise-level embedding (plus a projection of the pooled text conditioning when
    pooled_dim > 0: Flux, SD3, SDXL); zero-initialised output, so it starts as 'no change'.
    Video latents [B, C, T, H, W] are refined frame by frame."""

    def __init__(
        self, channels: int, hidden: int = 64, flow: bool = True, frequencies: int = 8, pooled_dim: int = 0
    ) -> None:
        super().__init__()
        self.channels, self.hidden, self.flow, self.frequencies = channels, hidden, flow, frequencies
        self.pooled_dim = pooled_dim
        self.inp = nn.Conv2d(2 * channels, hidden, 3, padding=1)
        self.noise = nn.Sequential(nn.Linear(2 * frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        if pooled_dim:  # only then: refiners saved without it keep their exact state dict
            self.pooled = nn.Linear(pooled_dim, hidden)
        self.mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()  # type: ignore[union-attr]

    def noise_features(self, sigma: Tensor) -> Tensor:
        # Flow sigma lives in [0, 1]; VE sigma spans decades, so it is embedded on a log scale.
        level = sigma if self.flow else torch.log(sigma.clamp_min(1e-6)) / 4
        k = 2.0 ** torch.arange(self.frequencies, device=sigma.device, dtype=torch.float32)
        angles = level.float()[:, None] * k[None] * math.pi
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, x: Tensor, sigma: Tensor, v: Tensor, pooled: Tensor | None = None) -> Tensor:
        """pooled [B, pooled_dim]: the pooled conditioning of each row (required exactly when pooled_dim > 0)."""
        if x.ndim == 5:  # [B, C, T, H, W]: fold time into the batch
            b, c, t, h, w = x.shape
            fold = lambda a: a.movedim(2, 1).reshape(b * t, c, h, w)  # noqa: E731
            per_frame = None if pooled is None else pooled.repeat_interleave(t, 0)
            out = self.forward(fold(x), sigma.repeat_interleave(t), fold(v), per_frame)
            return out.reshape(b, t, c, h, w).movedim(1, 2)
        if self.pooled_dim and (pooled is None or pooled.shape[-1] != self.pooled_dim):
            got = "none" if pooled is None else f"{pooled.shape[-1]} features"
            raise ValueError(f"this refiner needs a {self.pooled_dim}-feature pooled conditioning (got {got})")
        dtype = x.dtype
        x_in = x.float()
        if not self.flow:  # VE samples grow with sigma: feed them at unit scale, as ComfyUI's c_in does
            x_in = x_in / append_dims(torch.sqrt(1.0 + sigma.float() ** 2), x.ndim)
        hidden = nn.functional.silu(self.inp(torch.cat([x_in, v.float()], dim=1)))
        embedding = self.noise(self.noise_features(sigma))
        if self.pooled_dim:
            embedding = embedding + self.pooled(pooled.float())  # type: ignore[union-attr]
        hidden = hidden + embedding[:, :, None, None]
        hidden = nn.functional.silu(self.mid(hidden))
        return self.out(hidden).to(dtype)


@dataclass
class TrainingConfig:
    iterations: int
    batch_size: int = 8
    learning_rate: float = 1e-4
    ema_decay: float = 0.999
    max_step_fraction: float = 0.12  # FlowTurbo's dt ~ U(0, 0.12), as a fraction of the schedule


def interpolate_sigmas(sigmas: Tensor, position: Tensor) -> Tensor:
    """Sigma at fractional positions along a decreasing schedule (0 = first sigma, len - 1 = last)."""
    low = position.floor().long().clamp(0, len(sigmas) - 2)
    frac = position - low
    return sigmas[low] * (1 - frac) + sigmas[low + 1] * frac


def sample_training_pair(
    velocity: Velocity, data: Tensor, sigmas: Tensor, flow: bool, batch: int, step_fraction: float,
    generator: torch.Generator, prompts: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(x', s', v, target) for one batch: noise model samples to s, step along v to s', target v(x', s') - v.

    With a batch of `prompts` prompts, data row i was generated with prompt i % prompts and the velocity sees row j
    with prompt j % prompts (ComfyUI tiles conditioning over rows), so row j draws only data of its own prompt.
    """
    usable = sigmas[sigmas > 0]
    n = len(usable) - 1
    groups = data.shape[0] // prompts
    if groups < 1:
        raise ValueError(f"samples: {data.shape[0]} model samples cannot cover {prompts} prompts")
    pick = torch.randint(0, groups, (batch,), generator=generator) * prompts + torch.arange(batch) % prompts
    x0 = data[pick]
    start = torch.rand(batch, generator=generator, dtype=torch.float64) * n
    step = torch.rand(batch, generator=generator, dtype=torch.float64) * step_fraction * n
    sigma = interpolate_sigmas(usable.double(), start).to(x0.dtype)
    sigma_next = interpolate_sigmas(usable.double(), (start + step).clamp(max=n)).to(x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    alpha = (1 - sigma) if flow else torch.ones_like(sigma)
    x = append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * noise
    v = velocity(x, sigma)
    x_next = x + append_dims(sigma_next - sigma, x.ndim) * v
    return x_next, sigma_next, v, velocity(x_next, sigma_next) - v


def train_velocity_refiner(
    net: VelocityRefinerNet,
    ema: VelocityRefinerNet,
    velocity: Velocity,
    data: Tensor,
    sigmas: Tensor,
    config: TrainingConfig,
    seed: int,
    start_iteration: int = 0,
    on_iteration: Callable[[int, float], None] | None = None,
    pooled: Tensor | None = None,
    prompts: int | None = None,
) -> int:
    """Distil `net` (AdamW) with an EMA copy in `ema`; returns the iteration reached. on_iteration may raise
    to stop (Cancel): the weights trained so far stay in net and ema. pooled [P, D]: the pooled conditioning the
    base model's velocity sees, tiled over a batch's rows the way ComfyUI tiles it (row j: pooled[j % P]); P > 1
    prompts: each row trains on samples of its own prompt (see sample_training_pair). prompts: the conditioning's
    batch, by default pooled's rows (or 1)."""
    if prompts is None:
        prompts = 1 if pooled is None else pooled.shape[0]
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(seed + start_iteration)
    iteration = start_iteration
    while iteration < config.iterations:
        with torch.no_grad():
            x, sigma, v, target = sample_training_pair(
                velocity, data, sigmas, net.flow, config.batch_size, config.max_step_fraction, generator,
                prompts,
            )  # fmt: skip
        x, sigma, v, target = (t.detach().clone().float() for t in (x, sigma, v, target))
        rows = None if pooled is None else tile_rows(pooled, x.shape[0]).detach().clone().float()
        loss = (net(x, sigma, v, rows) - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.lerp_(p, 1 - config.ema_decay)
        iteration += 1
        if on_iteration is not None:
            on_iteration(iteration, loss.item())
    return iteration


def new_refiner(
    channels: int, flow: bool, hidden: int = 64, pooled_dim: int = 0
) -> tuple[VelocityRefinerNet, VelocityRefinerNet]:
    net = VelocityRefinerNet(channels, hidden, flow, pooled_dim=pooled_dim)
    return net, copy.deepcopy(net).requires_grad_(False)
