"""Training the demo models: one loop for every demo network (EPS, v or flow), run inside a real ComfyUI.

The network is trained through ComfyUI's own BaseModel.apply_model, so the parametrisation, input scaling and
timestep mapping are exactly the ones used at sampling time. With x_t = noise_scaling(sigma, noise, x0) and
D = apply_model(x_t, sigma), the loss is the MSE of each parametrisation's native target written on D (EPS and
rectified flow: (x_t - x0) / sigma; v-prediction: the same plus a 1 / sigma_data^2 weight on D's error).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from atomic import atomic_destination
from comfy_host import PACK_ROOT, InProcessHost

PACK_FOLDER = "trajectory_lab"
_host: InProcessHost | None = None


def pack(submodule: str):
    """A pack module as ComfyUI loaded it (one ComfyUI per process)."""
    global _host
    if _host is None:
        _host = InProcessHost({PACK_FOLDER: PACK_ROOT})
    return _host.import_from(PACK_FOLDER, submodule)


# sample(rng, n) -> (x0 [n, ...] in the model's latent space, prompts)
BatchSampler = Callable[[np.random.Generator, int], tuple[torch.Tensor, list[str]]]


@dataclass
class TrainSettings:
    steps: int = 2000
    batch: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 100
    decay_from: float = 1.0  # share of the steps after which the learning rate falls linearly to 0 (1.0: never)
    cfg_dropout: float = 0.1  # share of prompts replaced by the empty (unconditional) prompt
    ema: float = 0.999
    seed: int = 0
    log_every: int = 100
    # Noise levels: "uniform" over the model's sigmas, or "logit_normal" (rectified flow only, SD3's choice):
    # t = sigmoid(logit_mean + logit_std * z), weighting the middle noise levels where layout and motion are decided.
    noise_levels: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0


def conditioning_kwargs(family: str, prompts: list[str]) -> dict[str, torch.Tensor]:
    """apply_model keyword arguments for a batch of prompts: cross-attention tokens, and the pooled vector as y
    for the families whose network takes one."""
    text_encoder = pack("demo.text_encoder")
    tokens, pooled = text_encoder.encode(prompts)
    kwargs = {"c_crossattn": tokens}
    if family == "sd3":
        kwargs["y"] = pooled
    return kwargs


def training_sigmas(sampling, n: int, settings: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """n noise levels: uniform over the model's own sigmas, or logit-normal in flow time (sigma = shifted t)."""
    import comfy.model_sampling

    if settings.noise_levels == "uniform":
        return sampling.sigmas[torch.randint(0, len(sampling.sigmas), (n,), generator=gen)]
    if settings.noise_levels != "logit_normal":
        raise ValueError(f"noise_levels: {settings.noise_levels!r}; expected 'uniform' or 'logit_normal'")
    if not isinstance(sampling, comfy.model_sampling.CONST):
        raise ValueError("noise_levels: 'logit_normal' is for rectified-flow models; use 'uniform'")
    t = torch.sigmoid(settings.logit_mean + settings.logit_std * torch.randn(n, generator=gen))
    return sampling.sigma(t * sampling.multiplier).clamp(min=float(sampling.sigma_min))


def denoising_loss(model, x0: torch.Tensor, cond: dict, gen: torch.Generator, settings: TrainSettings) -> torch.Tensor:
    """MSE of the network's native target, written on the denoised estimate D: eps and flow targets are
    (x_t - x0) / sigma, an error of (D - x0) / sigma; v-prediction (sigma_data s) weighs D's squared error by
    1 / sigma^2 + 1 / s^2."""
    import comfy.model_sampling

    sampling = model.model_sampling
    sigma = training_sigmas(sampling, x0.shape[0], settings, gen).to(x0.dtype)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = sampling.noise_scaling(sigma, noise, x0)
    denoised = model.apply_model(x_t, sigma, **cond)
    view = (-1,) + (1,) * (x0.ndim - 1)
    weight = 1.0 / sigma**2
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        weight = weight + 1.0 / sampling.sigma_data**2
    return (weight.view(view) * (denoised - x0) ** 2).mean()


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then constant, then (from decay_from of the run) a linear fall to zero."""
    done = step / settings.steps
    decaying = settings.decay_from < 1.0 and done >= settings.decay_from
    tail = max(0.0, (1.0 - done) / (1.0 - settings.decay_from)) if decaying else 1.0
    return min(1.0, (step + 1) / settings.warmup) * tail


def train(model, family: str, sample: BatchSampler, settings: TrainSettings, log=print) -> dict:
    """Train `model.diffusion_model` in place; return the EMA weights and a summary of the run."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    net = model.diffusion_model
    net.train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: lr_factor(step, settings))
    started, running = time.monotonic(), 0.0
    with torch.inference_mode(False):
        for step in range(1, settings.steps + 1):
            x0, prompts = sample(rng, settings.batch)
            prompts = [p if rng.uniform() >= settings.cfg_dropout else "" for p in prompts]
            loss = denoising_loss(model, x0, conditioning_kwargs(family, prompts), gen, settings)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            schedule.step()
            decay = min(settings.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), net.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
            running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
            if step % settings.log_every == 0 or step == settings.steps:
                log(f"step {step}/{settings.steps}  loss {running:.4f}  {time.monotonic() - started:.0f} s")
    net.eval()
    summary = {"steps": settings.steps, "seconds": round(time.monotonic() - started, 1), "final_loss": running}
    return {"state_dict": ema.state_dict(), "summary": summary}


def save_weights(path: Path, state_dict: dict, metadata: dict) -> None:
    """fp16 safetensors with string metadata, written beside the target and renamed into place."""
    import safetensors.torch

    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in state_dict.items()}
    with atomic_destination(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in metadata.items()})
