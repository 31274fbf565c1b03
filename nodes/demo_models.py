"""The demo models: small networks built from ComfyUI's own architecture classes, trained on the demo world
(demo/), so every patch point the techniques use is the real one. Nodes: TL_LoadDemoModel, TL_DemoTextEncode.

Latents are the images themselves, folded 4x4 into channels (32x32 RGB -> 48 x 8 x 8): an exact, invertible
"VAE" with no weights, so small UNets and DiTs train on 2 CPU cores in minutes and decoding is lossless. It is a
real comfy.sd.VAE (VAEEncode, VAEDecode, tiling all work). Weights are safetensors under demo/weights/, made by
scripts/train_demo_models.py; a model whose file is missing fails with the command that makes it.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import torch
from comfy_api.latest import io

from ..demo import text_encoder

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "demo" / "weights"
TRAIN_COMMAND = "python scripts/train_demo_models.py"


FOLD = 4  # pixels per latent cell along each side
LATENT_CHANNELS = 3 * FOLD * FOLD


class FoldedPixels(torch.nn.Module):
    """The demo VAE's network: image [B, 3, H, W] in [-1, 1] <-> latent [B, 48, H/4, W/4] (pixel (un)shuffle),
    frame by frame for video tensors [B, C, T, H, W]."""

    def __init__(self) -> None:
        super().__init__()
        self.fold_marker = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # ModelPatcher wants a weight

    @staticmethod
    def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return fn(x)
        b, _, t = x.shape[:3]
        frames = fn(x.movedim(2, 1).flatten(0, 1))
        return frames.unflatten(0, (b, t)).movedim(1, 2)

    def encode(self, pixels: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
        return self._per_frame(lambda x: torch.nn.functional.pixel_unshuffle(x, FOLD), pixels)

    def decode(self, latent: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
        return self._per_frame(lambda x: torch.nn.functional.pixel_shuffle(x, FOLD), latent)


class _FoldedFormat(comfy.latent_formats.LatentFormat):
    latent_channels = LATENT_CHANNELS

    def __init__(self) -> None:
        # previews: each latent channel is one pixel of one colour plane (pixel_unshuffle's order: c * 16 + k)
        self.latent_rgb_factors = [[1.0 / FOLD**2 if c // FOLD**2 == rgb else 0.0 for rgb in range(3)]
                                   for c in range(LATENT_CHANNELS)]  # fmt: skip

    def process_in(self, latent):
        return latent

    def process_out(self, latent):
        return latent


class DemoImageLatent(_FoldedFormat):
    latent_dimensions = 2


class DemoVideoLatent(_FoldedFormat):
    latent_dimensions = 3


def _demo_config(base: type, latent_format: type, shift: float | None = None, v_prediction: bool = False) -> type:
    """A supported_models config class with the demo latent format (and flow shift, for flow models)."""
    # inpaint_model: SD configs call any UNet with more than 4 input channels an inpainting model (and concatenate
    # a mask and an image to its input); the demo latents just have 48 channels.
    attrs: dict[str, Any] = {"latent_format": latent_format, "unet_extra_config": {}}
    attrs["inpaint_model"] = lambda self: False
    if shift is not None:
        attrs["sampling_settings"] = {"shift": shift}
    if v_prediction:
        attrs["model_type"] = lambda self, state_dict, prefix="": comfy.model_base.ModelType.V_PREDICTION
    return type(f"Demo{base.__name__}", (base,), attrs)


# The UNets predict v (as SD 2.x 768-v does) on SD1.5's discrete schedule. Measured with EPS: every latent cell holds
# 48 values of noise that the network must reproduce, and after 1000 steps the eps error left at sigma 3 gave a
# denoised estimate worse than predicting zero (mse 0.65 vs 0.28), so samples stayed noise. v keeps the high-noise
# prediction near -x0, bounded.
_CONFIG_CLASSES = {
    "sd15": _demo_config(comfy.supported_models.SD15, DemoImageLatent, v_prediction=True),
    "sd3": _demo_config(comfy.supported_models.SD3, DemoImageLatent, shift=1.0),
    "wan21": _demo_config(comfy.supported_models.WAN21_T2V, DemoVideoLatent, shift=1.0),
}

_UNET_BASE: dict[str, Any] = {
    "use_checkpoint": False,
    "image_size": 8,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "context_dim": text_encoder.EMBED_DIM,
    "use_linear_in_transformer": True,
    "num_head_channels": -1,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


@dataclass(frozen=True)
class DemoModelSpec:
    family: str  # key of _CONFIG_CLASSES
    network: dict[str, Any]  # the unet_config ComfyUI builds the network from
    description: str
    shape: tuple[int, ...]  # one sample's latent shape (channels first)
    extra: dict[str, Any] = field(default_factory=dict)


_IMAGE_LATENT = (LATENT_CHANNELS, 8, 8)

DEMO_MODELS: dict[str, DemoModelSpec] = {
    # Both UNets keep 64 channels at full latent resolution: the target carries all 48 noise channels, and a
    # 32-channel first convolution (a rank-32 bottleneck) left ~30% of the noise unpredictable (samples stayed noise).
    "shapes_unet_small": DemoModelSpec(
        "sd15",
        {**_UNET_BASE, "model_channels": 64, "num_res_blocks": [1, 1], "channel_mult": [1, 1],
         "transformer_depth": [0, 1], "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 1, 1],
         "num_heads": 2},
        "SD1.5-style v-prediction UNet, small: 1.5M parameters (the T-Stitch small model; same latent space and "
        "schedule as the large one, about 3x cheaper per step)",
        _IMAGE_LATENT,
    ),
    "shapes_unet_large": DemoModelSpec(
        "sd15",
        {**_UNET_BASE, "model_channels": 64, "num_res_blocks": [2, 2], "channel_mult": [1, 1],
         "transformer_depth": [1, 1, 1, 1], "transformer_depth_middle": 1,
         "transformer_depth_output": [1, 1, 1, 1, 1, 1], "num_heads": 4},
        "SD1.5-style v-prediction UNet, large: 2.6M parameters, twice the depth, attention at every block",
        _IMAGE_LATENT,
    ),
    "shapes_dit_flow": DemoModelSpec(
        "sd3",
        {"in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "patch_size": 2, "depth": 3,
         "input_size": None, "adm_in_channels": text_encoder.EMBED_DIM,
         "context_embedder_config": {"target": "torch.nn.Linear",
                                     "params": {"in_features": text_encoder.EMBED_DIM, "out_features": 192}},
         "pos_embed_max_size": 8, "num_patches": 64, "pos_embed_scaling_factor": None,
         "x_block_self_attn_layers": []},
        "SD3-style MMDiT rectified flow (FlowTurbo, DiT PAG)",
        _IMAGE_LATENT,
    ),
    # 16 tokens of 8x8 pixels. The width (64 x depth) must carry a token's 192 latent values, noise included, or
    # the flow cannot return the noise it is given: 192 wide, 2 joint blocks, MLP ratio 2, 2.0M parameters
    "fashion_dit_flow": DemoModelSpec(
        "sd3",
        {"in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS, "patch_size": 2, "depth": 3,
         "num_blocks": 2, "mlp_ratio": 2.0, "input_size": None, "adm_in_channels": text_encoder.EMBED_DIM,
         "context_embedder_config": {"target": "torch.nn.Linear",
                                     "params": {"in_features": text_encoder.EMBED_DIM, "out_features": 192}},
         "pos_embed_max_size": 8, "num_patches": 64, "pos_embed_scaling_factor": None,
         "x_block_self_attn_layers": []},
        "SD3-style MMDiT rectified flow on real images: Fashion-MNIST, class-conditional (prompt a class name)",
        _IMAGE_LATENT,
    ),
    # Patch 1x1x1: 16 tokens per frame. With Wan's usual 1x2x2 a token would output 4 x 48 = 192 values through a
    # width of 128, too narrow to give the noise back (measured: samples stayed noise).
    "shapes_video_wan": DemoModelSpec(
        "wan21",
        {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 1, 1), "in_dim": LATENT_CHANNELS,
         "out_dim": LATENT_CHANNELS, "dim": 128, "ffn_dim": 256, "freq_dim": 256, "text_dim": text_encoder.EMBED_DIM,
         "num_heads": 2, "num_layers": 3, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True,
         "eps": 1e-6},
        "Wan 2.1-style T2V DiT rectified flow on 4-frame 16x16 videos (multi-text video; TL_DemoPromptSequence)",
        (LATENT_CHANNELS, 4, 4, 4),  # [C, T, H, W]: the fold has no temporal compression, any T >= 1 works
    ),
}  # fmt: skip


def demo_model_names() -> list[str]:
    return list(DEMO_MODELS)


def _spec(name: str) -> DemoModelSpec:
    if name not in DEMO_MODELS:
        raise ValueError(f"model_name: unknown demo model {name!r}; expected one of {demo_model_names()}")
    return DEMO_MODELS[name]


def model_config(name: str):
    network = copy.deepcopy(_spec(name).network)  # ComfyUI pops from the depth lists while building
    config = _CONFIG_CLASSES[_spec(name).family](copy.deepcopy(network))
    config.unet_config.update(network)
    config.set_inference_dtype(torch.float32, None)
    return config


@torch.no_grad()
def init_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """ComfyUI's ops leave parameters uninitialised: fan-in scaled normals, unit norm gains, zero biases."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
        elif name.endswith(("weight", "scale")):
            p.fill_(1.0)
        else:
            p.zero_()
    for name, b in module.named_buffers():
        if name.endswith("pos_embed"):
            b.copy_(0.02 * torch.randn(b.shape, generator=gen))
    return module


