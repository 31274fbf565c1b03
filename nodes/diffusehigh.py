"""TL_DiffuseHigh: training-free progressive high resolution with wavelet structure guidance (Kim et al. 2024).

LATENT in, larger LATENT out; one node runs every stage (decode, bicubic upsample, sharpen, encode, img2img with
the given sampler), so ComfyUI's previews and progress follow one bar over stages x steps.

How it hooks ComfyUI (on a clone per stage; the input MODEL is never changed):
- a post-CFG function replaces the low band of the guided denoised estimate during the first `dwt_steps` steps
  (recognised by sigma: calls at or above the dwt_steps-th step's sigma of this run's `sample_sigmas`). It runs
  after every other post-CFG function (PAG, ...), on what the sampler would step from.
- x0 inside the sampler is in the model's latent space: it goes through `process_latent_out` before the VAE (or
  the latent swap) and `process_latent_in` after.
- SDXL size conditioning: ComfyUI's SDXL (and PixArt / HunyuanDiT) read width/height/target_width/target_height from
  each conditioning entry and, when absent, default width/height to the noise size x 8 (the upscaled size). Like
  the paper, every stage keeps the base size: entries without "width" get the input latent's pixel size for all
  four; entries that carry their own (CLIPTextEncodeSDXL) are left as they are. Other models ignore these keys.
- Video latents [B, C, T, H, W]: with an image VAE the frames are folded into the batch; with a video VAE
  (latent_dim 3) each batch item is decoded to its frames and re-encoded as a video. Sampling always sees the
  whole 5-D latent, so the model's temporal layers work as usual; only the image operations are per frame.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..guidance.wavelets import MODES, WAVELETS
from ..samplers.progressive_highres import (
    GUIDANCE_SPACES,
    StructureGuidance,
    guide_denoised,
    parse_target_sizes,
    plan_stages,
    progressive_upscale,
)
from .vae_codec import VaeCodec

SIZE_KEYS = ("width", "height", "target_width", "target_height")


def latent_multiple(model) -> int:
    """The side multiple a latent must have for the model: its patch size (DiTs), 1 for UNets."""
    patch = getattr(model.get_model_object("diffusion_model"), "patch_size", 1)
    if isinstance(patch, (tuple, list)):
        patch = max(patch[-2:])
    return max(1, int(patch))


def check_inputs(model, vae, samples: torch.Tensor) -> None:
    """Clear errors naming the input before any work is done."""
    if not isinstance(samples, torch.Tensor) or samples.ndim not in (4, 5):
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"latent: expected an image [B, C, H, W] or video [B, C, T, H, W] latent, got {shape}")
    channels = samples.shape[1]
    if getattr(vae, "latent_channels", None) != channels:
        raise ValueError(
            f"latent: it has {channels} channels but the vae encodes {getattr(vae, 'latent_channels', '?')}; "
            "connect the VAE that made this latent"
        )
    model_channels = model.get_model_object("latent_format").latent_channels
    if model_channels != channels:
        raise ValueError(f"latent: it has {channels} channels but the model's latent format takes {model_channels}")
    if getattr(vae, "latent_dim", 2) == 3 and samples.ndim == 4:
        raise ValueError("latent: a 4-D image latent cannot go through this video VAE (it needs [B, C, T, H, W])")


def with_base_size(conditioning: list, width: int, height: int) -> list:
    """Conditioning whose entries without a size carry (width, height) as size and target size (SDXL)."""
    pinned = []
    for entry in conditioning:
        options = dict(entry[1])
        if "width" not in options:
            for key, value in zip(SIZE_KEYS, (width, height, width, height), strict=True):
                options.setdefault(key, value)
        pinned.append([entry[0], options, *entry[2:]])
    return pinned


def with_structure_guidance(model, replace, guided_steps: int):
    """A clone whose post-CFG denoised estimate goes through `replace` (on VAE-space latents) while guided."""
    patched = model.clone()

    def post_cfg(args):
        denoised = args["denoised"]
        sigmas = args["model_options"]["transformer_options"]["sample_sigmas"]
        inner = args["model"]

        def replace_in_model_space(x0: torch.Tensor) -> torch.Tensor:
            swapped = replace(inner.process_latent_out(x0))
            return inner.process_latent_in(swapped).to(device=x0.device, dtype=x0.dtype)

        sigma = float(args["sigma"].flatten()[0])
        return guide_denoised(denoised, sigma, sigmas, guided_steps, replace_in_model_space)

    patched.set_model_sampler_post_cfg_function(post_cfg)
    return patched


class StageProgress:
    """One ComfyUI progress bar over stages x steps, with latent previews; every step honours Cancel."""

    def __init__(self, model, stages: int, steps: int):
        import latent_preview  # ComfyUI's top-level module: importable once the host runs

        self.steps, self.total = steps, stages * steps
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def callback_for(self, stage: int):
        def callback(step, x0, x, total_steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0) if self.previewer else None
            self.bar.update_absolute(stage * self.steps + min(step + 1, self.steps), self.total, preview)

        return callback


def diffuse_high(
    model, positive, negative, vae, latent: dict, seed: int, steps: int, cfg: float, sampler_name: str,
    scheduler: str, scale_factor: float, stages: int, denoise: float, dwt_steps: int, wavelet: str, sharpen: float,
    guidance_space: str = "image", target_sizes: str = "", wavelet_mode: str = "symmetric",
    sharpen_sigma: float = 1.0, vae_tile_size: int = 0,
) -> dict:  # fmt: skip
    samples = latent["samples"]
    check_inputs(model, vae, samples)
    if wavelet not in WAVELETS:
        raise ValueError(f"wavelet: {wavelet!r} is not one of {WAVELETS}")
    if wavelet_mode not in MODES:
        raise ValueError(f"wavelet_mode: {wavelet_mode!r} is not one of {MODES}")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise: {denoise} must lie in [0, 1]")
    if steps < 1:
        raise ValueError(f"steps: {steps} must be at least 1")
    guidance = StructureGuidance(dwt_steps, wavelet, wavelet_mode, sharpen, sharpen_sigma, guidance_space)
    compression = int(vae.spacial_compression_encode())
    plan = plan_stages(
        tuple(samples.shape[-2:]), scale_factor, stages, latent_multiple(model), compression,
        parse_target_sizes(target_sizes),
    )  # fmt: skip
    for warning in plan.warnings:
        logging.warning("TL_DiffuseHigh: %s", warning)
    base_width, base_height = samples.shape[-1] * compression, samples.shape[-2] * compression
    positive = with_base_size(positive, base_width, base_height)
    negative = with_base_size(negative, base_width, base_height)
    codec = VaeCodec.for_latent(vae, samples, vae_tile_size)
    progress = StageProgress(model, len(plan.sizes), steps)

    def sample_stage(stage: int, start: torch.Tensor, replace) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        start = comfy.sample.fix_empty_latent_channels(model, start)
        noise = comfy.sample.prepare_noise(start, seed, latent.get("batch_index"))
        stage_model = with_structure_guidance(model, replace, dwt_steps) if dwt_steps > 0 else model
        out = comfy.sample.sample(
            stage_model, noise, steps, cfg, sampler_name, scheduler, positive, negative, start, denoise=denoise,
            noise_mask=latent.get("noise_mask"), callback=progress.callback_for(stage),
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        )  # fmt: skip
        progress.bar.update_absolute((stage + 1) * steps, progress.total)
        return out

    result = progressive_upscale(samples, plan.sizes, compression, guidance, codec.decode, codec.encode, sample_stage)
    out = latent.copy()
    out["samples"] = result
    return out


_SPACE_TIP = (
    "image: decode x0, swap its wavelet low band for the reference's and re-encode, as the paper (one VAE decode + "
    "encode per guided step). latent: swap the low band of the latent itself, no VAE call per step (cheaper, "
    "coarser: the latent's low band is a quarter of its size)."
)


class DiffuseHigh(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_DiffuseHigh",
            display_name="DiffuseHigh Upscale (Trajectory Lab)",
            category="trajectory_lab/upscaling",
            description="DiffuseHigh (Kim et al. 2024): training-free high resolution. Per stage: upscale the image "
            "bicubically, sharpen it, re-noise it to `denoise` and denoise with the model, keeping its structure by "
            "replacing the wavelet low band of the predicted image for the first `dwt_steps` steps. LATENT in, "
            "larger LATENT out; video latents are handled per frame.",
            inputs=[
                io.Model.Input("model", tooltip="The model that made the image (or one sharing its latent space)."),
                io.Conditioning.Input("positive", tooltip="Positive prompt."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Vae.Input("vae", tooltip="Decodes and encodes every stage (and every guided step in image space)."),
                io.Latent.Input("latent", tooltip="The base-resolution result to upscale."),
                io.Float.Input(
                    "scale_factor",
                    default=2.0,
                    min=1.0,
                    max=8.0,
                    step=0.05,
                    tooltip="Upscale per stage (sides; rounded to what the model accepts).",
                ),
                io.Int.Input("stages", default=1, min=1, max=8, tooltip="Number of upscaling stages."),
                io.Float.Input(
                    "denoise",
                    default=0.3,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Noise level each stage restarts from (paper: the last 15 of 50 steps = 0.3).",
                ),
                io.Int.Input(
                    "dwt_steps",
                    default=5,
                    min=0,
                    max=1000,
                    tooltip="Steps per stage whose predicted image gets the reference's low band. 0 = off.",
                ),
                io.Combo.Input(
                    "wavelet", options=list(WAVELETS), default="db4", tooltip="db4: the paper; haar: blockier."
                ),
                io.Float.Input(
                    "sharpen",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.05,
                    tooltip="Unsharp-mask amount a: (1 + a) G - a blur(G) on the upsampled image.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Noise seed, the same for every stage (like a chain of KSamplers).",
                ),
                io.Int.Input(
                    "steps",
                    default=15,
                    min=1,
                    max=10000,
                    tooltip="Steps per stage (the steps actually run at this denoise).",
                ),
                io.Float.Input(
                    "cfg", default=10.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="CFG scale (the paper's 10)."
                ),
                io.Combo.Input(
                    "sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler", tooltip="Sampler per stage."
                ),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.SCHEDULER_NAMES,
                    default="normal",
                    tooltip="Noise schedule per stage.",
                ),
                io.Combo.Input(
                    "guidance_space", options=list(GUIDANCE_SPACES), default="image", optional=True, tooltip=_SPACE_TIP
                ),
                io.String.Input(
                    "target_sizes",
                    default="",
                    optional=True,
                    tooltip="Pixel sizes per stage, e.g. '1536x1536, 2048x2048'; overrides scale_factor "
                    "and stages. Rounded to what the model accepts.",
                ),
                io.Combo.Input(
                    "wavelet_mode",
                    options=list(MODES),
                    default="symmetric",
                    optional=True,
                    tooltip="symmetric: the paper's boundary handling; periodization: the swapped low "
                    "band is kept exactly up to the borders.",
                ),
                io.Float.Input(
                    "sharpen_sigma",
                    default=1.0,
                    min=0.1,
                    max=5.0,
                    step=0.05,
                    optional=True,
                    tooltip="Sigma of the 3x3 Gaussian blur in the sharpening (the paper draws it from U(0.1, 2)).",
                ),
                io.Int.Input(
                    "vae_tile_size",
                    default=0,
                    min=0,
                    max=4096,
                    step=64,
                    optional=True,
                    tooltip="Pixel tile size for tiled VAE decode/encode at large sizes; 0 = untiled.",
                ),
            ],  # fmt: skip
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(
        cls, model, positive, negative, vae, latent, scale_factor, stages, denoise, dwt_steps, wavelet, sharpen, seed,
        steps, cfg, sampler_name, scheduler, guidance_space="image", target_sizes="", wavelet_mode="symmetric",
        sharpen_sigma=1.0, vae_tile_size=0,
    ) -> io.NodeOutput:  # fmt: skip
        with torch.inference_mode():  # as ComfyUI runs nodes; direct calls (tests, benchmarks) get the same
            upscaled = diffuse_high(
                model, positive, negative, vae, latent, seed, steps, cfg, sampler_name, scheduler, scale_factor,
                stages, denoise, dwt_steps, wavelet, sharpen, guidance_space, target_sizes, wavelet_mode,
                sharpen_sigma, vae_tile_size,
            )  # fmt: skip
        return io.NodeOutput(upscaled)
