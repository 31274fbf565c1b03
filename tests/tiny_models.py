"""Real ComfyUI models at tiny sizes, and an exact Gaussian-mixture MODEL, for tests.

Architectures are the real ComfyUI classes (`comfy.supported_models` configs -> `BaseModel` subclasses ->
`ModelPatcher`), built from hand-written tiny `unet_config`s: ComfyUI's detection from a state dict only knows
the real widths. `comfy.ops` never initialises weights, so every parameter is filled from a seeded generator.

The GMM model is a ComfyUI MODEL whose denoiser is the closed-form posterior mean of `gmm_exact.GaussianMixture`,
so samplers and guiders can be checked against ground truth.

ComfyUI is imported lazily: importing this module never configures ComfyUI (the host does that first).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import torch
from gmm_exact import GaussianMixture, flow_alpha, ve_alpha

ARCHS = ("sd15", "sdxl", "sd3", "flux", "wan21")
GMM_FLAVOURS = ("eps", "flow")
GMM_PRESETS = ("four_modes", "two_modes_1d", "gaussian_2d", "four_modes_blurred")

TOKENS = 8  # text tokens per tiny conditioning
POOLED_DIM = 32
# arch -> (cross-attention width, pooled width or None)
COND_DIMS = {
    "sd15": (64, None),
    "sdxl": (64, POOLED_DIM),
    "sd3": (32, POOLED_DIM),
    "flux": (32, POOLED_DIM),
    "wan21": (32, None),
}

_UNET_COMMON: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

# Tiny unet_configs. Head settings are applied after the config's own `unet_extra_config` (which would
# otherwise force SD1.5's 8 heads or SDXL's 64-wide heads onto 32 channels).
TINY_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {
        **_UNET_COMMON,
        "adm_in_channels": None,
        "context_dim": 64,
        "use_linear_in_transformer": False,
        # attn1/attn2 in input_blocks 1 and 4, middle_block 1 and every output block
        "transformer_depth": [1, 1],
        "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1],
        "num_heads": 2,
        "num_head_channels": -1,
    },
    "sdxl": {
        **_UNET_COMMON,
        "num_classes": "sequential",
        "adm_in_channels": POOLED_DIM + 6 * 256,  # pooled + 6 size embeddings (model_base.SDXL.encode_adm)
        "context_dim": 64,
        "use_linear_in_transformer": True,
        # like SDXL: no attention at the top level, 2-deep transformers below (input_blocks.3, middle, output 0-1)
        "transformer_depth": [0, 2],
        "transformer_depth_middle": 2,
        "transformer_depth_output": [0, 0, 2, 2],
        "num_heads": -1,
        "num_head_channels": 16,
    },
    "sd3": {
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "depth": 2,  # MMDiT: hidden 64 * depth, one 64-wide head per depth
        "input_size": None,
        "adm_in_channels": POOLED_DIM,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 32, "out_features": 128}},
        "pos_embed_max_size": 16,
        "num_patches": 256,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    },
    "flux": {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "vec_in_dim": POOLED_DIM,
        "context_in_dim": 32,
        "hidden_size": 64,
        "mlp_ratio": 4.0,
        "num_heads": 2,
        "depth": 2,
        "depth_single_blocks": 2,
        "axes_dim": [8, 12, 12],  # sums to the head width 32
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": True,
    },
    "wan21": {
        "image_model": "wan2.1",
        "model_type": "t2v",
        "patch_size": (1, 2, 2),
        "in_dim": 16,
        "dim": 64,
        "ffn_dim": 128,
        "freq_dim": 256,
        "text_dim": 32,
        "out_dim": 16,
        "num_heads": 2,
        "num_layers": 2,
        "window_size": (-1, -1),
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": 1e-6,
    },
}

_CONFIG_CLASS = {"sd15": "SD15", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux", "wan21": "WAN21_T2V"}

# Buffers that ComfyUI allocates with torch.empty and normally loads from a checkpoint.
_EMPTY_BUFFERS = ("pos_embed",)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _new_patcher(model):
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


@torch.no_grad()
def fill_seeded_(module: torch.nn.Module, seed: int, empty_buffers=_EMPTY_BUFFERS) -> torch.nn.Module:
    """Deterministic random init: fan-in scaled matrices, gains near 1, small biases.

    Fan-in scaling keeps activations O(1) through the residual stacks, so outputs are neither zero nor huge.
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=torch.float32)

    for name, p in module.named_parameters():
        if p.ndim >= 2:
            value = draw(p) / math.sqrt(p[0].numel())
        elif name.endswith(("weight", "scale")):  # norm gains
            value = 1.0 + 0.02 * draw(p)
        else:
            value = 0.02 * draw(p)
        p.copy_(value.to(p.dtype))
    for name, b in module.named_buffers():
        if name.rsplit(".", 1)[-1] in empty_buffers:
            b.copy_((0.02 * draw(b)).to(b.dtype))
    return module


