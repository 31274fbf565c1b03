"""c-VSG feature extractors behind the TL_FEATURES type, and their nodes (pooled latents, pixels, CLIP vision)."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import comfy.clip_model
import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import optimized_attention_for_device
from comfy_api.latest import io

Features = io.Custom("TL_FEATURES")

# ---------------------------------------------------------------------------------------------------------
# Feature extractors (the TL_FEATURES type)
# ---------------------------------------------------------------------------------------------------------


class FeatureExtractor:
    """TL_FEATURES: maps a batch to feature vectors [B, D], differentiably.

    `space` says what `embed` takes: "latent" (a latent in the VAE's space, [B, C, *spatial]) or "image"
    (ComfyUI IMAGE [B, H, W, C] in 0..1). `embed_images` embeds real images (exemplars, TL_VendiScore).
    """

    space = "image"
    name = "features"

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_images(self, images: torch.Tensor, vae=None, pixel_size: tuple[int, ...] | None = None) -> torch.Tensor:
        return self.embed(images)

    def bank_key(self, latent_format: str) -> str:
        """Name of this feature space in a memory bank (latent features also depend on the latent space)."""
        return f"{self.name}|{latent_format}" if self.space == "latent" else self.name

    def modules(self) -> list[torch.nn.Module]:
        """Modules whose weights the differentiable `embed` uses (made autograd-ready during guidance)."""
        return []

    def patchers(self) -> list:
        """ModelPatchers to load alongside the diffusion model while sampling."""
        return []


class PooledLatentExtractor(FeatureExtractor):
    """Average-pooled latents on a grid of at most `grid` cells per axis, flattened: no extra model."""

    space = "latent"

    def __init__(self, grid: int = 4, vae=None) -> None:
        if grid < 1:
            raise ValueError(f"grid: must be at least 1, got {grid}")
        self.grid, self.vae = grid, vae
        self.name = f"latent_pool{grid}"

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        cells = [min(side, self.grid) for side in batch.shape[2:]]
        if len(cells) == 1:  # audio-like [B, C, L]
            pooled = F.adaptive_avg_pool1d(batch, cells[0])
        elif len(cells) == 2:
            pooled = F.adaptive_avg_pool2d(batch, (cells[0], cells[1]))
        elif len(cells) == 3:  # video [B, C, T, H, W]
            pooled = F.adaptive_avg_pool3d(batch, (cells[0], cells[1], cells[2]))
        else:
            raise ValueError(f"latent features: unsupported latent shape {tuple(batch.shape)}")
        return pooled.flatten(1)

    def embed_images(self, images, vae=None, pixel_size=None):
        vae = vae if vae is not None else self.vae
        if vae is None:
            raise ValueError(
                "features: latent features embed images by encoding them: connect a vae (to TL_LatentFeatures, "
                "or to the guider for exemplars)"
            )
        pixels = images[..., :3]
        if pixel_size is not None:
            pixels = resize_images(pixels, pixel_size)
        else:
            pixels = vae.vae_encode_crop_pixels(pixels)
        return self.embed(vae.encode(pixels).float())


class PixelExtractor(FeatureExtractor):
    """Images area-resized to size x size, centred at 0.5 and flattened: a cheap, model-free image feature."""

    def __init__(self, size: int = 16) -> None:
        if size < 1:
            raise ValueError(f"size: must be at least 1, got {size}")
        self.size = size
        self.name = f"pixels{size}"

    def embed(self, batch):
        pixels = F.adaptive_avg_pool2d(batch[..., :3].float().movedim(-1, 1), (self.size, self.size))
        return (pixels - 0.5).flatten(1)


class CLIPVisionExtractor(FeatureExtractor):
    """A ComfyUI CLIP_VISION model's image embedding, with resize / crop / normalise done in torch so that
    gradients reach the pixels (ComfyUI's clip_preprocess rounds to 8 bit)."""

    def __init__(self, clip_vision, crop: bool = True) -> None:
        self.clip_vision, self.crop = clip_vision, crop
        model = clip_vision.model
        first = next(model.parameters()).detach().flatten()[:256].float().cpu()
        digest = hashlib.sha1(first.numpy().tobytes()).hexdigest()[:12]  # tells models of one config apart
        self.name = f"clip_vision:{type(model).__name__}:{clip_vision.image_size}:{digest}:{'crop' if crop else 'fit'}"

    def embed(self, batch):
        cv = self.clip_vision
        pixels = clip_pixels(batch, cv.image_size, cv.image_mean, cv.image_std, self.crop)
        pixels = pixels.to(cv.load_device).float()
        if isinstance(cv.model, comfy.clip_model.CLIPVisionModelProjection):
            return clip_vision_embedding(cv.model, pixels).float()
        return cv.model(pixel_values=pixels, intermediate_output=None)[2].float()  # DINOv2: adds out of place

    def modules(self):
        return [self.clip_vision.model]

    def patchers(self):
        return [self.clip_vision.patcher]


def resize_images(images: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """IMAGE [B, H, W, C] resized to size (h, w), antialiased (differentiable)."""
    if tuple(images.shape[1:3]) == tuple(size):
        return images
    x = images.movedim(-1, 1)
    x = F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return x.movedim(1, -1)


def clip_pixels(images: torch.Tensor, size: int, mean, std, crop: bool = True) -> torch.Tensor:
    """CLIP pixel values [B, 3, size, size] from IMAGE, like comfy.clip_vision.clip_preprocess without its
    8-bit rounding and clamp (both stop gradients)."""
    x = images[..., :3].movedim(-1, 1).float()
    h, w = x.shape[-2:]
    if crop:
        s = size / min(h, w)
        target = (max(size, round(h * s)), max(size, round(w * s)))
    else:
        target = (size, size)
    if (h, w) != target:
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
    top, left = (target[0] - size) // 2, (target[1] - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def clip_vision_embedding(model, pixels: torch.Tensor) -> torch.Tensor:
    """The projected image embedding of a comfy CLIPVisionModelProjection, computed over its own submodules with
    out-of-place residual adds: its CLIPLayer adds in place, which autograd rejects."""
    vision = model.vision_model
    x = vision.pre_layrnorm(vision.embeddings(pixels))
    attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
    for layer in vision.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    if vision.output_layernorm:  # SigLIP: no class token; the mean of the normalised tokens
        pooled = vision.post_layernorm(x).mean(1)
    else:
        pooled = vision.post_layernorm(x[:, 0])
    return model.visual_projection(pooled)


@contextlib.contextmanager
def autograd_ready_weights(modules: list[torch.nn.Module]):
    """Temporarily replace parameters and buffers created in inference mode (any model loaded by a node) with
    normal clones: autograd refuses to save inference tensors for backward. Restored afterwards."""
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        with torch.inference_mode(False):
            for module in modules:
                for sub in module.modules():
                    stores: list[dict[str, Any]] = [sub._parameters, sub._buffers]
                    for store in stores:
                        for name, tensor in list(store.items()):
                            if tensor is not None and tensor.is_inference():
                                clone = tensor.clone()
                                if isinstance(tensor, torch.nn.Parameter):
                                    clone = torch.nn.Parameter(clone, requires_grad=False)
                                swapped.append((store, name, tensor))
                                store[name] = clone
        yield
    finally:
        for store, name, tensor in reversed(swapped):
            store[name] = tensor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode that keeps the autograd graph (VAE.decode writes into a preallocated buffer): IMAGE
    [B, H, W, 3], or [B, T, H, W, 3] for video latents."""
    images = vae.first_stage_model.decode(latents.to(vae.device, vae.vae_dtype)).float()
    return vae.process_output(images).movedim(1, -1)


def embed_latents(extractor: FeatureExtractor, latents: torch.Tensor, vae) -> torch.Tensor:
    """Features of latents in the VAE's space: directly, or through a decode for image features."""
    if extractor.space == "latent":
        return extractor.embed(latents).float()
    if vae is None:
        raise ValueError(f"vae: {extractor.name} features work on images; connect the VAE of this model")
    images = decode_latents(vae, latents)
    if images.ndim == 5:  # video: the mean of per-frame features
        b, t = images.shape[:2]
        return extractor.embed(images.flatten(0, 1)).float().reshape(b, t, -1).mean(1)
    return extractor.embed(images).float()


class LatentFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_LatentFeatures",
            display_name="Latent Features (Trajectory Lab)",
            category="trajectory_lab/features",
            description="TL_FEATURES from the latent itself, average-pooled to a grid x grid layout: no extra model, "
            "no decode. Connect a VAE to embed images (exemplars, TL_VendiScore) through its encoder.",
            inputs=[
                io.Int.Input("grid", default=4, min=1, max=32, tooltip="Cells per axis (4: 16 cells x channels)."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes images into the latent space."),
            ],
            outputs=[Features.Output(display_name="features")],
        )

    @classmethod
    def execute(cls, grid, vae=None) -> io.NodeOutput:
        return io.NodeOutput(PooledLatentExtractor(grid, vae))


class PixelFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_PixelFeatures",
            display_name="Pixel Features (Trajectory Lab)",
            category="trajectory_lab/features",
            description="TL_FEATURES from images shrunk to size x size pixels: cheap and model-free (colour and "
            "layout, not semantics). With TL_VendiGuider it needs the vae input.",
            inputs=[io.Int.Input("size", default=16, min=1, max=256, tooltip="Thumbnail side in pixels.")],
            outputs=[Features.Output(display_name="features")],
        )

    @classmethod
    def execute(cls, size) -> io.NodeOutput:
        return io.NodeOutput(PixelExtractor(size))


class CLIPVisionFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_CLIPVisionFeatures",
            display_name="CLIP Vision Features (Trajectory Lab)",
            category="trajectory_lab/features",
            description="TL_FEATURES from a CLIP_VISION model's image embedding (the paper uses CLIP ViT-B/32). "
            "Preprocessing runs in torch without 8-bit rounding, so guidance gradients reach the image. With "
            "TL_VendiGuider it needs the vae input.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="A CLIP vision model (CLIPVisionLoader)."),
                io.Boolean.Input("crop", default=True, tooltip="Centre-crop to a square (else stretch)."),
            ],
            outputs=[Features.Output(display_name="features")],
        )

    @classmethod
    def execute(cls, clip_vision, crop) -> io.NodeOutput:
        return io.NodeOutput(CLIPVisionExtractor(clip_vision, crop))