@torch.no_grad()
def mmdit_init_(net: torch.nn.Module) -> torch.nn.Module:
    """What the generic initialisation leaves out for an MMDiT, measured to matter in short CPU runs: sin-cos positions
    in pos_embed (a buffer: never trained, and near zero the tokens cannot tell where they are) and zero adaLN
    modulations and output layer (DiT's adaLN-Zero: every block starts as the identity, the prediction at zero)."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch

    size = net.pos_embed_max_size
    net.pos_embed.copy_(get_2d_sincos_pos_embed_torch(net.hidden_size, size, size).reshape(net.pos_embed.shape))
    for name, module in net.named_modules():
        if name.endswith("adaLN_modulation"):
            module[-1].weight.zero_()
            module[-1].bias.zero_()
    net.final_layer.linear.weight.zero_()
    net.final_layer.linear.bias.zero_()
    return net


def build_network(name: str, state_dict: dict[str, torch.Tensor] | None = None, seed: int = 0):
    """The BaseModel for a demo model: trained weights if given, else a seeded initialisation (for training)."""
    with torch.inference_mode(False):
        model = model_config(name).get_model({})
        if state_dict is None:
            init_weights_(model.diffusion_model, seed)
            if _spec(name).family == "sd3":
                mmdit_init_(model.diffusion_model)
        else:
            missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
            if missing or unexpected:
                raise ValueError(f"demo weights for {name!r} do not fit: missing {missing[:4]}, extra {unexpected[:4]}")
    return model.eval()


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def read_weights(name: str) -> dict[str, torch.Tensor]:
    import safetensors.torch

    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"model_name: no weights for demo model {name!r} at {path}; make them with "
                                f"`{TRAIN_COMMAND} {name}`")  # fmt: skip
    return {k: v.float() for k, v in safetensors.torch.load_file(str(path)).items()}


@functools.cache
def _loaded_patcher(name: str):
    model = build_network(name, read_weights(name))
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


@functools.cache
def demo_vae():
    """A real comfy.sd.VAE around FoldedPixels: ComfyUI's pixel-space VAE (its [0,1] <-> [-1,1] mapping and
    memory handling) with the network swapped for the 4x4 fold."""
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    vae.first_stage_model = FoldedPixels().eval().to(vae.vae_dtype)
    vae.downscale_ratio = vae.upscale_ratio = FOLD
    vae.latent_channels = LATENT_CHANNELS
    vae.patcher = comfy.model_patcher.ModelPatcher(
        vae.first_stage_model, load_device=vae.device, offload_device=comfy.model_management.vae_offload_device()
    )
    return vae


def _same_frame_count(frames: int) -> int:
    return frames


@functools.cache
def demo_video_vae():
    """demo_vae as a video VAE (latent_dim 3): VAEEncode turns a batch of frames into one video latent
    [1, 48, T, H/4, W/4] and VAEDecode gives the frames back, as with Wan's VAE but with no temporal compression."""
    vae = copy.copy(demo_vae())  # same network and patcher; only the shape bookkeeping differs
    vae.latent_dim = 3
    vae.downscale_ratio = (_same_frame_count, FOLD, FOLD)
    vae.upscale_ratio = (_same_frame_count, FOLD, FOLD)
    vae.downscale_index_formula = vae.upscale_index_formula = (1, FOLD, FOLD)
    return vae