def _tiny_model_config(arch: str):
    import comfy.supported_models

    unet = dict(TINY_UNET_CONFIGS[arch])
    cls = getattr(comfy.supported_models, _CONFIG_CLASS[arch])
    config = cls(unet)
    config.unet_config.update(unet)  # undo unet_extra_config's full-size head settings
    config.set_inference_dtype(torch.float32, None)
    return config


@functools.cache
def _base_patcher(kind: str, key: tuple):
    # Built outside inference mode so the cached weights are ordinary tensors, usable anywhere later.
    with torch.inference_mode(False), torch.no_grad():
        if kind == "arch":
            arch, seed = key
            model = _tiny_model_config(arch).get_model({})
            fill_seeded_(model.diffusion_model, seed)
        else:
            flavour, preset = key
            model = _gmm_model(flavour, preset)
    return _new_patcher(model)


def build_tiny_model(arch: str, seed: int = 0):
    """A ModelPatcher over the real BaseModel subclass of `arch`, float32, seeded weights.

    Built once per (arch, seed); each call returns a fresh clone, so callers' patches never leak.
    """
    _check_arch(arch)
    return _base_patcher("arch", (arch, int(seed))).clone()


def tiny_conditioning(arch: str, seed: int = 0, batch: int = 1) -> list:
    """CONDITIONING for `arch`: [[cross_attn [batch, TOKENS, C], {"pooled_output": [batch, P]}?]]."""
    _check_arch(arch)
    ctx_dim, pooled_dim = COND_DIMS[arch]
    gen = torch.Generator().manual_seed(int(seed))
    cross_attn = torch.randn(batch, TOKENS, ctx_dim, generator=gen)
    extras = {}
    if pooled_dim is not None:  # SDXL/SD3/Flux feed it to their y/vector embedders; SDXL adds size embeddings
        extras["pooled_output"] = torch.randn(batch, pooled_dim, generator=gen)
    return [[cross_attn, extras]]


def latent_shape(arch: str, batch: int = 1) -> tuple:
    _check_arch(arch)
    if arch in ("sd15", "sdxl"):
        return (batch, 4, 8, 8)
    if arch == "wan21":
        return (batch, 16, 3, 8, 8)
    return (batch, 16, 8, 8)


