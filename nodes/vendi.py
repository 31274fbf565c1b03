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

import math
from dataclasses import dataclass, field

import comfy.clip_model
import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import torch
from comfy_api.latest import io

from ..guidance.vendi import (
    VendiMemory,
    cvsg_objective,
    feature_input,
    kick_factor,
    rescale_rows,
    vendi_score,
)
from .vendi_bank import BANK_TIP, MemoryBank, VendiClearBank, bank_name_error, check_bank_name
from .vendi_features import (
    CLIPVisionFeatures,
    FeatureExtractor,
    Features,
    LatentFeatures,
    PixelExtractor,
    PixelFeatures,
    PooledLatentExtractor,
    autograd_ready_weights,
    embed_latents,
)

ADDITIONAL_MODELS_KEY = "trajectory_lab.vendi"
BATCH_MODES = ["sequential", "joint"]

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
                io.Model.Input("model", tooltip="The model to guide."),
                io.Conditioning.Input("positive", tooltip="Positive prompt."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="CFG scale."),
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
                io.String.Input("memory_bank", default="default", tooltip=BANK_TIP),
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
        return bank_name_error(memory_bank)

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
                io.Image.Input("images", tooltip="The batch to score."),
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


# Node classes of c-VSG, in menu order (registered in nodes/__init__.py).
NODES: list[type[io.ComfyNode]] = [VendiGuider, VendiScore, LatentFeatures, PixelFeatures, CLIPVisionFeatures,
                                   VendiClearBank]  # fmt: skip
