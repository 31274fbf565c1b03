"""T-Stitch nodes: a chain of models over one sampling trajectory, the small (cheap) model first.

The stitched MODEL is a clone of the last (large) model carrying the earlier models as additional models (so
ComfyUI's model management loads and cleans them up with it) and two keyed wrappers:
- OUTER_SAMPLE: once per run, prepares each earlier model like a guider would (its own wrappers, patches and
  processed conditioning) and turns the switch fractions into sigma thresholds for this run's schedule;
- PREDICT_NOISE: routes each call by its sigma; an earlier model runs ComfyUI's own CFG `sampling_function`
  with its own model options, so a LoRA, PAG or other patch on one model stays on that model (a guider with its
  own predict_noise, such as TL_FKCGuider, runs it with the earlier model put in place; what the
  sampler added to the run's model options, e.g. a CFG++ hook, reaches every model).
Each model can have its own conditioning and cfg (a different text encoder); otherwise it takes the sampler's. Before
the first step, conditioning whose width does not fit a UNet is refused with the model's name. An earlier model's
conditioning is prepared as ComfyUI prepares the sampler's: its ControlNets loaded with that model and cleaned up after
the run, its hooks (a LoRA hook) registered on that model. Hooks on the last model's own conditioning are refused:
ComfyUI registers hooks from the sampler's conditioning before any wrapper runs.
With history = "restart" the OUTER_SAMPLE wrapper also hands the sampler a copy that runs its sampler function once
per model segment (one noise sampler for the whole run), so a multistep solver starts afresh at each switch.
At a switch the earlier models are released from ComfyUI's model management when the next model is not fully
loaded (VRAM short) or always, on request; a later call that needs one of them loads it again.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import comfy.hooks
import comfy.k_diffusion.sampling
import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..samplers.stitching import check_fractions, model_index, segment_bounds, step_thresholds
from .guiders import is_plain_cfg_guider

WRAPPER_KEY = "trajectory_lab.tstitch"
RUN_KEY = "trajectory_lab.tstitch_run"  # guider model_options entry holding the per-run stage state
SWITCH_BY = ["steps", "sigma"]
HISTORY = ["carry", "restart"]
RELEASE = ["when_vram_short", "always"]
# The modules of the sampler functions restart can split: ComfyUI's own samplers.
SPLITTABLE = ("comfy.k_diffusion.sampling", "comfy.samplers", "comfy.extra_samplers.uni_pc")


@dataclass
class StageConditioning:
    """A model's own conditioning and cfg, when its text encoder differs (None in its place: the sampler's)."""

    positive: list
    negative: list
    cfg: float


@dataclass
class StageRun:
    model: Any  # ModelPatcher
    conds: dict
    model_options: dict
    cfg: float
    memory: tuple[float, float]  # (memory_required, minimum_memory_required) for a reload at a switch
    extra: list  # what its conditioning needs loaded with it: control models, GLIGEN, hook models


@dataclass
class StitchRun:
    earlier: list[StageRun]
    last: Any  # the guider's own ModelPatcher: the last model of the chain
    last_memory: tuple[float, float]
    last_extra: list
    thresholds: list[float]
    current: int = 0  # the chain position of the latest call
    routed: int | None = None  # the chain position of the previous call

    def patcher(self, index: int):
        return self.last if index == len(self.earlier) else self.earlier[index].model

    def memory(self, index: int) -> tuple[float, float]:
        return self.last_memory if index == len(self.earlier) else self.earlier[index].memory

    def extra(self, index: int) -> list:
        return self.last_extra if index == len(self.earlier) else self.earlier[index].extra


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
        if flow_a:
            # A flow sigma is the noise level itself, x = (1 - sigma) x0 + sigma noise, whatever the shift: a shift
            # only moves the schedule (the large model's rules), and each model maps sigma to its own timestep.
            # So flow experts with different shifts (Wan 2.2 high/low noise) align.
            continue
        if abs(hi_a - hi_b) > 1e-3 * hi_b or abs(lo_a - lo_b) > 1e-3 * max(lo_b, 1e-6):
            raise ValueError(f"{name}: sigma range [{lo_a:.4g}, {hi_a:.4g}] differs from {ref_name}'s "
                             f"[{lo_b:.4g}, {hi_b:.4g}]; the schedules do not align")  # fmt: skip


# What a UNet's layers take, by the unet_config key that sizes them: the text context of every cross-attention
# (attn2) and the pooled/adm vector of the label embedding.
UNET_WIDTHS = {
    "c_crossattn": ("cross-attention (text) width", "context_dim"),
    "y": ("adm (pooled) width", "adm_in_channels"),
}


def check_conditioning(name: str, model, conds: dict) -> None:
    """Conditioning encoded for another model (SDXL's 2048-wide text given to the 1280-wide refiner) otherwise fails
    as a bare shape error deep inside the UNet. `model` is a BaseModel, `conds` its processed conditioning. Only
    ComfyUI's UNet is checked: there the config widths are exactly what its layers take; other networks are left
    to fail (or adapt) on their own."""
    if not is_unet(model):
        return
    config = model.model_config.unet_config
    for kind, items in conds.items():
        for cond in items:
            for key, (what, config_key) in UNET_WIDTHS.items():
                expected, value = config.get(config_key), cond.get("model_conds", {}).get(key)
                if isinstance(expected, int) and value is not None and value.cond.shape[-1] != expected:
                    raise ValueError(f"{name}: its {kind} conditioning has {what} {value.cond.shape[-1]}, but this "
                                     f"model takes {expected} ({config_key}); give it conditioning encoded by its own "
                                     "text encoder")  # fmt: skip


def is_unet(model) -> bool:
    return isinstance(model.diffusion_model, comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel)


def latent_in(model, latent_image):
    """The latent as inner_sample hands it to process_conds: in the model's scale, an empty latent left as is."""
    return model.process_latent_in(latent_image) if latent_image.count_nonzero() > 0 else latent_image


def has_hooks(conditioning) -> bool:
    """Whether CONDITIONING carries hooks (a LoRA hook set on it, or a ControlNet's extra hooks)."""
    found = comfy.sampler_helpers.get_hooks_from_cond(comfy.sampler_helpers.convert_cond(conditioning),
                                                      comfy.hooks.HookGroup())  # fmt: skip
    return len(found) > 0


def stage_requirements(patcher, noise_shape, conds: dict, model_options: dict) -> tuple[tuple[float, float], list]:
    """What loading a model for these (unprocessed) conds takes, as ComfyUI's prepare_sampling counts it: the memory
    (with the control models' inference memory) and the additional models to load with it."""
    extra, inference = comfy.sampler_helpers.get_additional_models(conds, patcher.model_dtype())
    extra += comfy.sampler_helpers.get_additional_models_from_model_options(model_options)
    memory, minimum = comfy.sampler_helpers.estimate_memory(patcher, noise_shape, conds)
    return (memory + inference, minimum + inference), extra


def replaced_argument(signature: inspect.Signature, args: tuple, kwargs: dict, name: str, value):
    """(args, kwargs) of a call with one argument replaced, in the form it was passed (by position or by name)."""
    if name in kwargs:
        return args, {**kwargs, name: value}
    index = list(signature.parameters).index(name)
    return (*args[:index], value, *args[index + 1 :]), kwargs


def stitch_models(
    models: dict[str, Any],
    fractions: list[float],
    switch_by: str,
    conditioning: Sequence[StageConditioning | None] = (),
    history: str = "carry",
    release: str = "when_vram_short",
):
    """Chain `models` (input name -> MODEL, noisiest first); model k takes the steps between fractions[k-1] and
    fractions[k]. conditioning[k] gives model k its own conditioning and cfg; None or missing: the sampler's."""
    for name, value, valid in (("switch_by", switch_by, SWITCH_BY), ("history", history, HISTORY),
                               ("release_after_switch", release, RELEASE)):  # fmt: skip
        if value not in valid:
            raise ValueError(f"{name}: {value!r} is not one of {valid}")
    fractions = check_fractions(fractions)
    if len(fractions) != len(models) - 1:
        raise ValueError(f"{len(models)} models need {len(models) - 1} switch fractions, got {len(fractions)}")
    if len(conditioning) > len(models):
        raise ValueError(f"{len(models)} models, but conditioning for {len(conditioning)}")
    names, chain = list(models), list(models.values())
    own = list(conditioning) + [None] * (len(models) - len(conditioning))
    earlier_own, last_own = own[:-1], own[-1]
    if last_own is not None and (has_hooks(last_own.positive) or has_hooks(last_own.negative)):
        # ComfyUI registers conditioning hooks before any wrapper of ours runs, from the sampler's conditioning.
        raise ValueError(f"{names[-1]}: its own conditioning carries hooks (e.g. a LoRA hook set on the "
                         "conditioning), which only the sampler's conditioning can bring to the last model; connect "
                         "it to the sampler's positive/negative instead")  # fmt: skip
    stitched = chain[-1].clone()
    stitched.set_additional_models(WRAPPER_KEY, [m.clone() for m in chain[:-1]])
    large_sampling = stitched.get_model_object("model_sampling")
    sigma_thresholds = [float(large_sampling.percent_to_sigma(f)) for f in fractions]

    def prepare_stages(executor, *args, **kwargs):
        # Bound against the wrapped function's own signature: ComfyUI passes seed (and more) by position, and
        # every argument is handed on unchanged but the sampler.
        signature = inspect.signature(executor.original)
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        run_args = call.arguments
        noise, sigmas = run_args["noise"], run_args["sigmas"]
        guider = executor.class_obj
        device = guider.model_patcher.load_device
        # What outer_sample hands the last model's process_conds, for every earlier model too.
        latent_image = run_args["latent_image"].to(device)
        denoise_mask = run_args["denoise_mask"]
        if denoise_mask is not None:
            denoise_mask = comfy.sampler_helpers.prepare_mask(denoise_mask, noise.shape, device)
        noise = noise.to(device)
        encode_args = {"denoise_mask": denoise_mask, "seed": run_args["seed"],
                       "latent_shapes": run_args.get("latent_shapes")}  # fmt: skip
        sampler_cfg = guider.cfg
        stage_models = guider.model_patcher.get_additional_models_with_key(WRAPPER_KEY)
        runs: list[StageRun] = []
        prepared = []  # (model, its hook mode, options, conds) of every earlier model touched, for the cleanup
        saved = guider.conds, guider.cfg
        try:
            for name, m, cond in zip(names[:-1], stage_models, earlier_own, strict=True):
                if cond is None:
                    raw = {k: [c.copy() for c in v] for k, v in guider.original_conds.items()}
                else:
                    raw = {"positive": comfy.sampler_helpers.convert_cond(cond.positive),
                           "negative": comfy.sampler_helpers.convert_cond(cond.negative)}  # fmt: skip
                # As CFGGuider.sample and outer_sample prepare the sampler's conditioning: its hooks registered on
                # this model, its control models loaded with it (ensure_loaded) and cleaned up after the run.
                comfy.samplers.preprocess_conds_hooks(raw)
                options = comfy.model_patcher.create_model_options_clone(m.model_options)
                prepared.append((m, m.hook_mode, options, raw))
                if comfy.samplers.get_total_hook_groups_in_conds(raw) <= 1:
                    m.hook_mode = comfy.hooks.EnumHookMode.MinVram
                comfy.sampler_helpers.prepare_model_patcher(m, raw, options)
                comfy.samplers.filter_registered_hooks_on_conds(raw, options)
                memory, extra = stage_requirements(m, noise.shape, raw, options)
                comfy.samplers.cast_to_load_options(options, device=device, dtype=m.model_dtype())
                latent = latent_in(m.model, latent_image)
                conds = comfy.samplers.process_conds(m.model, noise, raw, device, latent, **encode_args)
                check_conditioning(name, m.model, conds)
                options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
                cfg = sampler_cfg if cond is None else cond.cfg
                runs.append(StageRun(m, conds, options, cfg, memory, extra))
            if switch_by == "steps":
                thresholds = step_thresholds(sigmas.tolist(), fractions)
            else:
                thresholds = sigma_thresholds
            if history == "restart":
                sampler = restarting_sampler(run_args["sampler"], segment_bounds(sigmas.tolist(), thresholds))
                args, kwargs = replaced_argument(signature, args, kwargs, "sampler", sampler)
            if last_own is not None:
                # The last model's own conditioning takes the sampler's place for this run, before outer_sample,
                # so ComfyUI prepares it (control models loaded, conds processed) as if the sampler had it.
                guider.conds = {**guider.conds, "positive": comfy.sampler_helpers.convert_cond(last_own.positive),
                                "negative": comfy.sampler_helpers.convert_cond(last_own.negative)}  # fmt: skip
                guider.cfg = last_own.cfg
            check_last_model(names[-1], guider, noise, device, latent_image, encode_args)
            memory, extra = stage_requirements(guider.model_patcher, noise.shape, guider.conds, guider.model_options)
            guider.model_options[RUN_KEY] = StitchRun(runs, guider.model_patcher, memory, extra, thresholds)
            for run in runs:
                run.model.pre_run()
            return executor(*args, **kwargs)
        finally:
            guider.model_options.pop(RUN_KEY, None)
            guider.conds, guider.cfg = saved
            for m, hook_mode, options, conds in prepared:
                m.cleanup()
                m.hook_mode = hook_mode
                m.restore_hook_patches()
                comfy.samplers.cast_to_load_options(options, device=m.offload_device)
                comfy.sampler_helpers.cleanup_models(conds, [])  # the control objects: hint, range, sampling
            for run in runs:
                comfy.sampler_helpers.cleanup_additional_models(run.extra)

    def route(executor, x, timestep, model_options, seed):
        state: StitchRun = model_options[RUN_KEY]
        index = model_index(float(timestep.flatten()[0]), state.thresholds)
        if state.routed is not None and state.routed != index:
            # Hook weights (a LoRA hook on one model's conditioning) off the network before another model uses it:
            # two models can share one network, which each ModelPatcher patches in place.
            state.patcher(state.routed).unpatch_hooks()
        state.routed = index
        if index > state.current:
            state.current = index
            release_earlier(state, release)
        patcher = state.patcher(index)
        ensure_loaded(patcher, state.memory(index), state.extra(index))
        if hasattr(patcher.model, "current_patcher"):
            patcher.model.current_patcher = patcher  # whose hooks the network's calls apply, when it is shared
        if index == len(state.earlier):
            return executor(x, timestep, model_options, seed)
        run = state.earlier[index]
        guider = executor.class_obj
        options = with_sampler_additions(run.model_options, model_options, guider.model_options)
        if not is_plain_cfg_guider(guider):
            with guider_on_stage(guider, run):
                return guider.predict_noise(x, timestep, options, seed)
        return comfy.samplers.sampling_function(
            run.model.model, x, timestep, run.conds.get("negative"), run.conds.get("positive"), run.cfg,
            model_options=options, seed=seed,
        )  # fmt: skip

    wrappers = comfy.patcher_extension.WrappersMP
    for kind, fn in ((wrappers.OUTER_SAMPLE, prepare_stages), (wrappers.PREDICT_NOISE, route)):
        stitched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        stitched.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
    return stitched


def check_last_model(name: str, guider, noise, device, latent_image, encode_args: dict) -> None:
    """check_conditioning for the last model before sampling starts. Its conditioning is processed later, inside
    outer_sample, so encode a copy with its own extra_conds (what decides the adm width) just for the check."""
    model = guider.model_patcher.model
    if not is_unet(model):
        return
    latent = latent_in(model, latent_image)
    encoded = {}
    for kind, items in guider.conds.items():
        copies = [c.copy() for c in items]
        encoded[kind] = comfy.samplers.encode_model_conds(model.extra_conds, copies, noise, device, kind,
                                                          latent_image=latent, **encode_args)  # fmt: skip
    check_conditioning(name, model, encoded)


def with_sampler_additions(stage_options: dict, call_options: dict, guider_options: dict) -> dict:
    """An earlier stage's model options plus what the sampler itself added to this run's options: post-CFG hooks
    (the CFG++ samplers read the unconditional prediction through one; FKC reads the experts) and new entries (FKC's
    capture slot, disable_cfg1_optimization). The last model's own hooks and patches stay on the last model."""
    guider_hooks = guider_options.get("sampler_post_cfg_function", [])
    added = [f for f in call_options.get("sampler_post_cfg_function", []) if all(f is not g for g in guider_hooks)]
    entries = {k: v for k, v in call_options.items() if k not in guider_options and k not in stage_options}
    entries.pop("sampler_post_cfg_function", None)
    if not added and not entries:
        return stage_options
    options = {**stage_options, **entries}
    if added:
        options["sampler_post_cfg_function"] = stage_options.get("sampler_post_cfg_function", []) + added
    return options


@contextlib.contextmanager
def guider_on_stage(guider, run: StageRun):
    """The guider's own predict_noise with an earlier model, its conditioning and cfg put in place, so a guider
    that combines predictions its own way (FKC's product of experts) does so on every model."""
    saved = guider.inner_model, guider.conds, guider.cfg
    guider.inner_model, guider.conds, guider.cfg = run.model.model, run.conds, run.cfg
    try:
        yield guider
    finally:
        guider.inner_model, guider.conds, guider.cfg = saved


def restarting_sampler(sampler, bounds: list[tuple[int, int]]):
    """A copy of a KSAMPLER that runs its sampler function once per model segment of the schedule.

    Every segment draws from one noise sampler built for the whole run, as the sampler itself would build it, so
    single-step stochastic samplers get exactly the noise of an unsplit run (and no segment replays another's).
    Only ComfyUI's own k-diffusion samplers are split: others (FKC particles, FlowTurbo plans, other packs) keep
    state or a plan across the whole schedule that a split would break, so they are refused with a clear error.
    """
    if len(bounds) <= 1:
        return sampler
    inner = getattr(sampler, "sampler_function", None)
    if type(sampler) is not comfy.samplers.KSAMPLER or getattr(inner, "__module__", None) not in SPLITTABLE:
        name = getattr(inner, "__name__", type(sampler).__name__)
        raise ValueError(f"history: restart works with ComfyUI's built-in samplers, but this sampler ({name}) runs "
                         "its own loop over the whole schedule; use history = carry")  # fmt: skip
    takes_noise_sampler = "noise_sampler" in inspect.signature(inner).parameters

    def run_segments(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = {} if extra_args is None else extra_args
        if takes_noise_sampler and options.get("noise_sampler") is None:
            options["noise_sampler"] = run_noise_sampler(inner, x, sigmas, extra_args.get("seed"))
        for start, end in bounds:
            shifted = None if callback is None else (lambda d, start=start: callback({**d, "i": d["i"] + start}))
            # A fresh dict per segment: some samplers (the CFG++ ones) add their own post-CFG hook to extra_args.
            x = inner(model, x, sigmas[start : end + 1], extra_args=dict(extra_args), callback=shifted,
                      disable=disable, **options)  # fmt: skip
        return x

    segmented = copy.copy(sampler)
    segmented.sampler_function = run_segments
    return segmented


def run_noise_sampler(sampler_function, x, sigmas, seed):
    """The noise sampler `sampler_function` would build for the full schedule (Brownian tree or seeded stream)."""
    if "BrownianTreeNoiseSampler" in inspect.unwrap(sampler_function).__code__.co_names:
        positive = sigmas[sigmas > 0]
        on_cpu = not sampler_function.__name__.endswith("_gpu")
        return comfy.k_diffusion.sampling.BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=seed,
                                                                   cpu=on_cpu)  # fmt: skip
    return comfy.k_diffusion.sampling.default_noise_sampler(x, seed=seed)


def loaded_entry(patcher):
    """ComfyUI's LoadedModel record for this exact patcher, or None when it is not loaded."""
    for loaded in comfy.model_management.current_loaded_models:
        if loaded.model is patcher:
            return loaded
    return None


def release_earlier(state: StitchRun, release: str) -> None:
    """At a switch: the models before the current one are done for this run. Unload them (always, or when the
    current model is not fully loaded: VRAM is short) and give the current model the room. A network shared with a
    later stage (one checkpoint with and without a LoRA) is never unloaded."""
    current = state.patcher(state.current)
    later = range(state.current, len(state.earlier) + 1)
    later_networks = [p.model for i in later for p in (state.patcher(i), *state.extra(i))]
    short = current.loaded_size() < current.model_size()
    for i in range(state.current):
        for patcher in (state.patcher(i), *state.extra(i)):  # the model and its control models
            entry = loaded_entry(patcher)
            if entry is None:
                continue
            entry.currently_used = False  # bookkeeping: no longer required by this run
            if (release == "always" or short) and all(patcher.model is not n for n in later_networks):
                if entry.model_unload():
                    comfy.model_management.current_loaded_models.remove(entry)
    if short:
        memory_required, minimum = state.memory(state.current)
        comfy.model_management.load_models_gpu([current, *state.extra(state.current)],
                                               memory_required=memory_required,
                                               minimum_memory_required=minimum)  # fmt: skip


def ensure_loaded(patcher, memory: tuple[float, float], extra: Sequence = ()) -> None:
    """Load a stage's weights, and the control models its conditioning needs, when they are not on: released at an
    earlier switch, never loaded (a ControlNet on an earlier model's own conditioning), or two stages sharing one
    network with different weight patches (the same checkpoint with and without a LoRA). Then put its object patches
    in place, as its own load would."""
    current = getattr(patcher.model, "current_weight_patches_uuid", None)
    patched_by_other = current != patcher.patches_uuid and (current is not None or patcher.patches)
    if patched_by_other or any(loaded_entry(p) is None for p in (patcher, *extra)):
        comfy.model_management.load_models_gpu([patcher, *extra], memory_required=memory[0],
                                               minimum_memory_required=memory[1])  # fmt: skip
    apply_object_patches(patcher)


def apply_object_patches(patcher) -> None:
    """Two stages sharing one network with different object patches (one checkpoint at two shifts: each its own
    model_sampling) are both loaded for the run, and the network keeps whichever patches were applied last. Put this
    stage's on: its own patches, and the originals (kept in the backup all clones share) where it has none."""
    wanted = {**patcher.object_patches_backup, **patcher.object_patches}
    for key, value in wanted.items():
        if comfy.utils.get_attr(patcher.model, key) is not value:
            comfy.utils.set_attr(patcher.model, key, value)


_FRACTION_TIP = (
    "Fraction of the steps (switch_by = steps: the first floor(r N) steps) or of the noise schedule "
    "(switch_by = sigma: while sigma > the large model's sigma at r) handled by the earlier model."
)
_SWITCH_TIP = "steps: the official SD rule, floor(r N) steps; sigma: a noise level, the same on any schedule."
_HISTORY_TIP = (
    "carry (default): one uninterrupted run, as in the official diffusers code; a multistep sampler's first large "
    "steps reuse the small model's predictions. restart: a multistep sampler (DPM++ 2M, UniPC, ...) starts afresh at "
    "each switch (a first-order step there). On the exact-GMM check, carry was as accurate or better for DPM++ 2M, "
    "UniPC and LMS; restart helped DPM++ 3M SDE at 10-20 steps. Single-step samplers give the same result either way."
)
_RELEASE_TIP = (
    "when_vram_short: at the switch, unload the earlier model(s) only if the next model is not fully loaded, and "
    "give it the room; always: unload them at every switch (least VRAM, reloaded on the next run)."
)


def stitch_options() -> list:
    """The optional inputs every T-Stitch node shares."""
    return [
        io.Combo.Input("history", options=HISTORY, default="carry", optional=True, tooltip=_HISTORY_TIP),
        io.Combo.Input(
            "release_after_switch", options=RELEASE, default="when_vram_short", optional=True, tooltip=_RELEASE_TIP
        ),  # fmt: skip
    ]


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
                *stitch_options(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(
        cls, small_model, large_model, small_fraction, switch_by, history="carry",
        release_after_switch="when_vram_short",
    ) -> io.NodeOutput:  # fmt: skip
        models = {"small_model": small_model, "large_model": large_model}
        check_same_space(models)
        return io.NodeOutput(stitch_models(models, [small_fraction], switch_by, (), history, release_after_switch))


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
                io.Model.Input("small_model", tooltip="The cheap model for the noisy early steps."),
                io.Model.Input("large_model", tooltip="The model for the remaining steps; its schedule rules."),
                io.Conditioning.Input("small_positive", tooltip="Positive prompt encoded for the small model."),
                io.Conditioning.Input("small_negative", tooltip="Negative prompt encoded for the small model."),
                io.Conditioning.Input("large_positive", tooltip="Positive prompt encoded for the large model."),
                io.Conditioning.Input("large_negative", tooltip="Negative prompt encoded for the large model."),
                io.Float.Input(
                    "small_cfg",
                    default=7.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="CFG scale while the small model denoises.",
                ),
                io.Float.Input(
                    "large_cfg",
                    default=7.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="CFG scale while the large model denoises.",
                ),
                io.Float.Input("small_fraction", default=0.4, min=0.0, max=1.0, step=0.01, tooltip=_FRACTION_TIP),
                io.Combo.Input("switch_by", options=SWITCH_BY, default="steps", tooltip=_SWITCH_TIP),
                *stitch_options(),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(
        cls, small_model, large_model, small_positive, small_negative, large_positive, large_negative, small_cfg,
        large_cfg, small_fraction, switch_by, history="carry", release_after_switch="when_vram_short",
    ) -> io.NodeOutput:  # fmt: skip
        models = {"small_model": small_model, "large_model": large_model}
        check_same_space(models)
        small = StageConditioning(small_positive, small_negative, small_cfg)
        stitched = stitch_models(models, [small_fraction], switch_by, [small], history, release_after_switch)
        guider = comfy.samplers.CFGGuider(stitched)
        guider.set_conds(large_positive, large_negative)
        guider.set_cfg(large_cfg)
        return io.NodeOutput(guider)


MAX_CHAIN = 4


def own_conditioning_inputs(k: int) -> list:
    """TL_TStitchChain's optional conditioning for model_k: for a model whose text encoder differs (the refiner)."""
    return [
        io.Conditioning.Input(f"positive_{k}", optional=True,
                              tooltip=f"model_{k}'s own positive prompt, encoded by its text encoder. Unconnected: "
                              "the sampler's positive."),
        io.Conditioning.Input(f"negative_{k}", optional=True,
                              tooltip=f"model_{k}'s own negative prompt (needed with positive_{k})."),
        io.Float.Input(f"cfg_{k}", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, optional=True,
                       tooltip=f"CFG scale for model_{k}, used with its own positive_{k}/negative_{k}; otherwise "
                       "the sampler's cfg applies."),
    ]  # fmt: skip


def chain_conditioning(k: int, connected: bool, own: dict) -> StageConditioning | None:
    positive, negative = own.get(f"positive_{k}"), own.get(f"negative_{k}")
    if positive is None and negative is None:
        return None
    if not connected:
        raise ValueError(f"positive_{k}/negative_{k} are connected but model_{k} is not")
    if positive is None or negative is None:
        given, missing = (f"positive_{k}", f"negative_{k}") if negative is None else (f"negative_{k}", f"positive_{k}")
        raise ValueError(f"model_{k}: {given} is connected but {missing} is not; a model with its own conditioning "
                         "needs both")  # fmt: skip
    return StageConditioning(positive, negative, own.get(f"cfg_{k}", 7.0))


class TStitchChain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_TStitchChain",
            display_name="T-Stitch Chain (Trajectory Lab)",
            category="trajectory_lab/stitching",
            description="Up to four models over one trajectory, noisiest first (eDiff-I-style experts, Wan 2.2 "
            "high-noise -> low-noise, SSD-1B -> SDXL -> refiner). Switch fractions are cumulative. A model whose text "
            "encoder differs (the refiner) takes its own positive_k/negative_k/cfg_k; the others the sampler's.",
            inputs=[
                io.Model.Input("model_1", tooltip="First (noisiest) steps."),
                io.Model.Input("model_2", tooltip="The second model (takes over at switch_1)."),
                io.Float.Input(
                    "switch_1",
                    default=0.4,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Cumulative fraction where model_1 hands over to model_2.",
                ),
                io.Model.Input("model_3", optional=True, tooltip="Optional third model (from switch_2)."),
                io.Float.Input(
                    "switch_2",
                    default=0.8,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Where model_2 hands over to model_3 (used when model_3 is connected).",
                ),
                io.Model.Input("model_4", optional=True, tooltip="Optional fourth model (from switch_3)."),
                io.Float.Input(
                    "switch_3",
                    default=0.9,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Where model_3 hands over to model_4 (used when model_4 is connected).",
                ),
                io.Combo.Input("switch_by", options=SWITCH_BY, default="steps", tooltip=_SWITCH_TIP),
                *stitch_options(),
                # Per-model conditioning last: the cfg widgets extend a stored workflow's widget values at the end.
                *(item for k in range(1, MAX_CHAIN + 1) for item in own_conditioning_inputs(k)),
            ],  # fmt: skip
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(
        cls, model_1, model_2, switch_1, switch_by, model_3=None, switch_2=0.8, model_4=None, switch_3=0.9,
        history="carry", release_after_switch="when_vram_short", **own,
    ):  # fmt: skip
        if model_4 is not None and model_3 is None:
            raise ValueError("model_4 is connected but model_3 is not: connect the chain in order")
        chain = {"model_1": model_1, "model_2": model_2, "model_3": model_3, "model_4": model_4}
        conditioning = [chain_conditioning(k, chain[f"model_{k}"] is not None, own) for k in range(1, MAX_CHAIN + 1)]
        chain = {k: v for k, v in chain.items() if v is not None}
        fractions = [switch_1, switch_2, switch_3][: len(chain) - 1]
        check_same_space(chain)
        stitched = stitch_models(chain, fractions, switch_by, conditioning[: len(chain)], history,
                                 release_after_switch)  # fmt: skip
        return io.NodeOutput(stitched)