def tiny_vae_config(latent_channels: int = 4) -> dict:
    # SD-style AutoencoderKL with 3 downsamples (x8); GroupNorm(32) needs every width divisible by 32.
    ddconfig = {
        "double_z": True,
        "z_channels": latent_channels,
        "resolution": 64,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    return {"params": {"ddconfig": ddconfig, "embed_dim": latent_channels}}


@functools.cache
def build_tiny_vae(latent_channels: int = 4, seed: int = 0):
    """A real comfy.sd.VAE (AutoencoderKL, 64x64 image <-> 8x8 latent), seeded weights. Cached per arguments."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = tiny_vae_config(latent_channels)
    with torch.inference_mode(False), torch.no_grad():
        donor = fill_seeded_(AutoencoderKL(**config["params"]), seed)
        vae = comfy.sd.VAE(sd=donor.state_dict(), config=config)
    vae.latent_channels = latent_channels  # the config path leaves the SD default of 4
    return vae


@functools.cache
def build_pixel_space_vae():
    """ComfyUI's identity VAE for pixel-space models: latent = image * 2 - 1, channels 3, no downscale."""
    import comfy.sd

    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


# ---------------------------------------------------------------------------------------------------------
# Exact Gaussian-mixture MODEL
# ---------------------------------------------------------------------------------------------------------

SIGMA_KEY = "tl_gmm_sigma"  # transformer_options key carrying the exact per-row sigma to the GMM network


def gmm_preset(preset: str = "four_modes") -> GaussianMixture:
    if preset == "four_modes":
        means = [[-2.5, -2.5], [2.5, -2.5], [-2.5, 2.5], [2.5, 2.5]]
        return GaussianMixture(means, [0.1, 0.2, 0.3, 0.4], 0.25)
    if preset == "four_modes_blurred":  # a deliberately coarser model of four_modes (T-Stitch's "small" model)
        means = [[-2.5, -2.5], [2.5, -2.5], [-2.5, 2.5], [2.5, 2.5]]
        return GaussianMixture(means, [0.1, 0.2, 0.3, 0.4], 1.0)
    if preset == "two_modes_1d":
        return GaussianMixture([[-2.0], [2.0]], [0.3, 0.7], 0.5)
    if preset == "gaussian_2d":  # one component: the posterior mean is linear in x
        return GaussianMixture([[1.0, -1.0]], [1.0], 1.0)
    raise ValueError(f"unknown GMM preset {preset!r}; expected one of {GMM_PRESETS}")


def gmm_latent_shape(preset: str = "four_modes", batch: int = 1) -> tuple:
    """One d-dim sample per batch row. (EmptyLatentImage cannot make it: its minimum 16x16 gives [B, 4, 2, 2].)"""
    return (batch, gmm_preset(preset).dim, 1, 1)


def gmm_conditioning(weights) -> list:
    """CONDITIONING selecting mixture modes: cross-attn [1, 1, K] of mode weights; all zeros = unconditional."""
    w = torch.as_tensor([float(v) for v in weights], dtype=torch.float32)
    if w.ndim != 1 or (w < 0).any():
        raise ValueError("GMM weights must be a flat list of non-negative numbers")
    return [[w.reshape(1, 1, -1), {}]]


class GMMDenoiser(torch.nn.Module):
    """diffusion_model of the GMM MODEL: returns eps (EPS) or velocity (FLOW) so that ComfyUI's
    `calculate_denoised` (x - out * sigma for both) is exactly the mixture's posterior mean E[x0 | x].

    Input [B, d, *spatial]: every spatial position is an independent d-dim sample. Conditioning context
    [B, L, K] holds mode weights in token 0; an all-zero row means the mixture's own weights.
    """

    def __init__(self, means, weights, stds, flow: bool = False, device=None, operations=None, **_):
        super().__init__()
        self.mixture = GaussianMixture(means, weights, stds)
        self.flow = flow
        self.dtype = torch.float32

    def forward(self, x, timesteps, context=None, transformer_options=None, **kwargs):
        import comfy.patcher_extension as pe

        transformer_options = transformer_options or {}
        # Honour DIFFUSION_MODEL wrappers like ComfyUI's own networks do.
        wrappers = pe.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL, transformer_options)
        return pe.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x, timesteps, context, transformer_options, **kwargs
        )

    def _row_weights(self, context, batch: int) -> torch.Tensor:
        prior = self.mixture.weights.expand(batch, -1)
        if context is None:
            return prior
        w = context[:, 0, :].detach().to("cpu", torch.float64).clamp_min(0.0)
        if w.shape[-1] != self.mixture.n_modes:
            raise ValueError(f"GMM conditioning has {w.shape[-1]} weights, the mixture {self.mixture.n_modes} modes")
        w = w.expand(batch, -1)
        return torch.where(w.sum(1, keepdim=True) > 0, w, prior)

    def _forward(self, xc, timesteps, context=None, transformer_options=None, **kwargs):
        if SIGMA_KEY not in (transformer_options or {}):
            raise RuntimeError("GMMDenoiser needs the exact sigma: call it through GMMBaseModel.apply_model")
        b, d = xc.shape[:2]
        if d != self.mixture.dim:
            raise ValueError(f"GMM latent has {d} channels, the mixture is {self.mixture.dim}-dimensional")
        sigma = transformer_options[SIGMA_KEY].detach().to("cpu", torch.float64).reshape(-1).expand(b)
        x = xc.detach().to("cpu", torch.float64)
        if not self.flow:  # undo EPS calculate_input: xc = x / sqrt(sigma^2 + sigma_data^2), sigma_data = 1
            x = x * (sigma**2 + 1.0).sqrt().reshape(-1, *([1] * (x.ndim - 1)))
        n = math.prod(x.shape[2:])
        flat = x.movedim(1, -1).reshape(b * n, d)
        sig = sigma.repeat_interleave(n)
        weights = self._row_weights(context, b).repeat_interleave(n, dim=0)
        alpha_fn = flow_alpha if self.flow else ve_alpha
        den = self.mixture.denoise(flat, sig, alpha_fn=alpha_fn, weights=weights)
        # Both EPS and CONST denoise as x - out * sigma; at sigma = 0 the posterior mean is x itself.
        out = torch.where(sig[:, None] > 0, (flat - den) / sig.clamp_min(1e-300)[:, None], torch.zeros_like(flat))
        out = out.reshape(b, *x.shape[2:], d).movedim(-1, 1)
        return out.to(device=xc.device, dtype=torch.float32)


