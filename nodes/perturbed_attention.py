"""TL_PerturbedAttention: Perturbed-Attention Guidance on UNets and DiTs, with the perturbed pass batched.

How it hooks ComfyUI (all on a clone; other packs' patches are chained, never dropped):
- a CALC_COND_BATCH wrapper appends the positive conditioning once more, last, so the perturbed prediction rides
  in the same forward call as the guider's other conds (batched) or in a second call; its label goes into
  transformer_options[PERTURBED_LABEL];
- UNets: an attn1 replace on the chosen blocks returns V for rows of that chunk;
- DiTs: a `dit` block replace marks the chosen blocks, and an optimized_attention override makes the first
  attention inside a marked block the identity for those rows (honouring the attention mask). That call is the
  block's self-attention, or its joint text + image attention with the text first or last (Architecture.joint_layout),
  whose text length the joint (double) blocks' inputs give;
- CFGGuider (KSampler, CFGGuider, BasicGuider): a post-CFG function adds s_t (D_cond - D_pert) to the guided
  result; guiders with their own predict_noise (DualCFG, PerpNeg, ...): a PREDICT_NOISE wrapper adds
  s_t (D_positive - D_pert) to the guider's result, with its "positive" conditioning (DualCFG's cond1) perturbed.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_sampling
import comfy.patcher_extension
import comfy.samplers
import torch
from comfy_api.latest import io

from ..guidance.perturbed_attention import (
    DiTLayer,
    UNetLayer,
    adaptive_scale,
    comfy_unet_layers,
    describe_unet_blocks,
    identity_attention,
    merge_heads,
    pag_guided,
    parse_dit_layers,
    parse_unet_layers,
    perturbed_row_mask,
    split_heads,
)
from .architectures import Architecture, detect_architecture
from .guiders import is_plain_cfg_guider

WRAPPER_KEY = "trajectory_lab.perturbed_attention"
PERTURBED_STASH = "trajectory_lab.pag_perturbed"  # model_options entry: this step's perturbed prediction
GUIDER_STEP = "trajectory_lab.pag_guider_step"  # model_options entry while a guider's own predict_noise runs
PERTURBED_LABEL = "trajectory_lab.pag_label"  # transformer_options entry: the perturbed chunk's cond_or_uncond label
ACTIVE_BLOCK = "trajectory_lab.pag_block"  # transformer_options entry while a chosen DiT block runs
TEXT_TOKENS = "trajectory_lab.pag_text_tokens"  # transformer_options entry: text length, recorded by double blocks


def resolve_unet_layers(arch: Architecture, spec: str) -> list[UNetLayer]:
    """The UNet layers a spec names, as ComfyUI block numbers; a clear error if it names none or one that is absent."""
    spec = spec.strip()
    layers = [UNetLayer("middle", 0)] if spec.lower() in ("", "auto") else parse_unet_layers(spec)
    if not layers:
        raise ValueError(f"layers: {spec!r} names no layer; valid: {describe_unet_blocks(arch.unet_depths)}")
    return comfy_unet_layers(layers, arch.unet_depths)


def resolve_dit_layers(arch: Architecture, spec: str) -> list[DiTLayer]:
    """The DiT blocks a spec names; a clear error if it names none or one that is absent."""
    spec = spec.strip()
    counts = arch.dit_blocks
    valid = ", ".join(f"{kind.split('_')[0]}0-{n - 1}" for kind, n in counts.items() if n)
    if spec.lower() in ("", "auto"):
        # the architecture's auto block of the main stack, or its last block on a model with fewer
        return [DiTLayer("double_block", min(arch.auto_block, counts["double_block"] - 1))]
    dit_layers = parse_dit_layers(spec)
    for layer in dit_layers:
        if layer.index >= counts.get(layer.kind, 0):
            raise ValueError(f"layers: {arch.name} has no {layer.kind.replace('_', ' ')} {layer.index}; valid: {valid}")
    if not dit_layers:
        raise ValueError(f"layers: {spec!r} names no layer; valid: {valid}")
    return dit_layers


def timestep_1000(model_sampling, sigma: torch.Tensor) -> float:
    """The model timestep on diffusers' 0..1000 scale, which the adaptive scale is defined on: the raw timestep
    of a discrete schedule (0..999 for SD1.x/SDXL, as diffusers' schedulers give it), else (flow and continuous
    models) the timestep relative to the one at sigma_max, times 1000 (1000 sigma for Flux, SD3, Wan)."""
    t = float(model_sampling.timestep(sigma[:1]).item())
    if type(model_sampling).timestep is comfy.model_sampling.ModelSamplingDiscrete.timestep:
        return t * 1000.0 / model_sampling.num_timesteps
    return t * 1000.0 / float(model_sampling.timestep(model_sampling.sigma_max.reshape(1)).item())


@dataclass(frozen=True)
class PAGSchedule:
    scale: float
    adaptive: float
    sigma_start: float
    sigma_end: float

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def scale_at(self, model_sampling, sigma: torch.Tensor) -> float:
        if self.adaptive == 0:
            return self.scale
        return adaptive_scale(self.scale, self.adaptive, timestep_1000(model_sampling, sigma))


@dataclass
class GuiderStep:
    """One predict_noise call of a guider with its own combination (DualCFG, PerpNeg, ...): which conditioning is
    its positive, and what the perturbed pass found for it."""

    positive: list
    cond: torch.Tensor | None = None
    perturbed: torch.Tensor | None = None


def _perturbed_rows(options: dict, batch: int, device=None) -> torch.Tensor:
    labels = list(options.get("cond_or_uncond", []))
    return perturbed_row_mask(labels, batch, options.get(PERTURBED_LABEL), device)


def _rows_of(mask, rows: torch.Tensor):
    """The rows of an attention mask that go with the selected batch rows (a mask without a batch axis is shared)."""
    if isinstance(mask, torch.Tensor) and mask.ndim >= 3 and mask.shape[0] == rows.shape[0]:
        return mask[rows]
    return mask


def _unet_attn1(previous):
    """attn1 replace: V for the perturbed rows; the previous replace (or plain attention) for the others."""

    def attn1(q, k, v, extra_options):
        rows = _perturbed_rows(extra_options, q.shape[0], q.device)

        def normal(q_, k_, v_):
            if previous is not None:
                return previous(q_, k_, v_, extra_options)
            return comfy_attention.optimized_attention(
                q_, k_, v_, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                transformer_options=extra_options,
            )  # fmt: skip

        if not rows.any():
            return normal(q, k, v)
        out = v.clone()
        if not rows.all():
            keep = ~rows
            out[keep] = normal(q[keep], k[keep], v[keep]).to(out.dtype)
        return out

    attn1.tl_previous = previous  # type: ignore[attr-defined]
    return attn1


def _joint_text_tokens(args) -> int:
    """The text tokens a joint block's attention sees: all of args["txt"], except on Mochi, whose blocks attend only
    to the first args["num_tokens"] of them (the prompt's unpadded tokens)."""
    tokens = args["txt"].shape[1]
    return min(tokens, int(args["num_tokens"])) if "num_tokens" in args else tokens


def _dit_block(previous, joint_layout: str):
    """dit block replace: marks the block so the attention override perturbs its first attention call."""
    joint = joint_layout != "none"

    def block(args, extra):
        options = args["transformer_options"]
        if joint and "txt" in args:  # a joint block: record the text length for the single blocks after it
            options[TEXT_TOKENS] = _joint_text_tokens(args)
        text_tokens = options.get(TEXT_TOKENS) if joint else 0
        if text_tokens is None:  # never guess: a wrong length would perturb text rows too
            raise RuntimeError("TL_PerturbedAttention: no double block recorded the text length before this block")
        state = {"calls": 0, "text_tokens": text_tokens, "text_first": joint_layout == "text_first"}
        outer = options.get(ACTIVE_BLOCK)
        options[ACTIVE_BLOCK] = state
        try:
            out = previous(args, extra) if previous is not None else extra["original_block"](args)
        finally:
            options[ACTIVE_BLOCK] = outer
        if state["calls"] == 0 and _perturbed_rows(options, args["img"].shape[0]).any():
            raise RuntimeError("TL_PerturbedAttention: a selected block ran no attention through ComfyUI's "
                               "optimized_attention with transformer_options, so it cannot be perturbed")  # fmt: skip
        return out

    block.tl_previous = previous  # type: ignore[attr-defined]
    return block


def _record_text_tokens(previous):
    """Replace for unselected double blocks when single blocks are selected: single blocks see text and image
    tokens concatenated without a split, so the text length is taken from the double blocks' inputs."""

    def block(args, extra):
        args["transformer_options"][TEXT_TOKENS] = _joint_text_tokens(args)
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    block.tl_previous = previous  # type: ignore[attr-defined]
    return block


def _attention_override(previous):
    def override(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        state = options.get(ACTIVE_BLOCK)
        run = (lambda *a, **kw: previous(func, *a, **kw)) if previous is not None else func
        if state is None or state["calls"] > 0:  # not a selected block, or not its self/joint attention
            return run(*args, **kwargs)
        state["calls"] += 1
        q, k, v = args[:3]
        rows = _perturbed_rows(options, q.shape[0], q.device)
        if not rows.any():
            return run(*args, **kwargs)
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        args, kwargs = args[:4], {**kwargs, "mask": args[4] if len(args) > 4 else kwargs.get("mask")}
        skip_reshape, skip_output_reshape = kwargs.get("skip_reshape", False), kwargs.get("skip_output_reshape", False)
        qh, kh, vh = (t[rows] if skip_reshape else split_heads(t[rows], heads) for t in (q, k, v))
        mask = _rows_of(kwargs["mask"], rows)
        perturbed = identity_attention(qh, kh, vh, state["text_tokens"], mask, text_first=state["text_first"])
        perturbed = perturbed if skip_output_reshape else merge_heads(perturbed)
        if rows.all():
            return perturbed
        keep = ~rows
        normal = run(q[keep], k[keep], v[keep], *args[3:], **{**kwargs, "mask": _rows_of(kwargs["mask"], keep)})
        out = normal.new_empty((q.shape[0], *normal.shape[1:]))
        out[keep], out[rows] = normal, perturbed.to(normal.dtype)
        return out

    override.tl_previous = previous  # type: ignore[attr-defined]
    return override


def _carries(cond: list, key: str | None) -> bool:
    """Whether a conditioning (ComfyUI's processed list of cond dicts) gives the model the input `key`."""
    return key is not None and any(key in c.get("model_conds", {}) for c in cond)


def _replace_in_place(m, kind: str, key: tuple):
    """The patches_replace entry (another pack's, or ComfyUI's) that a patch of ours at `key` chains to."""
    return m.model_options["transformer_options"].get("patches_replace", {}).get(kind, {}).get(key)


def _ours(fn) -> bool:
    return hasattr(fn, "tl_previous") or getattr(fn, "tl_pag", False)


def _unwrap(fn):
    """The patch that stood before ours (re-applying the node replaces its earlier patches, keeps others')."""
    while fn is not None and hasattr(fn, "tl_previous"):
        fn = fn.tl_previous
    return fn


def apply_perturbed_attention(
    model, scale: float, adaptive: float, layers: str, start_percent: float, end_percent: float, rescale: float,
    batched: bool,
):  # fmt: skip
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy "
                         "0 <= start_percent <= end_percent <= 1")  # fmt: skip
    arch = detect_architecture(model)
    unet_layers = resolve_unet_layers(arch, layers) if arch.family == "unet" else []
    dit_layers = resolve_dit_layers(arch, layers) if arch.family == "dit" else []
    m = model.clone()
    _remove_previous(m)
    if scale == 0:
        return m  # nothing to add: the plain model, at plain cost

    if unet_layers:
        for layer in unet_layers:
            for index in layer.transformer_indices or (None,):
                key = (layer.block, layer.number) + (() if index is None else (index,))
                m.set_model_attn1_replace(_unet_attn1(_replace_in_place(m, "attn1", key)), layer.block, layer.number,
                                          index)  # fmt: skip
    else:
        selected = {(la.kind, la.index) for la in dit_layers}
        recorders = set()
        if arch.joint_layout != "none" and any(kind == "single_block" for kind, _ in selected):
            recorders = {("double_block", i) for i in range(arch.dit_blocks["double_block"])} - selected
        for key in sorted(selected | recorders):
            previous = _replace_in_place(m, "dit", key)
            patch = _dit_block(previous, arch.joint_layout) if key in selected else _record_text_tokens(previous)
            m.set_model_patch_replace(patch, "dit", *key)
        options = m.model_options["transformer_options"] = dict(m.model_options["transformer_options"])
        options["optimized_attention_override"] = _attention_override(options.get("optimized_attention_override"))

    model_sampling = m.get_model_object("model_sampling")
    schedule = PAGSchedule(
        scale, adaptive, model_sampling.percent_to_sigma(start_percent), model_sampling.percent_to_sigma(end_percent)
    )

    def add_perturbed_chunk(executor, model_, conds, x_in, timestep, model_options):
        """Evaluate the positive conditioning a second time, perturbed, in the same call or a second one."""
        step = model_options.get(GUIDER_STEP)
        if step is not None:  # a guider's own predict_noise: its positive, wherever it sits in conds, once a step
            found = [i for i, c in enumerate(conds) if c is step.positive]
            index = found[0] if found and step.cond is None else None
        else:  # CFGGuider's sampling_function: [cond, uncond or None]; other calls (another PAG's) pass through
            index = 0 if len(conds) == 2 and conds[0] is not None else None
        if index is None or not schedule.active(float(timestep.flatten()[0])):
            return executor(model_, conds, x_in, timestep, model_options)
        label = len(conds)  # the perturbed chunk goes last, so ComfyUI labels its rows len(conds)
        transformer_options = {**model_options.get("transformer_options", {}), PERTURBED_LABEL: label}
        perturbed_options = {**model_options, "transformer_options": transformer_options}
        if batched and not _carries(conds[index], arch.solo_cond):
            out = executor(model_, [*conds, conds[index]], x_in, timestep, perturbed_options)
        else:
            out = executor(model_, conds, x_in, timestep, model_options)
            out = out + [executor(model_, [None] * label + [conds[index]], x_in, timestep, perturbed_options)[label]]
        if step is not None:
            step.cond, step.perturbed = out[index], out[label]
        else:
            model_options[PERTURBED_STASH] = out[label]
        return out[:label]

    def add_guidance(args):
        """CFGGuider: D = D_cfg + s_t (D_cond - D_pert), as a post-CFG function."""
        perturbed = args["model_options"].pop(PERTURBED_STASH, None)
        if perturbed is None:
            return args["denoised"]
        s = schedule.scale_at(model_sampling, args["sigma"])
        return pag_guided(args["input"], args["sigma"], args["denoised"], args["cond_denoised"], perturbed, s, rescale)

    def guide_own_predict_noise(executor, x, timestep, model_options, seed):
        """Guiders with their own combination (DualCFG, PerpNeg, ...): their result + s_t (D_positive - D_pert),
        with the guider's "positive" conditioning (DualCFG's cond1) perturbed."""
        guider = executor.class_obj
        if is_plain_cfg_guider(guider) or not schedule.active(float(timestep.flatten()[0])):
            return executor(x, timestep, model_options, seed)
        positive = guider.conds.get("positive")
        if positive is None:
            raise ValueError(f"TL_PerturbedAttention: the guider {type(guider).__name__} has no 'positive' "
                             "conditioning, so there is no conditional prediction to perturb")  # fmt: skip
        step = GuiderStep(positive)
        denoised = executor(x, timestep, {**model_options, GUIDER_STEP: step}, seed)
        if step.cond is None or step.perturbed is None:  # this step never evaluated the positive prompt
            return denoised
        s = schedule.scale_at(model_sampling, timestep)
        return pag_guided(x, timestep, denoised, step.cond, step.perturbed, s, rescale)

    add_guidance.tl_pag = True  # type: ignore[attr-defined]
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, add_perturbed_chunk)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, guide_own_predict_noise)
    m.set_model_sampler_post_cfg_function(add_guidance)
    return m


