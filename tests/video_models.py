"""An exact linear-Gaussian video model, as a plain denoiser and as a real ComfyUI MODEL, for tests.

Every (channel, pixel) of a video latent [B, C, T, H, W] is an independent time series x0 ~ N(m_c 1, S) with
S_ts = std^2 rho^|t - s| (AR(1): neighbouring frames correlate), where the per-channel mean m is the "prompt".
A noisy sample is x = alpha x0 + sigma eps (alpha = 1 - sigma for flow models, 1 for EPS/VE), so the posterior
mean is closed form along the frame axis:

    E[x0 | x] = m + Q diag(alpha l / (alpha^2 l + sigma^2)) Q^T (x - alpha m),   S = Q diag(l) Q^T.

The MODEL wraps it like tiny_models' GMM MODEL: a BaseModel that hands the network the exact sigma, and a network
returning eps (EPS) or velocity (flow) so that ComfyUI's calculate_denoised gives exactly the posterior mean.
Conditioning: cross-attn [1, 1, C] holding the prompt mean m (zeros: the unconditional mean 0).

ComfyUI is imported lazily, as in tiny_models.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import Tensor

CHANNELS = 16  # like Wan, so the tests' 16-channel tiny VAE fits
RHO, STD = 0.9, 1.0
SIGMA_KEY = "tl_video_sigma"  # transformer_options key carrying the exact per-row sigma to the network


class LinearGaussianVideo:
    """x0 ~ N(mean_c, std^2 rho^|t-s|) per (channel, pixel); float64 throughout."""

    def __init__(self, rho: float = RHO, std: float = STD, flow: bool = True) -> None:
        self.rho, self.std, self.flow = rho, std, flow

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a handful of frame counts per test session
    def eigen(self, frames: int) -> tuple[Tensor, Tensor]:
        t = torch.arange(frames, dtype=torch.float64)
        cov = self.std**2 * self.rho ** (t[:, None] - t[None, :]).abs()
        values, vectors = torch.linalg.eigh(cov)
        return values, vectors

    def alpha(self, sigma: Tensor) -> Tensor:
        return 1.0 - sigma if self.flow else torch.ones_like(sigma)

    def denoise(self, x: Tensor, sigma, mean: Tensor | None = None) -> Tensor:
        """E[x0 | x] for x [B, C, T, H, W], sigma scalar or [B], mean [C] or [B, C] (None: zeros)."""
        dtype = x.dtype
        x = x.to(torch.float64)
        b, c, frames = x.shape[:3]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(b)
        m = torch.zeros(b, c, dtype=torch.float64) if mean is None else torch.as_tensor(mean, dtype=torch.float64)
        m = m.reshape(-1, c).expand(b, c).reshape(b, c, 1, 1, 1)
        a = self.alpha(sigma).reshape(b, 1, 1, 1, 1)
        values, vectors = self.eigen(frames)
        s2 = sigma.reshape(b, 1) ** 2
        gain = a.reshape(b, 1) * values / (a.reshape(b, 1) ** 2 * values + s2)  # [B, T]
        centred = (x - a * m).movedim(2, -1) @ vectors  # coordinates in the eigenbasis, frames last
        centred = centred * gain.reshape(b, 1, 1, 1, frames)
        return (m + (centred @ vectors.T).movedim(-1, 2)).to(dtype)

    def sample(self, shape, mean: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        b, c, frames = shape[:3]
        values, vectors = self.eigen(frames)
        white = torch.randn(shape, generator=generator, dtype=torch.float64).movedim(2, -1)
        x0 = (white * values.sqrt()) @ vectors.T
        m = torch.zeros(c, dtype=torch.float64) if mean is None else torch.as_tensor(mean, dtype=torch.float64)
        return x0.movedim(-1, 2) + m.reshape(1, c, 1, 1, 1)


def prompt_means(count: int, channels: int = CHANNELS, seed: int = 0, scale: float = 1.0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(channels, generator=gen, dtype=torch.float64) for _ in range(count)]


def video_conditioning(mean: Tensor) -> list:
    """CONDITIONING carrying a prompt mean: cross-attn [1, 1, C]."""
    return [[torch.as_tensor(mean, dtype=torch.float32).reshape(1, 1, -1), {}]]


class LinearGaussianVideoNet(torch.nn.Module):
    """diffusion_model of the MODEL: eps (EPS) or velocity (flow), so x - out * sigma is the posterior mean."""

    def __init__(self, rho: float = RHO, std: float = STD, flow: bool = True, device=None, operations=None, **_):
        super().__init__()
        self.video = LinearGaussianVideo(rho, std, flow)
        self.dtype = torch.float32

    def forward(self, xc, timesteps, context=None, transformer_options=None, **kwargs):
        transformer_options = transformer_options or {}
        if SIGMA_KEY not in transformer_options:
            raise RuntimeError("LinearGaussianVideoNet needs the exact sigma: call it through its BaseModel")
        b = xc.shape[0]
        sigma = transformer_options[SIGMA_KEY].detach().to("cpu", torch.float64).reshape(-1).expand(b)
        x = xc.detach().to("cpu", torch.float64)
        if not self.video.flow:  # undo EPS calculate_input: xc = x / sqrt(sigma^2 + 1)
            x = x * (sigma**2 + 1.0).sqrt().reshape(-1, 1, 1, 1, 1)
        mean = None if context is None else context[:, 0, :].detach().to("cpu", torch.float64).expand(b, -1)
        den = self.video.denoise(x, sigma, mean)
        s = sigma.reshape(-1, 1, 1, 1, 1)
        out = torch.where(s > 0, (x - den) / s.clamp_min(1e-300), torch.zeros_like(x))
        return out.to(device=xc.device, dtype=torch.float32)


@functools.cache
def _classes() -> SimpleNamespace:
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models_base

    class VideoLatentFormat(comfy.latent_formats.LatentFormat):
        scale_factor = 1.0
        latent_channels = CHANNELS
        latent_dimensions = 3

    class VideoConfig(comfy.supported_models_base.BASE):
        unet_extra_config: dict = {}
        sampling_settings: dict = {}  # FLOW: ModelSamplingDiscreteFlow, shift 1.0
        memory_usage_factor = 0.01
        latent_format = VideoLatentFormat

    class VideoBaseModel(comfy.model_base.BaseModel):
        def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
            transformer_options = {**(transformer_options or {}), SIGMA_KEY: t}
            return super()._apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    return SimpleNamespace(config=VideoConfig, base_model=VideoBaseModel)


def build_video_model(flavour: str = "flow"):
    """A ComfyUI MODEL whose denoised output is exactly LinearGaussianVideo(flow=flavour == "flow").denoise.

    Built fresh each call (it has no weights), so no ModelPatcher outlives the test session's ComfyUI.
    """
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher

    if flavour not in ("flow", "eps"):
        raise ValueError(f"unknown flavour {flavour!r}; expected 'flow' or 'eps'")
    classes = _classes()
    flow = flavour == "flow"
    config = classes.config({"rho": RHO, "std": STD, "flow": flow})
    model_type = comfy.model_base.ModelType.FLOW if flow else comfy.model_base.ModelType.EPS
    with torch.inference_mode(False):
        model = classes.base_model(config, model_type=model_type, unet_model=LinearGaussianVideoNet)
    load, offload = mm.get_torch_device(), mm.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=offload)


TINY_CLIP_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                    "projection_dim": 32}  # fmt: skip


def build_tiny_clip(seed: int = 0):
    """A real comfy.sd.CLIP (SD1 tokenizer, CLIP-L text model at width 32, seeded weights): its conditioning
    [1, 77, 32] fits the tiny Wan model's text width. Built in ~0.1 s; not cached (callers hold it)."""
    import comfy.sd
    import comfy.sd1_clip
    from tiny_models import fill_seeded_

    target = SimpleNamespace(params={}, clip=comfy.sd1_clip.SD1ClipModel, tokenizer=comfy.sd1_clip.SD1Tokenizer)
    options = {"clip_l_model_config": dict(TINY_CLIP_CONFIG), "dtype": torch.float32}
    with torch.inference_mode(False), torch.no_grad():
        clip = comfy.sd.CLIP(target, model_options=options)
        fill_seeded_(clip.cond_stage_model, seed)
    return clip


def build_wan_vae(dim: int = 8, seed: int = 0):
    """A real Wan 2.1 causal video VAE (comfy.sd.VAE detects it from the state dict), seeded weights.

    dim 8: tiny, 4n + 1 pixel frames at 64x64 <-> n + 1 latent frames at 8x8 in ~0.3 s on a CPU; dim 96: the
    real Wan 2.1 VAE's size (for benchmarks). Not cached (callers hold it).
    """
    import comfy.ldm.wan.vae
    import comfy.sd
    from tiny_models import fill_seeded_

    with torch.inference_mode(False), torch.no_grad():
        donor = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                         temperal_downsample=[False, True, True])  # fmt: skip
        fill_seeded_(donor, seed)
        return comfy.sd.VAE(sd=donor.state_dict())
