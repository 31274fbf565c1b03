"""Contextualized Vendi Score Guidance (c-VSG): TL_VendiGuider, TL_VendiScore, feature extractors, memory banks.

How it works in ComfyUI:
- TL_VendiGuider is a CFGGuider (for SamplerCustomAdvanced). On every `every_n_steps`-th step of the schedule
  (inside the start/end window) it takes the guided prediction D, embeds the paper's blend of D and x_t, and
  ascends R = VS(M u f) - beta VS(E u f) (guidance/vendi.py). The gradient is taken with the step's eps held
  fixed (d x0_hat / d x_t = identity), the paper's own assumption for its update, so no backward pass through
  the diffusion model is needed; it is rescaled to scale * ||x_t|| and returned as D + c g, with c chosen so that
  an Euler / DDIM step lands exactly on the paper's "x_t += g, eps kept" (`kick_factor`). Multi-evaluation
  samplers (heun, dpmpp_2m, ...) get the same shifted prediction: an approximation of the paper's update.
- Gradients: ComfyUI executes under torch.inference_mode(); guidance leaves it locally, works on clones, and
  swaps weights created in inference mode (a VAE or CLIP vision model loaded by a node) for normal clones for
  the duration of the differentiable call (`autograd_ready_weights`).
- Features (TL_FEATURES): pooled latents (built in, no extra model), small pixel thumbnails, or a CLIP_VISION
  model with differentiable preprocessing in torch (ComfyUI's own rounds to 8 bit, which stops gradients). Image
  features need the `vae` input: the blend is decoded with gradients, which costs about a VAE decode's
  activations in memory per guided step.
- Memory bank: the final features of every generation are appended to <user dir>/trajectory_lab/vendi_banks/
  <name>.safetensors after it finishes (atomic writes; one tensor per feature space). Batch rows are generated one
  after another by default (`batch_mode` sequential), each against the bank plus the rows finished before it, as
  in the paper; `joint` samples the batch at once, each row against the bank and the other rows' current
  predictions. The first generation of an empty bank is unguided. Clear a bank with TL_VendiClearBank or
  POST /trajectory_lab/vendi/clear {"name": ...}; GET /trajectory_lab/vendi/banks[/<name>] reports sizes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import comfy.clip_model
import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import folder_paths
import safetensors.torch
import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import optimized_attention_for_device
from comfy_api.latest import io

from ..guidance.vendi import (
    VendiMemory,
    cvsg_objective,
    feature_input,
    kick_factor,
    rescale_rows,
    vendi_score,
)

ADDITIONAL_MODELS_KEY = "trajectory_lab.vendi"
BATCH_MODES = ["sequential", "joint"]
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


# ---------------------------------------------------------------------------------------------------------
# Memory banks on disk
# ---------------------------------------------------------------------------------------------------------

_BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_BANK_LOCK = threading.Lock()  # prompts run on the worker thread, the web routes on the event loop thread
BANK_FORMAT = "trajectory_lab.vendi_bank/1"


def check_bank_name(name) -> str:
    """The bank name if it is safe as a file name on every OS; else a ValueError saying what is allowed."""
    ok = (
        isinstance(name, str)
        and _BANK_NAME.match(name) is not None
        and not name.endswith((".", " "))
        and name.split(".")[0].strip().lower() not in _RESERVED
    )
    if not ok:
        raise ValueError(
            f"memory_bank: {name!r} is not a valid bank name: use 1 to 64 letters, digits, spaces, '_', '-' or '.', "
            "starting with a letter or digit and not ending with '.' or a space"
        )
    return name


def bank_directory() -> Path:
    return Path(folder_paths.get_user_directory()) / "trajectory_lab" / "vendi_banks"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class MemoryBank:
    """Features of earlier generations under one name: {feature space key: [N, D] float32} in a safetensors
    file. Every operation re-reads the file under a lock, so a clear or another prompt in between is seen."""

    def __init__(self, name: str, directory: Path | None = None) -> None:
        self.name = check_bank_name(name)
        self.path = (directory or bank_directory()) / f"{self.name}.safetensors"

    def _read(self) -> dict[str, torch.Tensor]:
        if not self.path.exists():
            return {}
        try:
            return safetensors.torch.load(self.path.read_bytes())
        except Exception as e:
            raise RuntimeError(
                f"memory_bank {self.name!r}: {self.path} is unreadable ({e}); clear the bank to start it afresh"
            ) from e

    def read(self, key: str) -> torch.Tensor | None:
        with _BANK_LOCK:
            return self._read().get(key)

    def append(self, key: str, features: torch.Tensor) -> int:
        """Add rows under `key`; returns that feature space's new row count."""
        features = features.detach().to("cpu", torch.float32).contiguous()
        with _BANK_LOCK:
            tensors = self._read()
            old = tensors.get(key)
            if old is not None and old.shape[1] != features.shape[1]:
                raise ValueError(
                    f"memory_bank {self.name!r}: holds {old.shape[1]}-dim features for {key}, got {features.shape[1]}"
                )
            tensors[key] = features if old is None else torch.cat([old, features])
            _write_atomically(self.path, safetensors.torch.save(tensors, metadata={"format": BANK_FORMAT}))
            return tensors[key].shape[0]

    def clear(self) -> int:
        """Remove the bank; returns the rows it held."""
        with _BANK_LOCK:
            rows = sum(t.shape[0] for t in self._read().values()) if self.path.exists() else 0
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return rows

    def sizes(self) -> dict[str, int]:
        with _BANK_LOCK:
            return {key: t.shape[0] for key, t in self._read().items()}

    def fingerprint(self) -> str:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return f"{self.name}:empty"
        return f"{self.name}:{stat.st_mtime_ns}:{stat.st_size}"