@functools.cache
def _gmm_classes() -> SimpleNamespace:
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models_base

    class GMMLatentFormat(comfy.latent_formats.LatentFormat):
        scale_factor = 1.0

        def __init__(self, channels: int = 2):
            self.latent_channels = channels

    class GMMConfig(comfy.supported_models_base.BASE):
        unet_extra_config: dict = {}
        sampling_settings: dict = {}  # FLOW: ModelSamplingDiscreteFlow, shift 1.0, multiplier 1000
        memory_usage_factor = 0.01  # tiny, so calc_cond_batch always runs cond and uncond in one call

        def __init__(self, unet_config, channels: int):
            super().__init__(unet_config)
            self.latent_format = GMMLatentFormat(channels)

    class GMMBaseModel(comfy.model_base.BaseModel):
        def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
            # `t` here is the exact per-row sigma; BaseModel turns it into a lossy timestep (an argmin index for
            # ModelSamplingDiscrete) before the network sees it, so hand the network the sigma itself.
            transformer_options = {**(transformer_options or {}), SIGMA_KEY: t}
            return super()._apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    return SimpleNamespace(latent_format=GMMLatentFormat, config=GMMConfig, base_model=GMMBaseModel)


def _gmm_model(flavour: str, preset: str):
    import comfy.model_base

    if flavour not in GMM_FLAVOURS:
        raise ValueError(f"unknown GMM flavour {flavour!r}; expected one of {GMM_FLAVOURS}")
    mix = gmm_preset(preset)
    classes = _gmm_classes()
    unet_config = {
        "means": mix.means.tolist(),
        "weights": mix.weights.tolist(),
        "stds": mix.stds.tolist(),
        "flow": flavour == "flow",
    }
    config = classes.config(unet_config, mix.dim)
    model_type = comfy.model_base.ModelType.FLOW if flavour == "flow" else comfy.model_base.ModelType.EPS
    return classes.base_model(config, model_type=model_type, unet_model=GMMDenoiser)


def build_gmm_model(flavour: str = "eps", preset: str = "four_modes"):
    """A ComfyUI MODEL whose denoised output is exactly `gmm_preset(preset).denoise(...)`.

    eps: ModelSamplingDiscrete + EPS (SD1.5 schedule), x = x0 + sigma * eps.
    flow: ModelSamplingDiscreteFlow + CONST (shift 1), x = (1 - sigma) x0 + sigma * eps.
    Latent: [B, d, H, W] (EmptyLatentImage 8x8 gives [B, 4, 1, 1]; ComfyUI's fix_empty_latent_channels cuts it
    to d). The mixture is `model.model.diffusion_model.mixture`.
    """
    if preset not in GMM_PRESETS:
        raise ValueError(f"unknown GMM preset {preset!r}; expected one of {GMM_PRESETS}")
    return _base_patcher("gmm", (flavour, preset)).clone()


# ---------------------------------------------------------------------------------------------------------
# ControlNet and LoRA for the tiny UNets
# ---------------------------------------------------------------------------------------------------------

HINT_SIZE = 64  # hint IMAGE side: the ControlNet's hint block downsamples x8 to the 8x8 latent


@functools.cache
def build_tiny_controlnet(seed: int = 0):
    """A real comfy.controlnet.ControlNet over comfy.cldm.cldm.ControlNet shaped like the tiny "sd15" UNet.

    Built the way `comfy.controlnet.load_controlnet_state_dict` builds an ldm-format ControlNet (unet_config
    minus out_channels, plus hint_channels and ComfyUI's picked operations), but from the tiny config, since
    detection from a state dict cannot see tiny widths. Seeded weights include the zero-convs, so it acts.
    Cached: ControlNetApply* nodes copy it before setting a hint.
    """
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops

    config = _tiny_model_config("sd15")
    cn_config = dict(config.unet_config)
    cn_config.pop("out_channels")
    dtype = torch.float32
    load_device = mm.get_torch_device()
    manual_cast_dtype = mm.unet_manual_cast(dtype, load_device)
    cn_config.update(
        hint_channels=3,
        dtype=dtype,
        device=mm.unet_offload_device(),
        operations=comfy.ops.pick_operations(dtype, manual_cast_dtype),
    )
    with torch.inference_mode(False), torch.no_grad():
        control_model = fill_seeded_(comfy.cldm.cldm.ControlNet(**cn_config), seed)
    return comfy.controlnet.ControlNet(control_model, load_device=load_device, manual_cast_dtype=manual_cast_dtype)


