"""LATENT samples <-> images through a ComfyUI VAE, for nodes that work in pixel space mid-sampling
(DiffuseHigh's guidance, multi-text video's last-frame continuation). Video latents with an image VAE are
handled frame by frame; tiling is optional."""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import torch

TILE_OVERLAP_PIXELS = 64


@dataclass
class VaeCodec:
    """LATENT samples <-> images [N, 3, H, W] with video frames folded into N, on the caller's device."""

    vae: object
    batch: int
    frames: int | None  # latent frames T of a 5-D latent with an image VAE; None otherwise
    tile_pixels: int = 0  # 0: untiled

    @classmethod
    def for_latent(cls, vae, samples: torch.Tensor, tile_pixels: int) -> VaeCodec:
        image_vae_on_video = samples.ndim == 5 and getattr(vae, "latent_dim", 2) == 2
        return cls(vae, samples.shape[0], samples.shape[2] if image_vae_on_video else None, tile_pixels)

    def _tiles(self, compression: int = 1) -> dict:
        tile = self.tile_pixels
        overlap = min(TILE_OVERLAP_PIXELS, tile // 4)
        return {"tile_x": tile // compression, "tile_y": tile // compression, "overlap": overlap // compression}

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        vae = self.vae
        if self.frames is not None:  # [B, C, T, H, W] -> [B * T, C, H, W]
            b, c, t, h, w = latent.shape
            latent = latent.movedim(2, 1).reshape(b * t, c, h, w)
        if self.tile_pixels:
            images = vae.decode_tiled(latent, **self._tiles(vae.spacial_compression_decode()))
        else:
            images = vae.decode(latent)
        images = images.reshape(-1, *images.shape[-3:])  # a video VAE's [B, F, H, W, 3]: frames into the batch
        return images.movedim(-1, 1).to(latent.device)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.tile_pixels:
            return self.vae.encode_tiled(pixels, **self._tiles())
        return self.vae.encode(pixels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        comfy.model_management.throw_exception_if_processing_interrupted()
        pixels = images.movedim(1, -1)
        if getattr(self.vae, "latent_dim", 2) == 3:  # each batch item's frames are one video
            latent = torch.cat([self._encode_pixels(video) for video in pixels.chunk(self.batch)])
        else:
            latent = self._encode_pixels(pixels)
        if self.frames is not None:  # [B * T, C, H, W] -> [B, C, T, H, W]
            latent = latent.reshape(self.batch, self.frames, *latent.shape[1:]).movedim(1, 2)
        return latent.to(images.device)