def list_banks(directory: Path | None = None) -> dict[str, dict[str, int]]:
    directory = directory or bank_directory()
    banks = {}
    for path in sorted(directory.glob("*.safetensors")) if directory.exists() else []:
        with contextlib.suppress(ValueError, RuntimeError):
            banks[path.stem] = MemoryBank(path.stem, directory).sizes()
    return banks


# ---------------------------------------------------------------------------------------------------------
# The guider
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VendiSettings:
    scale: float = 0.05
    contextual_weight: float = 2.0
    every_n_steps: int = 5
    memory_bank: str = "default"
    start_percent: float = 0.0
    end_percent: float = 1.0
    batch_mode: str = "sequential"
    update_bank: bool = True

    def check(self) -> VendiSettings:
        if self.scale < 0:
            raise ValueError(f"scale: must be >= 0, got {self.scale}")
        if self.every_n_steps < 1:
            raise ValueError(f"every_n_steps: must be at least 1, got {self.every_n_steps}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"start_percent ({self.start_percent}) and end_percent ({self.end_percent}) must "
                             "satisfy 0 <= start_percent <= end_percent <= 1")  # fmt: skip
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode: {self.batch_mode!r} is not one of {BATCH_MODES}")
        check_bank_name(self.memory_bank)
        return self


@dataclass
class _Run:
    """Per-sampling state: the memory features, exemplars, the schedule and the steps already guided."""

    sigmas: list[float]
    flow: bool
    sigma_window: tuple[float, float]
    memory: torch.Tensor  # [m, d] float32 (d = 0 while unknown)
    exemplar_features: torch.Tensor | None
    guided: set[int] = field(default_factory=set)
    _exemplars: VendiMemory | None = None
    _memory: VendiMemory | None = None

    # Both built on first use inside the gradient context (tensors made in inference mode cannot enter autograd),
    # then reused by every guided step: the bank's Gram / moment matrix is computed once per generation.
    def exemplars(self) -> VendiMemory | None:
        if self._exemplars is None and self.exemplar_features is not None:
            self._exemplars = VendiMemory(self.exemplar_features.clone())  # moved to the features' device on use
        return self._exemplars

    def memory_set(self, like: torch.Tensor) -> VendiMemory:
        if self._memory is None:
            rows = self.memory if self.memory.shape[0] else torch.zeros(0, like.shape[1])
            self._memory = VendiMemory(rows.to(like.device, copy=True))
        return self._memory

    def remember(self, features: torch.Tensor) -> None:
        """Add a finished row's features (sequential mode: later rows are guided against it)."""
        self.memory = features if self.memory.shape[0] == 0 else torch.cat([self.memory, features.to(self.memory)])
        self._memory = None

    def step_to_guide(self, sigma: float, every_n_steps: int) -> int | None:
        """The schedule index of a not-yet-guided step on the every-n grid whose sigma this call evaluates."""
        lo, hi = self.sigma_window
        if not lo <= sigma <= hi:
            return None
        for i, s in enumerate(self.sigmas[:-1]):
            if i % every_n_steps == 0 and i not in self.guided and math.isclose(s, sigma, rel_tol=1e-5):
                return i
        return None