def _remove_previous(m) -> None:
    """Remove an earlier TL_PerturbedAttention's patches from a clone, putting back the ones ours chained to."""
    for kind in (comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, comfy.patcher_extension.WrappersMP.PREDICT_NOISE):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
    post = m.model_options.get("sampler_post_cfg_function")
    if post:
        m.model_options["sampler_post_cfg_function"] = [f for f in post if not _ours(f)]
    options = m.model_options["transformer_options"] = dict(m.model_options.get("transformer_options", {}))
    replace = options["patches_replace"] = dict(options.get("patches_replace", {}))
    for name in ("attn1", "dit"):
        if name not in replace:
            continue
        kept = {key: _unwrap(fn) if _ours(fn) else fn for key, fn in replace[name].items()}
        replace[name] = {key: fn for key, fn in kept.items() if fn is not None}
        if not replace[name]:
            del replace[name]
    if not replace:
        del options["patches_replace"]
    override = options.get("optimized_attention_override")
    if override is not None and _ours(override):
        if _unwrap(override) is None:
            del options["optimized_attention_override"]
        else:
            options["optimized_attention_override"] = _unwrap(override)


class PerturbedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_PerturbedAttention",
            display_name="Perturbed-Attention Guidance (Trajectory Lab)",
            category="trajectory_lab/guidance",
            description=(
                "Perturbed-Attention Guidance (Ahn et al. 2024) on SD1.x/SDXL UNets and on SD3, Flux, Chroma, Wan, "
                "Qwen-Image, HunyuanVideo, LTXV, AuraFlow and Mochi DiTs: "
                "adds scale * (cond - perturbed cond), where the perturbed prediction replaces the chosen "
                "self-attention maps by the identity. The perturbed pass rides in the same forward call as CFG."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="A UNet (SD1.x, SDXL) or DiT (SD3, Flux, Chroma, Wan, Qwen-Image, "
                    "HunyuanVideo, LTXV, AuraFlow, Mochi) model to patch.",
                ),
                io.Float.Input(
                    "scale",
                    default=3.0,
                    min=0.0,
                    max=100.0,
                    step=0.01,
                    round=0.01,
                    tooltip="PAG scale s: 3 with CFG, about 5 alone (cfg 1). 0 = off.",
                ),
                io.Float.Input(
                    "adaptive_scale",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.0001,
                    round=0.0001,
                    tooltip="s_t = max(0, s - a * (1000 - t)), t the model timestep on diffusers' 0..1000 scale "
                    "(SD1.x/SDXL: the raw timestep; flow models: 1000 sigma): fades PAG out as noise falls. "
                    "0 = constant scale.",
                ),
                io.String.Input(
                    "layers",
                    default="auto",
                    tooltip="auto = UNet middle block / DiT block 1 (LTXV: block 19). UNet: m0, u0.4, d2.2-9 "
                    "(input d, middle m, output u, counting only blocks with attention, as "
                    "sd-perturbed-attention does: SDXL d2 = input block 7; .t = transformer index). "
                    "DiT: double1, single0-3, block5.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Start of the PAG window (fraction of the schedule). Outside the window "
                    "a step costs exactly what plain CFG costs.",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="End of the PAG window (fraction of the schedule).",
                ),
                io.Float.Input(
                    "rescale",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Guidance rescale of the PAG result toward the conditional prediction's "
                    "std (on the noise prediction). 0 = off.",
                ),
                io.Boolean.Input(
                    "batched",
                    default=True,
                    tooltip="Run the perturbed pass in the same forward call as cond/uncond "
                    "(faster where the GPU is not saturated); off = a separate call.",
                ),
            ],  # fmt: skip
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, adaptive_scale, layers, start_percent, end_percent, rescale, batched):
        patched = apply_perturbed_attention(
            model, scale, adaptive_scale, layers, start_percent, end_percent, rescale, batched
        )
        return io.NodeOutput(patched)