def load_demo_model(name: str):
    """(MODEL, VAE) for a demo model. Loaded once per process; each call hands out a fresh clone."""
    video = _CONFIG_CLASSES[_spec(name).family].latent_format.latent_dimensions == 3
    return _loaded_patcher(name).clone(), demo_video_vae() if video else demo_vae()


def demo_conditioning(text: str) -> list:
    tokens, pooled = text_encoder.encode(text)
    return [[tokens, {"pooled_output": pooled}]]


class LoadDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_LoadDemoModel",
            display_name="Load Demo Model (Trajectory Lab)",
            category="trajectory_lab/demo",
            description="One of the pack's own small models trained on the demo shapes world (32x32 RGB), "
            "with its lossless 4x4-fold VAE. Encode prompts with TL_DemoTextEncode.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=demo_model_names(),
                    tooltip="; ".join(f"{n}: {s.description}" for n, s in DEMO_MODELS.items()),
                )
            ],
            outputs=[io.Model.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, model_name) -> io.NodeOutput:
        return io.NodeOutput(*load_demo_model(model_name))


class DemoTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_DemoTextEncode",
            display_name="Demo Text Encode (Trajectory Lab)",
            category="trajectory_lab/demo",
            description="Conditioning for the demo models from a fixed encoding of the demo vocabulary "
            "(sizes, colours, shapes, positions, motions, Fashion-MNIST classes). Empty text = unconditional.",
            inputs=[
                io.String.Input(
                    "text",
                    multiline=True,
                    default="large red circle left",
                    tooltip="Words from the demo vocabulary: " + ", ".join(text_encoder.VOCABULARY),
                )
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text) -> io.NodeOutput:
        return io.NodeOutput(demo_conditioning(text))


class EmptyDemoLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_EmptyDemoLatent",
            display_name="Empty Demo Latent (Trajectory Lab)",
            category="trajectory_lab/demo",
            description="A zero latent for the demo models (48 channels at 1/4 of the image size: mid-grey). "
            "EmptyLatentImage makes SD's 4-channel /8 latents, which the demo models cannot take.",
            inputs=[
                io.Int.Input("width", default=32, min=FOLD, max=1024, step=FOLD, tooltip="Image width in pixels."),
                io.Int.Input("height", default=32, min=FOLD, max=1024, step=FOLD, tooltip="Image height in pixels."),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Images (or videos) in the batch."),
                io.Int.Input(
                    "frames",
                    default=0,
                    min=0,
                    max=256,
                    optional=True,
                    tooltip="0: an image latent [B, 48, h, w]; n >= 1: a video latent of n frames [B, 48, n, h, w] "
                    "(the demo video model, 16x16).",
                ),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, width, height, batch_size, frames=0) -> io.NodeOutput:
        for name, value in (("width", width), ("height", height)):
            if value % FOLD:
                raise ValueError(f"{name}: must be a multiple of {FOLD}, got {value}")
        time_axis = (frames,) if frames > 0 else ()
        samples = torch.zeros(batch_size, LATENT_CHANNELS, *time_axis, height // FOLD, width // FOLD)
        return io.NodeOutput({"samples": samples})


NODES: list[type[io.ComfyNode]] = [LoadDemoModel, DemoTextEncode, EmptyDemoLatent]