class VendiCFGGuider(comfy.samplers.CFGGuider):
    """CFGGuider plus c-VSG kicks on scheduled steps and a memory bank update after each generation."""

    def __init__(self, model_patcher, settings: VendiSettings, extractor: FeatureExtractor | None = None, vae=None,
                 exemplars: torch.Tensor | None = None):  # fmt: skip
        self.settings = settings.check()
        self.extractor = extractor or PooledLatentExtractor()
        self.vae = vae
        self.exemplar_images = exemplars
        if self.extractor.space == "image" and vae is None:
            raise ValueError(f"vae: {self.extractor.name} features work on images: connect the VAE of this model")
        patcher = model_patcher.clone()  # never mutate the input MODEL
        extra = [p for p in self.extractor.patchers() + ([vae.patcher] if vae is not None else []) if p is not None]
        if extra:  # loaded together with the diffusion model, so a mid-sampling load never evicts it
            patcher.set_additional_models(ADDITIONAL_MODELS_KEY, extra)
        super().__init__(patcher)
        self._run: _Run | None = None

    # ---- sampling

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):  # fmt: skip
        s = self.settings
        if sigmas.shape[-1] == 0 or (s.scale == 0 and not s.update_bank):
            return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        if latent_image.is_nested:
            raise ValueError("TL_VendiGuider does not support models with several latents per sample (nested)")
        bank = MemoryBank(s.memory_bank)
        key = self.extractor.bank_key(type(self.model_patcher.model.latent_format).__name__)
        if s.scale == 0:  # plain sampling, bit-identical to CFGGuider; the bank still records the generation
            out = super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
            if s.update_bank:
                bank.append(key, self.final_features(out))
            return out

        stored = bank.read(key)
        run = self._new_run(sigmas, latent_image, stored)
        self._run = run
        try:
            if s.batch_mode == "sequential" and latent_image.shape[0] > 1:
                out, new_features = self._sample_rows(
                    run, noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed
                )
            else:
                out = super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
                new_features = self.final_features(out)
        finally:
            self._run = None
        if s.update_bank:
            bank.append(key, new_features)
        return out

    def _sample_rows(self, run, noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        """Rows one after another, each guided against the memory plus the rows finished before it."""
        batch = latent_image.shape[0]
        outs, features = [], []
        x0_all: torch.Tensor | None = None
        for row in range(batch):
            comfy.model_management.throw_exception_if_processing_interrupted()

            def row_callback(step, x0, x, total_steps, row=row):
                nonlocal x0_all
                if x0_all is None:
                    x0_all = x0.new_zeros((batch, *x0.shape[1:]))
                x0_all[row : row + 1] = x0
                callback(row * total_steps + step, x0_all, x, batch * total_steps)

            def rows(t, row=row):
                return t[row : row + 1] if t is not None and t.ndim > 0 and t.shape[0] == batch else t

            run.guided = set()
            out = super().sample(
                rows(noise), rows(latent_image), sampler, sigmas, rows(denoise_mask),
                row_callback if callback is not None else None, disable_pbar,
                None if seed is None else seed + row,  # distinct ancestral / SDE noise per row
            )  # fmt: skip
            f = self.final_features(out)
            run.remember(f)
            outs.append(out)
            features.append(f)
        return torch.cat(outs), torch.cat(features)

    def _new_run(self, sigmas, latent_image, stored) -> _Run:
        model_sampling = self.model_patcher.get_model_object("model_sampling")
        flow = isinstance(model_sampling, comfy.model_sampling.CONST)
        window = (
            float(model_sampling.percent_to_sigma(self.settings.end_percent)),
            float(model_sampling.percent_to_sigma(self.settings.start_percent)),
        )
        exemplar_features = None
        if self.exemplar_images is not None and self.settings.contextual_weight != 0:
            pixel_size = self._pixel_size(latent_image)
            with torch.no_grad():
                exemplar_features = self.extractor.embed_images(self.exemplar_images, self.vae, pixel_size)
            exemplar_features = exemplar_features.float().cpu()
        memory = stored if stored is not None else torch.zeros(0, 0)
        return _Run([float(v) for v in sigmas.flatten().tolist()], flow, window, memory.float(), exemplar_features)

    def _pixel_size(self, latent_image) -> tuple[int, int] | None:
        """The generation's image size, for resizing exemplars before a VAE encode."""
        if self.vae is None or latent_image.ndim != 4:
            return None
        ratio = self.vae.spacial_compression_encode()
        return (latent_image.shape[2] * ratio, latent_image.shape[3] * ratio)

    @torch.no_grad()
    def final_features(self, latents: torch.Tensor) -> torch.Tensor:
        """Features of finished samples (latents in the VAE's space, as the sampler returns them)."""
        if self.extractor.space == "latent":
            return self.extractor.embed(latents).float().cpu()
        images = self.vae.decode(latents.to(self.vae.device))
        if images.ndim == 5:
            b, t = images.shape[:2]
            return self.extractor.embed(images.flatten(0, 1)).float().reshape(b, t, -1).mean(1).cpu()
        return self.extractor.embed(images).float().cpu()

    # ---- guidance

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (CFGGuider's signature)
        denoised = super().predict_noise(x, timestep, model_options, seed)
        run = self._run
        if run is None:
            return denoised
        sigma = float(timestep.flatten()[0])
        step = run.step_to_guide(sigma, self.settings.every_n_steps)
        if step is None:
            return denoised
        run.guided.add(step)
        factor = kick_factor(sigma, run.sigmas[step + 1], run.flow)
        if factor is None:
            return denoised
        gradient = self.diversity_gradient(x, denoised, sigma, run)
        if gradient is None:
            return denoised
        kick = rescale_rows(gradient, x, self.settings.scale)
        return denoised + factor * kick.to(denoised)

    def diversity_gradient(self, x, denoised, sigma, run: _Run) -> torch.Tensor | None:
        """d R / d x per row, with x0_hat moving with x_t (eps kept); None when no row has any memory."""
        batch = x.shape[0]
        others = batch > 1  # joint mode: the other rows of the batch count as memory
        if run.memory.shape[0] == 0 and not others:
            return None  # the first generation of an empty bank is unguided
        modules = self.extractor.modules() + ([self.vae.first_stage_model] if self.extractor.space == "image" else [])
        with torch.inference_mode(False), torch.enable_grad(), autograd_ready_weights(modules):
            u = feature_input(denoised.clone(), x.clone(), sigma, run.flow).detach().requires_grad_(True)
            latents = self.inner_model.process_latent_out(u)
            f = embed_latents(self.extractor, latents, self.vae)
            stored, exemplars = run.memory_set(f), run.exemplars()
            objectives = []
            for row in range(batch):
                memory = stored.extended(torch.cat([f[:row], f[row + 1 :]]).detach())
                if len(memory) == 0:
                    continue
                objectives.append(cvsg_objective(f[row : row + 1], memory, exemplars, self.settings.contextual_weight))
            if not objectives:
                return None
            (gradient,) = torch.autograd.grad(torch.cat(objectives).sum(), u)
        return gradient.detach().to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Web routes (only inside ComfyUI's server)
# ---------------------------------------------------------------------------------------------------------

ROUTE_PREFIX = "/trajectory_lab/vendi"


def register_routes() -> bool:
    """Add the bank routes to ComfyUI's PromptServer if one runs in this process (custom nodes load before the
    server adds its routes, so these get the /api mirror too). Idempotent."""
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None or getattr(prompt_server, "trajectory_lab_vendi_routes", False):
        return False
    from aiohttp import web

    routes = prompt_server.routes

    def error(message: str, status: int = 400):
        return web.json_response({"error": message}, status=status)

    @routes.get(ROUTE_PREFIX + "/banks")
    async def banks(request):
        return web.json_response({"banks": list_banks()})

    @routes.get(ROUTE_PREFIX + "/banks/{name}")
    async def bank_size(request):
        try:
            sizes = MemoryBank(request.match_info["name"]).sizes()
        except (ValueError, RuntimeError) as e:
            return error(str(e))
        return web.json_response({"name": request.match_info["name"], "sizes": sizes, "total": sum(sizes.values())})

    @routes.post(ROUTE_PREFIX + "/clear")
    async def clear(request):
        try:
            body = await request.json()
        except ValueError:
            return error('expected a JSON body {"name": "<bank name>"}')
        name = body.get("name") if isinstance(body, dict) else None
        try:
            bank = MemoryBank(check_bank_name(name))
        except ValueError as e:
            return error(str(e))
        return web.json_response({"name": name, "cleared": bank.clear()})

    prompt_server.trajectory_lab_vendi_routes = True
    logging.info("Trajectory Lab: Vendi memory bank routes under %s", ROUTE_PREFIX)
    return True


register_routes()

# ---------------------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------------------


def _bank_name_error(memory_bank) -> bool | str:
    if memory_bank is None:  # linked from another node: checked when it runs
        return True
    try:
        check_bank_name(memory_bank)
    except ValueError as e:
        return str(e)
    return True


_BANK_TIP = (
    "Name of the memory bank: the features of every finished generation are appended to it (kept in ComfyUI's "
    "user directory, across restarts). Use one bank per prompt / object. Letters, digits, spaces, '_', '-', '.'."
)


class VendiGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_VendiGuider",
            display_name="Vendi Score Guider (Trajectory Lab)",
            category="trajectory_lab/guidance",
            description=(
                "Contextualized Vendi Score Guidance (Hemmat et al. 2024): CFG plus, every n steps, a push of x_t "
                "towards features that raise the Vendi score of the memory bank (earlier generations) and, with "
                "exemplars, stay close to those real images. Diverse seeds that stay real. For SamplerCustomAdvanced; "
                "exact for euler / ddim, approximate for multi-step samplers. Image features (CLIP vision) decode "
                "through the VAE with gradients on guided steps: about a VAE decode's activations in extra memory."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Float.Input(
                    "scale",
                    default=0.05,
                    min=0.0,
                    max=1.0,
                    step=0.005,
                    round=0.0001,
                    tooltip="Each guided step moves x_t by scale * ||x_t|| (the paper: 0.04-0.07). 0 = plain CFG.",
                ),
                io.Float.Input(
                    "contextual_weight",
                    default=2.0,
                    min=0.0,
                    max=20.0,
                    step=0.1,
                    round=0.01,
                    tooltip="beta in VS(bank + x) - beta VS(exemplars + x): how strongly exemplars hold generations "
                    "on real-image support (the paper: 2). Without exemplars it has no effect (plain VSG).",
                ),
                io.Int.Input(
                    "every_n_steps",
                    default=5,
                    min=1,
                    max=1000,
                    tooltip="Guide on schedule steps 0, n, 2n, ... (the paper: every 5th step).",
                ),
                io.String.Input("memory_bank", default="default", tooltip=_BANK_TIP),
                io.Image.Input(
                    "exemplars",
                    optional=True,
                    tooltip="A few real images (any size; resized) of the object: generations stay near them.",
                ),
                io.Vae.Input(
                    "vae",
                    optional=True,
                    tooltip="Decodes latents for image features (needed by CLIP vision features) and encodes exemplars "
                    "for latent features.",
                ),
                Features.Input(
                    "features",
                    optional=True,
                    tooltip="TL_FEATURES: TL_CLIPVisionFeatures (the paper's CLIP image embedding), "
                    "TL_PixelFeatures or TL_LatentFeatures (the default: pooled predicted latents, no extra model).",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    optional=True,
                    tooltip="Start of the guidance window (fraction of the noise schedule).",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    optional=True,
                    tooltip="End of the guidance window (fraction of the noise schedule).",
                ),
                io.Combo.Input(
                    "batch_mode",
                    options=BATCH_MODES,
                    default="sequential",
                    optional=True,
                    tooltip="sequential: batch rows one after another, each against the bank and the rows before it "
                    "(the paper). joint: all rows at once, each against the bank and the other rows (faster).",
                ),
                io.Boolean.Input(
                    "update_bank",
                    default=True,
                    optional=True,
                    tooltip="Append the finished generations' features to the memory bank.",
                ),
            ],  # fmt: skip
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def validate_inputs(cls, memory_bank=None, **kwargs):
        return _bank_name_error(memory_bank)

    @classmethod
    def fingerprint_inputs(cls, memory_bank=None, **kwargs):
        # The guided result depends on the bank's content: re-run when the file changed (new rows, a clear).
        try:
            return MemoryBank(memory_bank).fingerprint()
        except ValueError:
            return float("nan")

    @classmethod
    def execute(
        cls, model, positive, negative, cfg, scale, contextual_weight, every_n_steps, memory_bank, exemplars=None,
        vae=None, features=None, start_percent=0.0, end_percent=1.0, batch_mode="sequential", update_bank=True,
    ) -> io.NodeOutput:  # fmt: skip
        settings = VendiSettings(
            scale, contextual_weight, every_n_steps, memory_bank, start_percent, end_percent, batch_mode, update_bank
        )
        guider = VendiCFGGuider(model, settings, features, vae, exemplars)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


class VendiScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_VendiScore",
            display_name="Vendi Score (Trajectory Lab)",
            category="trajectory_lab/metrics",
            description="Vendi score of an image batch: the effective number of distinct images (1 = all alike, "
            "N = all different), with a cosine kernel on the chosen features (default: 16x16 pixel thumbnails).",
            inputs=[
                io.Image.Input("images"),
                Features.Input("features", optional=True, tooltip="TL_FEATURES; default: TL_PixelFeatures (16)."),
            ],
            outputs=[io.Float.Output(display_name="vendi_score")],
        )

    @classmethod
    def execute(cls, images, features=None) -> io.NodeOutput:
        extractor = features or PixelExtractor()
        with torch.no_grad():
            embedded = extractor.embed_images(images)
        return io.NodeOutput(float(vendi_score(embedded)))


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
            inputs=[io.Int.Input("size", default=16, min=1, max=256)],
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
                io.ClipVision.Input("clip_vision"),
                io.Boolean.Input("crop", default=True, tooltip="Centre-crop to a square (else stretch)."),
            ],
            outputs=[Features.Output(display_name="features")],
        )

    @classmethod
    def execute(cls, clip_vision, crop) -> io.NodeOutput:
        return io.NodeOutput(CLIPVisionExtractor(clip_vision, crop))


class VendiClearBank(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_VendiClearBank",
            display_name="Clear Vendi Memory Bank (Trajectory Lab)",
            category="trajectory_lab/guidance",
            description="Empties a TL_VendiGuider memory bank each time the prompt runs. Link its output into the "
            "guider's memory_bank to clear before sampling.",
            inputs=[io.String.Input("memory_bank", default="default", tooltip=_BANK_TIP)],
            outputs=[io.String.Output(display_name="memory_bank")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, memory_bank=None):
        return _bank_name_error(memory_bank)

    @classmethod
    def fingerprint_inputs(cls, memory_bank=None):
        return float("nan")  # never cached: clearing is the point of running it

    @classmethod
    def execute(cls, memory_bank) -> io.NodeOutput:
        rows = MemoryBank(memory_bank).clear()
        logging.info("Trajectory Lab: cleared Vendi memory bank %r (%d rows)", memory_bank, rows)
        return io.NodeOutput(memory_bank)


# Node classes of this module, in menu order (registered in nodes/__init__.py).
NODES: list[type[io.ComfyNode]] = [VendiGuider, VendiScore, LatentFeatures, PixelFeatures, CLIPVisionFeatures,
                                   VendiClearBank]  # fmt: skip
