"""T-Stitch nodes: a chain of models over one sampling trajectory, the small (cheap) model first.

The stitched MODEL is a clone of the last (large) model carrying the earlier models as additional models (so
ComfyUI's model management loads and cleans them up with it) and two keyed wrappers:
- OUTER_SAMPLE: once per run, prepares each earlier model like a guider would (its own wrappers, patches and
  processed conditioning) and turns the switch fractions into sigma thresholds for this run's schedule;
- PREDICT_NOISE: routes each call by its sigma; an earlier model runs ComfyUI's own CFG `sampling_function`
  with its own model options, so a LoRA, PAG or other patch on one model stays on that model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
from comfy_api.latest import io

from ..samplers.stitching import check_fractions, model_index, step_thresholds

WRAPPER_KEY = "trajectory_lab.tstitch"
RUN_KEY = "trajectory_lab.tstitch_run"  # guider model_options entry holding the per-run stage state
SWITCH_BY = ["steps", "sigma"]


@dataclass
class StageConditioning:
    """Conditioning and cfg for an earlier model when its text encoder differs (None: use the guider's)."""

    positive: list
    negative: list
    cfg: float


@dataclass
class StageRun:
    model: Any  # ModelPatcher
    conds: dict
    model_options: dict
    cfg: float | None


def check_same_space(models: dict[str, object]) -> None:
    """All models must share the latent space and a noise schedule that aligns; errors name the input."""
    names = list(models)
    ref_name, ref = names[-1], models[names[-1]]

    def describe(m):
        fmt = m.model.latent_format
        return type(fmt).__name__, fmt.latent_channels

    def schedule(m):
        ms = m.get_model_object("model_sampling")
        flow = isinstance(ms, comfy.model_sampling.CONST)
        return flow, float(ms.sigma_min), float(ms.sigma_max)

    for name in names[:-1]:
        m = models[name]
        if describe(m) != describe(ref):
            (a, ca), (b, cb) = describe(m), describe(ref)
            raise ValueError(f"{name}: latent format {a} ({ca} channels) differs from {ref_name}'s {b} "
                             f"({cb} channels); stitched models must share one latent space")  # fmt: skip
        (flow_a, lo_a, hi_a), (flow_b, lo_b, hi_b) = schedule(m), schedule(ref)
        if flow_a != flow_b:
            kinds = {True: "flow (CONST)", False: "EPS/V (VE-form)"}
            raise ValueError(f"{name}: a {kinds[flow_a]} model cannot be stitched with {ref_name}, a {kinds[flow_b]} "
                             "model: their noise levels do not align")  # fmt: skip
        if abs(hi_a - hi_b) > 1e-3 * hi_b or abs(lo_a - lo_b) > 1e-3 * max(lo_b, 1e-6):
            raise ValueError(f"{name}: sigma range [{lo_a:.4g}, {hi_a:.4g}] differs from {ref_name}'s "
                             f"[{lo_b:.4g}, {hi_b:.4g}]; the schedules do not align")  # fmt: skip


def stitch_models(
    models: list,
    fractions: list[float],
    switch_by: str,
    stage_conditioning: Sequence[StageConditioning | None] = (),
):
    """Chain `models` (noisiest first); model k takes the steps between fractions[k-1] and fractions[k]."""
    if switch_by not in SWITCH_BY:
        raise ValueError(f"switch_by: {switch_by!r} is not one of {SWITCH_BY}")
    fractions = check_fractions(fractions)
    if len(fractions) != len(models) - 1:
        raise ValueError(f"{len(models)} models need {len(models) - 1} switch fractions, got {len(fractions)}")
    earlier = models[:-1]
    conditioning = list(stage_conditioning) or [None] * len(earlier)
    stitched = models[-1].clone()
    stitched.set_additional_models(WRAPPER_KEY, [m.clone() for m in earlier])
    large_sampling = stitched.get_model_object("model_sampling")
    sigma_thresholds = [float(large_sampling.percent_to_sigma(f)) for f in fractions]

    def prepare_stages(executor, noise, latent_image, sampler, sigmas, denoise_mask, *args, **kwargs):
        guider = executor.class_obj
        device = guider.model_patcher.load_device
        stage_models = guider.model_patcher.get_additional_models_with_key(WRAPPER_KEY)
        runs = []
        for m, cond in zip(stage_models, conditioning, strict=True):
            if cond is None:
                raw = {k: [c.copy() for c in v] for k, v in guider.original_conds.items()}
            else:
                raw = {"positive": comfy.sampler_helpers.convert_cond(cond.positive),
                       "negative": comfy.sampler_helpers.convert_cond(cond.negative)}  # fmt: skip
            options = comfy.model_patcher.create_model_options_clone(m.model_options)
            comfy.sampler_helpers.prepare_model_patcher(m, raw, options)
            latent = latent_image
            if latent is not None and latent.count_nonzero() > 0:
                latent = m.model.process_latent_in(latent)
            conds = comfy.samplers.process_conds(m.model, noise, raw, device, latent, denoise_mask, kwargs.get("seed"))
            options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
            runs.append(StageRun(m, conds, options, None if cond is None else cond.cfg))
        if switch_by == "steps":
            thresholds = step_thresholds(sigmas.tolist(), fractions)
        else:
            thresholds = sigma_thresholds
        guider.model_options[RUN_KEY] = (runs, thresholds)
        for run in runs:
            run.model.pre_run()
        try:
            return executor(noise, latent_image, sampler, sigmas, denoise_mask, *args, **kwargs)
        finally:
            guider.model_options.pop(RUN_KEY, None)
            for run in runs:
                run.model.cleanup()

    def route(executor, x, timestep, model_options, seed):
        runs, thresholds = model_options[RUN_KEY]
        index = model_index(float(timestep.flatten()[0]), thresholds)
        if index == len(runs):
            ensure_weights(executor.class_obj.model_patcher)
            return executor(x, timestep, model_options, seed)
        run = runs[index]
        ensure_weights(run.model)
        cfg = executor.class_obj.cfg if run.cfg is None else run.cfg
        return comfy.samplers.sampling_function(
            run.model.model, x, timestep, run.conds.get("negative"), run.conds.get("positive"), cfg,
            model_options=run.model_options, seed=seed,
        )  # fmt: skip

    wrappers = comfy.patcher_extension.WrappersMP
    for kind, fn in ((wrappers.OUTER_SAMPLE, prepare_stages), (wrappers.PREDICT_NOISE, route)):
        stitched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        stitched.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
    return stitched


def ensure_weights(patcher) -> None:
    """Two stages may share one network with different weight patches (the same checkpoint with and without a
    LoRA): then only one set is on the weights at a time, so reload when another stage's patches are on."""
    current = getattr(patcher.model, "current_weight_patches_uuid", None)
    if current != patcher.patches_uuid and (current is not None or patcher.patches):
        comfy.model_management.load_models_gpu([patcher])


_FRACTION_TIP = (
    "Fraction of the steps (switch_by = steps: the first floor(r N) steps) or of the noise schedule "
    "(switch_by = sigma: while sigma > the large model's sigma at r) handled by the earlier model."
)
_SWITCH_TIP = "steps: the official SD rule, floor(r N) steps; sigma: a noise level, the same on any schedule."


class TStitchModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_TStitchModel",
            display_name="T-Stitch Model (Trajectory Lab)",
            category="trajectory_lab/stitching",
            description="T-Stitch (Pan et al. 2024): the small model denoises the first steps, the large model the "
            "rest, on one trajectory with the same conditioning. Drop in before any sampler.",
            inputs=[
                io.Model.Input("small_model", tooltip="The cheap model for the noisy early steps."),
                io.Model.Input("large_model", tooltip="The model for the remaining steps; its schedule rules."),
                io.Float.Input("small_fraction", default=0.4, min=0.0, max=1.0, step=0.01, tooltip=_FRACTION_TIP),
                io.Combo.Input("switch_by", options=SWITCH_BY, default="steps", tooltip=_SWITCH_TIP),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, small_model, large_model, small_fraction, switch_by) -> io.NodeOutput:
        check_same_space({"small_model": small_model, "large_model": large_model})
        return io.NodeOutput(stitch_models([small_model, large_model], [small_fraction], switch_by))


class TStitchGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_TStitchGuider",
            display_name="T-Stitch Guider (Trajectory Lab)",
            category="trajectory_lab/stitching",
            description="T-Stitch with separate conditioning and CFG per model (e.g. different text encoders), "
            "for SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("small_model"),
                io.Model.Input("large_model"),
                io.Conditioning.Input("small_positive"),
                io.Conditioning.Input("small_negative"),
                io.Conditioning.Input("large_positive"),
                io.Conditioning.Input("large_negative"),
                io.Float.Input("small_cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Float.Input("large_cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Float.Input("small_fraction", default=0.4, min=0.0, max=1.0, step=0.01, tooltip=_FRACTION_TIP),
                io.Combo.Input("switch_by", options=SWITCH_BY, default="steps", tooltip=_SWITCH_TIP),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(
        cls, small_model, large_model, small_positive, small_negative, large_positive, large_negative, small_cfg,
        large_cfg, small_fraction, switch_by,
    ) -> io.NodeOutput:  # fmt: skip
        check_same_space({"small_model": small_model, "large_model": large_model})
        small = StageConditioning(small_positive, small_negative, small_cfg)
        stitched = stitch_models([small_model, large_model], [small_fraction], switch_by, [small])
        guider = comfy.samplers.CFGGuider(stitched)
        guider.set_conds(large_positive, large_negative)
        guider.set_cfg(large_cfg)
        return io.NodeOutput(guider)


class TStitchChain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_TStitchChain",
            display_name="T-Stitch Chain (Trajectory Lab)",
            category="trajectory_lab/stitching",
            description="Up to four models over one trajectory, noisiest first (eDiff-I-style experts, Wan 2.2 "
            "high-noise -> low-noise, SSD-1B -> SDXL -> refiner). Switch fractions are cumulative.",
            inputs=[
                io.Model.Input("model_1", tooltip="First (noisiest) steps."),
                io.Model.Input("model_2"),
                io.Float.Input(
                    "switch_1",
                    default=0.4,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Cumulative fraction where model_1 hands over to model_2.",
                ),
                io.Model.Input("model_3", optional=True),
                io.Float.Input(
                    "switch_2",
                    default=0.8,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Where model_2 hands over to model_3 (used when model_3 is connected).",
                ),
                io.Model.Input("model_4", optional=True),
                io.Float.Input(
                    "switch_3",
                    default=0.9,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Where model_3 hands over to model_4 (used when model_4 is connected).",
                ),
                io.Combo.Input("switch_by", options=SWITCH_BY, default="steps", tooltip=_SWITCH_TIP),
            ],  # fmt: skip
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model_1, model_2, switch_1, switch_by, model_3=None, switch_2=0.8, model_4=None, switch_3=0.9):
        if model_4 is not None and model_3 is None:
            raise ValueError("model_4 is connected but model_3 is not: connect the chain in order")
        chain = {"model_1": model_1, "model_2": model_2, "model_3": model_3, "model_4": model_4}
        chain = {k: v for k, v in chain.items() if v is not None}
        fractions = [switch_1, switch_2, switch_3][: len(chain) - 1]
        check_same_space(chain)
        return io.NodeOutput(stitch_models(list(chain.values()), fractions, switch_by))
