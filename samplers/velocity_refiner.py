"""FlowTurbo's velocity refiner: a small network that updates a cached velocity to a nearby point and time,
and its distillation from the base model (pure torch; the node layer supplies the model and the files).

Objective (FlowTurbo): from a model-generated sample at noise level s with velocity v = v(x, s), move a small
step along v to (x', s'), and fit r(x', s', v) to v(x', s') - v. Here s' is drawn up to 12% of the schedule
further along it, in schedule-position units, so the same rule serves flow and VE (EPS) schedules.
"""

from __future__ import annotations

import copy
import json
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
    generator: torch.Generator, prompts: int = 1, device: torch.device | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(x', s', v, target) for one batch: noise model samples to s, step along v to s', target v(x', s') - v.

    With a batch of `prompts` prompts, data row i was generated with prompt i % prompts and the velocity sees row j
    with prompt j % prompts (ComfyUI tiles conditioning over rows), so row j draws only data of its own prompt.
    The batch is built on `device` (default: data's). The random draws come from the CPU `generator` and the schedule
    arithmetic runs on CPU in float64, so a seed gives the same batch on every device; only then is it moved.
    """
    device = data.device if device is None else torch.device(device)
    usable = sigmas.detach().double().cpu()  # ComfyUI hands sigmas over on the sampling device
    usable = usable[usable > 0]
    n = len(usable) - 1
    groups = data.shape[0] // prompts
    if groups < 1:
        raise ValueError(f"samples: {data.shape[0]} model samples cannot cover {prompts} prompts")
    pick = torch.randint(0, groups, (batch,), generator=generator) * prompts + torch.arange(batch) % prompts
    x0 = data[pick.to(data.device)].to(device)
    start = torch.rand(batch, generator=generator, dtype=torch.float64) * n
    step = torch.rand(batch, generator=generator, dtype=torch.float64) * step_fraction * n
    sigma = interpolate_sigmas(usable, start).to(device=device, dtype=x0.dtype)
    sigma_next = interpolate_sigmas(usable, (start + step).clamp(max=n)).to(device=device, dtype=x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(device)
    alpha = (1 - sigma) if flow else torch.ones_like(sigma)
    x = append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * noise
    v = velocity(x, sigma)
    x_next = x + append_dims(sigma_next - sigma, x.ndim) * v
    return x_next, sigma_next, v, velocity(x_next, sigma_next) - v


def generate_samples(
    velocity: Velocity,
    sigmas: Tensor,
    noise: Tensor,
    chunk: int,
    device: torch.device | str,
    dtype: torch.dtype,
    on_chunk: Callable[[int], None] | None = None,
) -> Tensor:
    """The model's own samples for distillation: Euler over `sigmas` from `noise` [N, ...] (unit variance, on CPU),
    `chunk` rows per model call. Each row's path depends only on its own noise, so the result is that of one
    N-row batch (up to the model's batch-dependent rounding) without its memory. Returned on CPU, in `dtype`:
    training moves only each batch's rows to the device. on_chunk(rows done) may raise to stop (Cancel)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 (got {chunk})")
    samples = torch.empty(noise.shape, dtype=dtype)
    for rows in range(0, noise.shape[0], chunk):
        x = noise[rows : rows + chunk].to(device=device, dtype=dtype) * sigmas[0]
        ones = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i] * ones)
        samples[rows : rows + chunk] = x.cpu()
        if on_chunk is not None:
            on_chunk(min(rows + chunk, noise.shape[0]))
    return samples


@dataclass
class TrainingState:
    """What continuing a run exactly needs beyond the weights: AdamW's moments and the training draws' random
    stream, as they stand after `iteration` completed iterations."""

    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    iteration: int = 0

    @classmethod
    def start(cls, net: nn.Module, config: TrainingConfig, seed: int, iteration: int = 0) -> TrainingState:
        """A fresh optimizer, and a stream seeded with seed + iteration (how files without a saved stream resume)."""
        optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate)
        return cls(optimizer, torch.Generator().manual_seed((seed + iteration) % 2**64), iteration)

    def tensors(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The optimizer and random stream as safetensors tensors ('optimizer.<param>.<name>', 'rng_state') plus
        string metadata (the optimizer's param groups, JSON)."""
        state = self.optimizer.state_dict()
        tensors = {"rng_state": self.generator.get_state()}
        for index, values in state["state"].items():
            for name, value in values.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
        return tensors, {"optimizer_param_groups": json.dumps(state["param_groups"])}

    def restore(self, tensors: dict[str, Tensor], metadata: dict[str, str], learning_rate: float) -> bool:
        """Load what `tensors` saved; False (state unchanged) when they hold no optimizer state (older files).
        The learning rate stays the one asked for now, so a resumed run can change it."""
        if "optimizer_param_groups" not in metadata or "rng_state" not in tensors:
            return False
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                index, name = key[len("optimizer.") :].split(".", 1)
                state.setdefault(int(index), {})[name] = value
        groups = json.loads(metadata["optimizer_param_groups"])
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.generator.set_state(tensors["rng_state"])
        return True


def train_velocity_refiner(
    net: VelocityRefinerNet,
    ema: VelocityRefinerNet,
    velocity: Velocity,
    data: Tensor,
    sigmas: Tensor,
    config: TrainingConfig,
    state: TrainingState,
    on_iteration: Callable[[int, float], None] | None = None,
    pooled: Tensor | None = None,
    prompts: int | None = None,
) -> int:
    """Distil `net` (AdamW, state.optimizer) with an EMA copy in `ema` from state.iteration on; returns the
    iteration reached. Batches are built on net's device. on_iteration may raise to stop (Cancel): the weights and
    `state` then stand after the last completed iteration, so saving them resumes exactly. pooled [P, D]: the pooled
    conditioning the base model's velocity sees, tiled over a batch's rows the way ComfyUI tiles it (row j:
    pooled[j % P]); P > 1 prompts: each row trains on samples of its own prompt (see sample_training_pair).
    prompts: the conditioning's batch, by default pooled's rows (or 1)."""
    if prompts is None:
        prompts = 1 if pooled is None else pooled.shape[0]
    device = next(net.parameters()).device
    while state.iteration < config.iterations:
        with torch.no_grad():
            x, sigma, v, target = sample_training_pair(
                velocity, data, sigmas, net.flow, config.batch_size, config.max_step_fraction, state.generator,
                prompts, device,
            )  # fmt: skip
        x, sigma, v, target = (t.detach().clone().float() for t in (x, sigma, v, target))
        rows = None if pooled is None else tile_rows(pooled, x.shape[0]).detach().clone().float()
        loss = (net(x, sigma, v, rows) - target).pow(2).mean()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.lerp_(p, 1 - config.ema_decay)
        state.iteration += 1
        if on_iteration is not None:
            on_iteration(state.iteration, loss.item())
    return state.iteration


def new_refiner(
    channels: int, flow: bool, hidden: int = 64, pooled_dim: int = 0, seed: int | None = None
) -> tuple[VelocityRefinerNet, VelocityRefinerNet]:
    """(net, its EMA copy). With a seed the initial weights follow it (a training run is then reproducible, and a
    resumed run equals an uninterrupted one), drawn without touching the global random state."""
    if seed is None:
        net = VelocityRefinerNet(channels, hidden, flow, pooled_dim=pooled_dim)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = VelocityRefinerNet(channels, hidden, flow, pooled_dim=pooled_dim)
    return net, copy.deepcopy(net).requires_grad_(False)
