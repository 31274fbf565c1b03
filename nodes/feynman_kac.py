"""TL_FKCSampler and TL_FKCGuider: Feynman-Kac correctors (SMC-corrected CFG, prompt products, annealing).

How it hooks ComfyUI:
- TL_FKCSampler is a KSAMPLER subclass. Before ComfyUI's own KSAMPLER.sample runs, it turns the B-image batch
  into K·B particles (particle-major: row k·B + b, so per-image tensors and conditionings tile onto them the
  way ComfyUI tiles them), annealing the start noise; the sampler function runs samplers.smc.sample_fkc.
- The particle loop needs every expert's prediction, not only the guider's combination. A guider hands them
  over through a capture slot that the sampler places in its own copy of model_options (EXPERTS_KEY):
  * TL_FKCGuider fills the slot in its predict_noise (experts [negative, positive, positive_2, positive_3]);
  * a plain CFGGuider (KSampler-style cfg in SamplerCustom, CFGGuider, BasicGuider) is read through a post-CFG
    function appended to that copy: sampling_function hands it cond_denoised, uncond_denoised and cond_scale.
    Every model call still goes through the guider's normal path (wrappers, hooks, pre-CFG functions, the
    inpainting wrapper), which calling calc_cond_batch directly would bypass.
  A guider that overrides predict_noise with its own combination (DualCFG, PerpNeg, ...) cannot be read this
  way and is refused with a clear error.
- The move follows the experts' product itself, so CFG-changing patches (sampler_cfg_function, post-CFG
  terms such as PAG) still run but do not steer FKC.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..samplers import smc
from .guiders import is_plain_cfg_guider

EXPERTS_KEY = "trajectory_lab.fkc_experts"  # model_options slot: a dict the guider fills with "pred"
RUN_KEY = "trajectory_lab.fkc_run"  # extra_args entry: per-run state from sample() to the sampler function
UI_EVENT = "trajectory_lab.fkc_step"  # PromptServer event: per-step ESS and resampling, for the web extension
PARTICLES_MAX = 4096
AUTO_ETA = -1.0  # the eta widget's "auto" (stored eta values of older workflows keep their meaning)


class ProductOfExpertsGuider(comfy.samplers.CFGGuider):
    """[q_neg^{1 − n·cfg} Π_k q_k^{cfg}]^beta over the given positives (n of them): CFG for one positive,
    AND-composition for several, annealing for beta ≠ 1. Other samplers get the target's denoiser; the FKC
    sampler reads the experts themselves."""

    CONDS = ("negative", "positive", "positive_2", "positive_3")

    def __init__(self, model_patcher, cfg: float, beta: float):
        super().__init__(model_patcher)
        if not beta > 0:
            raise ValueError(f"TL_FKCGuider: beta must be > 0 (got {beta})")
        self.cfg = cfg
        self.beta = beta

    def set_conds(self, positive, negative, positive_2=None, positive_3=None):  # type: ignore[override]
        conds = {"negative": negative, "positive": positive, "positive_2": positive_2, "positive_3": positive_3}
        self.inner_set_conds({k: v for k, v in conds.items() if v is not None})

    def expert_betas(self) -> dict[str, float]:
        """Non-zero exponents by conditioning name (a zero-exponent expert costs a model call for nothing)."""
        positives = [name for name in self.CONDS[1:] if name in self.original_conds]
        betas = {"negative": self.beta * (1.0 - len(positives) * self.cfg)}
        betas.update({name: self.beta * self.cfg for name in positives})
        return {name: b for name, b in betas.items() if b != 0.0}

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        betas = self.expert_betas()
        conds = [self.conds.get(name) for name in betas]
        denoised = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        pred = smc.ExpertPredictions(torch.stack(denoised), torch.tensor(list(betas.values()), dtype=torch.float64))
        capture = model_options.get(EXPERTS_KEY)
        if capture is not None:
            capture["pred"] = pred
        return smc.target_denoised(pred, x, timestep, _is_flow(self.inner_model))


def _is_flow(base_model) -> bool:
    return isinstance(base_model.model_sampling, comfy.model_sampling.CONST)


@dataclass(frozen=True)
class ExpertSource:
    kind: str  # "product" (TL_FKCGuider) or "cfg" (a plain CFGGuider read through a post-CFG function)
    experts: int
    total_beta: float


def expert_source(guider) -> ExpertSource:
    """How the FKC sampler gets per-expert predictions from this guider, or a clear error."""
    if isinstance(guider, ProductOfExpertsGuider):
        return ExpertSource("product", len(guider.expert_betas()), sum(guider.expert_betas().values()))
    if is_plain_cfg_guider(guider):
        return ExpertSource("cfg", 1 if math.isclose(guider.cfg, 1.0) else 2, 1.0)
    raise ValueError(
        f"TL_FKCSampler needs each expert's prediction, but the guider {type(guider).__name__} combines them in "
        "its own predict_noise. Use TL_FKCGuider, CFGGuider, BasicGuider or SamplerCustom's cfg."
    )


def _capture_cfg(capture: dict):
    """Post-CFG function that records cond/uncond predictions as the experts of q_u^{1−w} q_c^w."""

    def record(args):
        w = float(args["cond_scale"])
        if math.isclose(w, 1.0):  # cfg 1 skips the unconditional call: the target is q_c alone
            denoised, betas = args["cond_denoised"][None], [1.0]
        else:
            denoised, betas = torch.stack([args["uncond_denoised"], args["cond_denoised"]]), [1.0 - w, w]
        capture["pred"] = smc.ExpertPredictions(denoised, torch.tensor(betas, dtype=torch.float64))
        return args["denoised"]

    return record


def _send_ui_event(data: dict) -> None:
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI imported without its server (tests, scripts)
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(UI_EVENT, data, getattr(instance, "client_id", None))


def _executing_node_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return None if context is None else context.node_id


@dataclass
class _Run:
    source: ExpertSource
    groups: int
    seed: int | None
    options: smc.FKCOptions


class ParticleSampler(comfy.samplers.KSAMPLER):
    """The SAMPLER of TL_FKCSampler. `last_steps` keeps the latest run's per-step ESS and resampling record."""

    def __init__(self, options: smc.FKCOptions, output: str, start_percent: float, end_percent: float, max_batch: int):
        super().__init__(self._sample_particles)
        self.options = options
        self.output = output
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.max_batch = max_batch
        self.last_steps: list[smc.StepReport] = []
        self.last_log_weights: torch.Tensor | None = None

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        source = expert_source(model_wrap)
        k = self.options.particles
        model_sampling = model_wrap.inner_model.model_sampling
        options = dataclasses.replace(
            self.options,
            resample_sigma_max=float(model_sampling.percent_to_sigma(self.start_percent)),
            resample_sigma_min=float(model_sampling.percent_to_sigma(self.end_percent)),
        )
        seed = extra_args.get("seed")
        noise = smc.particle_start_noise(noise, k, seed) * smc.annealed_start_scale(source.total_beta)
        if latent_image is not None:
            latent_image = smc.repeat_particles(latent_image, k)
        if denoise_mask is not None:
            denoise_mask = smc.repeat_particles(denoise_mask, k)
        extra_args[RUN_KEY] = _Run(source, noise.shape[0] // k, seed, options)
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    @torch.no_grad()  # like ComfyUI's k-diffusion samplers: no autograd graph through the model, even outside
    def _sample_particles(self, model, x, sigmas, extra_args=None, callback=None, disable=None):  # inference_mode
        extra_args = dict(extra_args or {})
        run: _Run = extra_args.pop(RUN_KEY)
        experts = self._experts_fn(model, run, extra_args)
        flow = _is_flow(model.inner_model.inner_model)
        mask = extra_args.get("denoise_mask")
        steps = len(sigmas) - 1
        progress = comfy.utils.ProgressBar(steps) if callback is None else None  # else ComfyUI's callback does it
        node_id = _executing_node_id()
        groups, k = run.groups, run.options.particles

        def on_step(info: dict[str, Any]) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            _send_ui_event(
                {
                    "node": node_id,
                    "step": info["i"],
                    "steps": steps,
                    "sigma": float(info["sigma"]),
                    "particles": k,
                    "ess": info["ess"].tolist(),
                    "resampled": info["resampled"].tolist(),
                }
            )
            if callback is not None:  # previews show particle 0 of each image
                callback({**info, "x": info["x"][:groups], "denoised": info["denoised"][:groups]})
            if progress is not None:
                progress.update_absolute(info["i"] + 1)

        generator = smc.resample_generator(run.seed)
        result = smc.sample_fkc(
            experts,
            x,
            sigmas,
            {"seed": run.seed},
            on_step,
            options=run.options,
            flow=flow,
            generator=generator,
            weight_mask=mask,
        )
        self.last_steps = result.steps
        self.last_log_weights = result.log_weights
        return smc.select_output(result, self.output, generator)  # type: ignore[arg-type]

    def _experts_fn(self, model, run: _Run, extra_args: dict):
        model_options = dict(extra_args["model_options"])
        capture: dict = {}
        model_options[EXPERTS_KEY] = capture
        if run.source.kind == "cfg":
            post = list(model_options.get("sampler_post_cfg_function", []))
            model_options["sampler_post_cfg_function"] = post + [_capture_cfg(capture)]
        call_args = {**extra_args, "model_options": model_options}
        mask = extra_args.get("denoise_mask")
        max_rows = self.max_batch // run.source.experts if self.max_batch > 0 else 0

        def experts(x: torch.Tensor, sigma: torch.Tensor) -> smc.ExpertPredictions:
            chunks = []
            for rows in smc.chunk_rows(x.shape[0], run.groups, max_rows):
                comfy.model_management.throw_exception_if_processing_interrupted()
                capture.clear()
                call, args = model, call_args
                if mask is not None and rows != slice(0, x.shape[0]):
                    call, args = _rows_of_inpaint_model(model, rows), {**call_args, "denoise_mask": mask[rows]}
                call(x[rows], sigma[rows], **args)
                if "pred" not in capture:
                    raise RuntimeError("TL_FKCSampler: the guider returned no per-expert predictions for this step")
                chunks.append(capture.pop("pred"))
            denoised = torch.cat([c.denoised for c in chunks], dim=1)
            if mask is not None:  # kept regions are the input latent for every expert, as the inpaint wrapper does
                denoised = denoised * mask + model.latent_image * (1.0 - mask)
            return smc.ExpertPredictions(denoised, chunks[0].betas)

        return experts


def _rows_of_inpaint_model(model, rows: slice):
    """The inpainting wrapper KSAMPLER built, restricted to some particle rows (its latent and noise are per row)."""
    part = comfy.samplers.KSamplerX0Inpaint(model.inner_model, model.sigmas)
    part.latent_image = model.latent_image[rows]
    part.noise = model.noise[rows]
    return part


class FKCSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_FKCSampler",
            display_name="Feynman-Kac Corrector Sampler (Trajectory Lab)",
            category="trajectory_lab/sampling",
            description=(
                "Feynman-Kac correctors (Skreta et al. 2025): K particles per image follow the SDE of the guider's "
                "target (CFG q_u^(1-w) q_c^w, or TL_FKCGuider's prompt products and annealing), carry weights that "
                "correct for the target not being a diffusion, and are resampled within each image's group."
            ),
            inputs=[
                io.Int.Input(
                    "particles",
                    default=8,
                    min=1,
                    max=PARTICLES_MAX,
                    tooltip="Particles per image (the model runs on batch x particles x experts).",
                ),
                io.Combo.Input(
                    "noise",
                    options=["target", "tempered"],
                    default="target",
                    tooltip="target: SDE driven by the target score with full noise. tempered: noise "
                    "scaled by 1/sqrt(B), B = the sum of exponents (TL_FKCGuider: its beta; 1 for CFG); with "
                    "B > 1 its weights are noisier (exact mixtures, B = 2 and 3: 4-10x the sampling floor, "
                    "target with auto eta about 1x).",
                ),
                io.Combo.Input(
                    "resample",
                    options=["every_step", "ess"],
                    default="every_step",
                    tooltip="every_step (the paper's choice and the more accurate one) or only when "
                    "the effective sample size falls below ess_threshold x particles.",
                ),
                io.Float.Input(
                    "ess_threshold",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="For resample = ess: resample a group when its ESS < threshold x particles.",
                ),
                io.Combo.Input(
                    "output",
                    options=["best", "sample", "all"],
                    default="best",
                    tooltip="best: each image's highest-weight particle; sample: one drawn by weight; "
                    "all: every particle (batch x particles latents, image by image).",
                ),
                io.Float.Input(
                    "eta",
                    default=AUTO_ETA,
                    min=AUTO_ETA,
                    max=10.0,
                    step=0.05,
                    optional=True,
                    tooltip="Noise of the move (ancestral eta). -1 = auto: max(1, sqrt(B)), B = the sum of exponents "
                    "(1 for CFG and AND-composition, TL_FKCGuider's beta for annealing and products); with "
                    "noise = tempered, auto is 1 (the tempered SDE). Every eta gives the same weights, but with "
                    "B > 1 the weights are noisy and sqrt(B) reached the sampling floor on exact mixtures where "
                    "eta 1 stayed 2-6x above it; with B <= 1, 1 was best. 0 (an ODE) collapses.",
                ),
                io.Float.Input(
                    "resample_start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    optional=True,
                    tooltip="Resample only from this fraction of the schedule on (weights always count).",
                ),
                io.Float.Input(
                    "resample_end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    optional=True,
                    tooltip="Resample only up to this fraction of the schedule.",
                ),
                io.Float.Input(
                    "increment_clamp",
                    default=0.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    optional=True,
                    tooltip="Clamp each step's centred log-weight increment to +-value (the official "
                    "EDM2 code uses 1 or 2). 0 = off.",
                ),
                io.Int.Input(
                    "max_batch",
                    default=0,
                    min=0,
                    max=65536,
                    optional=True,
                    tooltip="Most rows (particles x experts) per model call; 0 = all particles at once.",
                ),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(
        cls,
        particles,
        noise,
        resample,
        ess_threshold,
        output,
        eta=AUTO_ETA,
        resample_start_percent=0.0,
        resample_end_percent=1.0,
        increment_clamp=0.0,
        max_batch=0,
    ) -> io.NodeOutput:
        try:
            if eta < 0 and eta != AUTO_ETA:
                raise ValueError(f"eta must be >= 0, or -1 for auto (got {eta})")
            move_eta = None if eta == AUTO_ETA else eta
            options = smc.FKCOptions(
                particles, noise, resample, ess_threshold, move_eta, increment_clamp=increment_clamp
            )
            options.validate()
            if not 0.0 <= resample_start_percent <= resample_end_percent <= 1.0:
                raise ValueError(
                    f"resample_start_percent ({resample_start_percent}) and resample_end_percent "
                    f"({resample_end_percent}) must satisfy 0 <= start <= end <= 1"
                )
            if output not in ("best", "sample", "all"):
                raise ValueError(f"output must be 'best', 'sample' or 'all' (got {output!r})")
            if max_batch < 0:
                raise ValueError(f"max_batch must be >= 0, 0 = no limit (got {max_batch})")
        except ValueError as error:
            raise ValueError(f"TL_FKCSampler: {error}") from None
        return io.NodeOutput(ParticleSampler(options, output, resample_start_percent, resample_end_percent, max_batch))


class FKCGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_FKCGuider",
            display_name="Feynman-Kac Corrector Guider (Trajectory Lab)",
            category="trajectory_lab/sampling",
            description=(
                "Target [q_neg^(1 - n cfg) x q_1^cfg x ... x q_n^cfg]^beta for use with TL_FKCSampler: CFG with one "
                "positive, AND-composition of up to three prompts, annealing with beta != 1 (cfg 0.5, beta 2 with "
                "two positives is the plain product q_1 q_2). With other samplers: the same target, uncorrected."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion or flow model every expert runs on."),
                io.Conditioning.Input("positive", tooltip="The first prompt of the target."),
                io.Conditioning.Input("negative", tooltip="The negative (unconditional) expert."),
                io.Float.Input(
                    "cfg",
                    default=4.0,
                    min=-100.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Exponent of each positive; the negative gets 1 - (number of positives) x cfg.",
                ),
                io.Float.Input(
                    "beta",
                    default=1.0,
                    min=0.01,
                    max=100.0,
                    step=0.01,
                    tooltip="Annealing exponent on the whole target (1 = none; 2 sharpens).",
                ),
                io.Conditioning.Input("positive_2", optional=True, tooltip="AND-composed second prompt."),
                io.Conditioning.Input("positive_3", optional=True, tooltip="AND-composed third prompt."),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, beta, positive_2=None, positive_3=None) -> io.NodeOutput:
        guider = ProductOfExpertsGuider(model, cfg, beta)
        guider.set_conds(positive, negative, positive_2, positive_3)
        return io.NodeOutput(guider)