def tiny_hint_image(seed: int = 0) -> torch.Tensor:
    """IMAGE [1, HINT_SIZE, HINT_SIZE, 3], uniform in [0, 1]."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(1, HINT_SIZE, HINT_SIZE, 3, generator=gen)


LORA_TARGETS = 5  # the first 4 attention projections and the first 2-D conv of the diffusion model


def _lora_target_keys(model) -> list[str]:
    sd = model.diffusion_model.state_dict()
    weights = [k for k, v in sd.items() if k.endswith(".weight") and v.ndim in (2, 4)]
    attn = [k for k in weights if "attn" in k and sd[k].ndim == 2][:4]
    conv = [k for k in weights if sd[k].ndim == 4][:1]
    return attn + conv


def tiny_lora_patches(arch: str = "sd15", seed: int = 0, rank: int = 2) -> dict:
    """Patches for `ModelPatcher.add_patches`: a seeded kohya-style LoRA (lora_up/lora_down/alpha, LoCon for the
    conv) over a few layers of `arch`'s tiny model, turned into ComfyUI's format by ComfyUI itself
    (`comfy.lora.model_lora_keys_unet` + `comfy.lora.load_lora`, as `comfy.sd.load_lora_for_models` does).
    """
    import comfy.lora

    _check_arch(arch)
    model = _base_patcher("arch", (arch, 0)).model  # key names do not depend on the weights' seed
    shapes = model.diffusion_model.state_dict()
    gen = torch.Generator().manual_seed(int(seed))
    lora_sd = {}
    for key in _lora_target_keys(model):
        shape = shapes[key].shape
        out_dim, in_shape = shape[0], tuple(shape[1:])
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        # LoCon conv: down carries the kernel, up is 1x1; fan-in scaling keeps the delta like the weight's size.
        up_shape = (out_dim, rank) + (1,) * (len(shape) - 2)
        down = torch.randn((rank,) + in_shape, generator=gen) / math.sqrt(math.prod(in_shape))
        up = torch.randn(up_shape, generator=gen) / math.sqrt(rank)
        lora_sd[f"{name}.lora_down.weight"] = down
        lora_sd[f"{name}.lora_up.weight"] = up
        lora_sd[f"{name}.alpha"] = torch.tensor(rank / 2.0)  # alpha / rank = 0.5: a moderate change
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    patches = comfy.lora.load_lora(lora_sd, key_map)
    if len(patches) != len(lora_sd) // 3:
        raise RuntimeError(f"ComfyUI mapped {len(patches)} of {len(lora_sd) // 3} tiny LoRA layers")
    return patches


def tiny_arch_of(model_patcher) -> str:
    """The ARCHS name of a tiny-model MODEL, from its supported_models config class."""
    name = type(getattr(model_patcher.model, "model_config", None)).__name__
    for arch, cls_name in _CONFIG_CLASS.items():
        if cls_name == name:
            return arch
    raise ValueError(f"not a tiny-model MODEL (config {name}); expected one of {ARCHS}")


# ---------------------------------------------------------------------------------------------------------
# Tiny DiTs of further families (Qwen-Image, HunyuanVideo, LTXV, AuraFlow, Mochi)
# ---------------------------------------------------------------------------------------------------------

# name -> (supported_models config class, tiny unet_config). Every one has TOKENS text tokens of width 32, two heads
# of width 32 and two blocks per stack, so block 1 exists in each stack.
TINY_DIT_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen_image": (
        "QwenImage",
        {
            "image_model": "qwen_image",
            "patch_size": 2,
            "in_channels": 64,  # 16 latent channels x a 2x2 patch
            "out_channels": 16,
            "num_layers": 2,
            "attention_head_dim": 32,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "axes_dims_rope": (8, 12, 12),  # sums to the head width
        },
    ),
    "hunyuan_video": (
        "HunyuanVideo",
        {  # Flux's double/single blocks at the tiny Flux's sizes, with a video patch
            **TINY_UNET_CONFIGS["flux"],
            "image_model": "hunyuan_video",
            "theta": 256,
            "patch_size": [1, 2, 2],
            "byt5": False,
            "meanflow": False,
            "use_cond_type_embedding": False,
            "vision_in_dim": None,
        },
    ),
    "ltxv": (
        "LTXV",
        {
            "image_model": "ltxv",
            "in_channels": 128,  # LTXV's latent format has 128 channels; its patchifier takes one voxel per token
            "cross_attention_dim": 64,  # the caption projection maps text to the model width
            "attention_head_dim": 32,
            "num_attention_heads": 2,
            "caption_channels": 32,
            "num_layers": 2,
        },
    ),
    "aura": (
        "AuraFlow",
        {
            "in_channels": 4,
            "out_channels": 4,
            "patch_size": 2,
            "dim": 64,
            "n_layers": 4,
            "n_double_layers": 2,
            "n_heads": 2,
            "global_conddim": 64,
            "cond_seq_dim": 32,
            "max_seq": 16,  # a 4x4 grid of learned positions: an 8x8 latent in 2x2 patches
        },
    ),
    "mochi": (
        "GenmoMochi",
        {
            "image_model": "mochi_preview",
            "depth": 2,
            "patch_size": 2,
            "num_heads": 2,
            "hidden_size_x": 64,
            "hidden_size_y": 32,  # text stream narrower than the image stream, as in Mochi
            "mlp_ratio_x": 12288 / 64,  # ComfyUI's Mochi block asserts Mochi's image MLP width, 12288, at any size
            "mlp_ratio_y": 2.0,
            "learn_sigma": False,
            "in_channels": 12,
            "qk_norm": True,
            "qkv_bias": False,
            "out_bias": True,
            "attn_drop": 0.0,
            "patch_embed_bias": True,
            "posenc_preserve_area": True,
            "timestep_mlp_bias": True,
            "attend_to_padding": False,
            "timestep_scale": 1000.0,
            "use_t5": True,
            "t5_feat_dim": 32,
            "t5_token_length": TOKENS,
            "rope_theta": 10000.0,
        },
    ),
}
TINY_DITS = tuple(TINY_DIT_CONFIGS)
MOCHI_TEXT_TOKENS = TOKENS - 2  # the Mochi conditioning's attention mask marks its last two tokens as padding

# Parameters that ComfyUI allocates with torch.empty and fills from a checkpoint, drawn small like biases.
_DIT_EMPTY_TENSORS = ("pos_embed",)


def build_tiny_dit(name: str, seed: int = 0):
    """A fresh ModelPatcher over the real BaseModel of `name` (one of TINY_DITS), float32, seeded weights.

    Not cached: a handful of tests use these, each builds its model once and clones it.
    """
    if name not in TINY_DIT_CONFIGS:
        raise ValueError(f"unknown tiny DiT {name!r}; expected one of {TINY_DITS}")
    import comfy.supported_models

    class_name, unet = TINY_DIT_CONFIGS[name]
    config = getattr(comfy.supported_models, class_name)(dict(unet))
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False), torch.no_grad():
        model = config.get_model({})
        fill_seeded_(model.diffusion_model, seed, _DIT_EMPTY_TENSORS)
    return _new_patcher(model)


def tiny_dit_conditioning(name: str, seed: int = 0) -> list:
    """CONDITIONING for a tiny DiT: cross-attn [1, TOKENS, 32], plus what the family's model_base reads
    (HunyuanVideo: a pooled vector; LTXV: a text attention mask; Mochi: one too, which sets its text length)."""
    gen = torch.Generator().manual_seed(int(seed))
    extras: dict[str, Any] = {}
    cross_attn = torch.randn(1, TOKENS, 32, generator=gen)
    if name == "hunyuan_video":
        extras["pooled_output"] = torch.randn(1, POOLED_DIM, generator=gen)
    if name == "ltxv":  # LTXV's forward takes the text mask as a required argument
        extras["attention_mask"] = torch.ones(1, TOKENS, dtype=torch.long)
    if name == "mochi":
        mask = torch.ones(1, TOKENS, dtype=torch.long)
        mask[:, MOCHI_TEXT_TOKENS:] = 0
        extras["attention_mask"] = mask
    return [[cross_attn, extras]]


def tiny_dit_latent_shape(name: str, batch: int = 1) -> tuple:
    channels = {"qwen_image": 16, "hunyuan_video": 16, "ltxv": 128, "aura": 4, "mochi": 12}[name]
    if name == "aura":  # image latent; the others are video latents [B, C, T, H, W]
        return (batch, channels, 8, 8)
    return (batch, channels, 2, 8, 8) if name in ("hunyuan_video", "mochi", "ltxv") else (batch, channels, 1, 8, 8)
