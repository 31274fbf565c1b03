"""TL_PerturbedAttention: Perturbed-Attention Guidance on UNets and DiTs, with the perturbed pass batched.

How it hooks ComfyUI (all on a clone; other packs' patches are chained, never dropped):
- a CALC_COND_BATCH wrapper appends the conditional chunk a third time, labelled PERTURBED_LABEL, so the
  perturbed prediction rides in the same forward call as cond/uncond (batched) or in a second call;
- UNets: an attn1 replace on the chosen blocks returns V for rows of that chunk;
- DiTs: a `dit` block replace marks the chosen blocks, and an optimized_attention override makes the first
  attention inside a marked block the identity for those rows;
- a post-CFG function adds s_t (D_cond - D_pert) to the guided result.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_patcher
import comfy.patcher_extension
import torch
from comfy_api.latest import io

from ..guidance.perturbed_attention import (
    UNET_BLOCKS,
    DiTLayer,
    UNetLayer,
    adaptive_scale,
    identity_attention,
    merge_heads,
    pag_guided,
    parse_dit_layers,
    parse_unet_layers,
    perturbed_row_mask,
    split_heads,
)
from .architectures import Architecture, detect_architecture

WRAPPER_KEY = "trajectory_lab.perturbed_attention"
PERTURBED_STASH = "trajectory_lab.pag_perturbed"  # model_options entry: this step's perturbed prediction
ACTIVE_BLOCK = "trajectory_lab.pag_block"  # transformer_options entry while a chosen DiT block runs
AUTO_DIT_BLOCK = 1  # "auto" on DiTs: block 1 of the main stack (diffusers' SD3 default), or 0 if there is one


def resolve_unet_layers(arch: Architecture, spec: str) -> list[UNetLayer]:
    """The UNet layers a spec names; a clear error if it names none or one that is absent."""
    spec = spec.strip()
    letter = {name: key for key, name in UNET_BLOCKS.items()}
    valid = ", ".join(f"{letter[b]}{n} (depth {d})" for (b, n), d in arch.unet_depths.items())
    unet_layers = [UNetLayer("middle", 0)] if spec.lower() in ("", "auto") else parse_unet_layers(spec)
    for layer in unet_layers:
        depth = arch.unet_depths.get((layer.block, layer.number))
        if depth is None:
            raise ValueError(f"layers: {layer.block} block {layer.number} has no self-attention in {arch.name}; "
                             f"blocks with attention: {valid}")  # fmt: skip
        if layer.transformer_indices and max(layer.transformer_indices) >= depth:
            raise ValueError(f"layers: {layer.block} block {layer.number} has transformer indices 0..{depth - 1}, "
                             f"not {max(layer.transformer_indices)}")  # fmt: skip
    if not unet_layers:
        raise ValueError(f"layers: {spec!r} names no layer; blocks with attention: {valid}")
    return unet_layers


def resolve_dit_layers(arch: Architecture, spec: str) -> list[DiTLayer]:
    """The DiT blocks a spec names; a clear error if it names none or one that is absent."""
    spec = spec.strip()
    counts = arch.dit_blocks
    valid = ", ".join(f"{kind.split('_')[0]}0-{n - 1}" for kind, n in counts.items() if n)
    if spec.lower() in ("", "auto"):
        return [DiTLayer("double_block", min(AUTO_DIT_BLOCK, counts["double_block"] - 1))]
    dit_layers = parse_dit_layers(spec)
    for layer in dit_layers:
        if layer.index >= counts.get(layer.kind, 0):
            raise ValueError(f"layers: {arch.name} has no {layer.kind.replace('_', ' ')} {layer.index}; valid: {valid}")
    if not dit_layers:
        raise ValueError(f"layers: {spec!r} names no layer; valid: {valid}")
    return dit_layers


@dataclass(frozen=True)
class PAGSchedule:
    scale: float
    adaptive: float
    sigma_start: float
    sigma_end: float
    timestep_max: float

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    def scale_at(self, model_sampling, sigma: torch.Tensor) -> float:
        if self.adaptive == 0:
            return self.scale
        t = float(model_sampling.timestep(sigma[:1]).item())
        return adaptive_scale(self.scale, self.adaptive, 1000.0 * t / self.timestep_max)


def _labels(options: dict) -> list[int]:
    return list(options.get("cond_or_uncond", []))


def _unet_attn1(previous):
    """attn1 replace: V for the perturbed rows; the previous replace (or plain attention) for the others."""

    def attn1(q, k, v, extra_options):
        rows = perturbed_row_mask(_labels(extra_options), q.shape[0], q.device)

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


def _dit_block(previous, text_first: bool):
    """dit block replace: marks the block so the attention override perturbs its first attention call."""

    def block(args, extra):
        options = args["transformer_options"]
        text_tokens = args["txt"].shape[1] if text_first and "txt" in args else options.get(ACTIVE_BLOCK + ".text", 0)
        state = {"calls": 0, "text_tokens": text_tokens}
        outer = options.get(ACTIVE_BLOCK)
        options[ACTIVE_BLOCK] = state
        try:
            out = previous(args, extra) if previous is not None else extra["original_block"](args)
        finally:
            options[ACTIVE_BLOCK] = outer
        if state["calls"] == 0 and perturbed_row_mask(_labels(options), args["img"].shape[0]).any():
            raise RuntimeError("TL_PerturbedAttention: a selected block ran no attention through ComfyUI's "
                               "optimized_attention with transformer_options, so it cannot be perturbed")  # fmt: skip
        return out

    block.tl_previous = previous  # type: ignore[attr-defined]
    return block


def _record_text_tokens(previous):
    """Replace for double blocks ahead of selected single blocks: single blocks see [txt, img] concatenated
    without a split, so the text length is taken from the double blocks' inputs."""

    def block(args, extra):
        args["transformer_options"][ACTIVE_BLOCK + ".text"] = args["txt"].shape[1]
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
        rows = perturbed_row_mask(_labels(options), q.shape[0], q.device)
        if not rows.any():
            return run(*args, **kwargs)
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        skip_reshape, skip_output_reshape = kwargs.get("skip_reshape", False), kwargs.get("skip_output_reshape", False)
        qh, kh, vh = (t[rows] if skip_reshape else split_heads(t[rows], heads) for t in (q, k, v))
        perturbed = identity_attention(qh, kh, vh, state["text_tokens"])
        perturbed = perturbed if skip_output_reshape else merge_heads(perturbed)
        if rows.all():
            return perturbed
        keep = ~rows
        mask = kwargs.get("mask")
        if isinstance(mask, torch.Tensor) and mask.ndim >= 3 and mask.shape[0] == q.shape[0]:
            kwargs = {**kwargs, "mask": mask[keep]}
        normal = run(q[keep], k[keep], v[keep], *args[3:], **kwargs)
        out = normal.new_empty((q.shape[0], *normal.shape[1:]))
        out[keep], out[rows] = normal, perturbed.to(normal.dtype)
        return out

    override.tl_previous = previous  # type: ignore[attr-defined]
    return override


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

    transformer_options = m.model_options["transformer_options"] = dict(m.model_options.get("transformer_options", {}))
    replace = transformer_options.get("patches_replace", {})
    if unet_layers:
        attn1 = replace.get("attn1", {})
        for layer in unet_layers:
            indices = layer.transformer_indices or (None,)
            for index in indices:
                key = (layer.block, layer.number) + (() if index is None else (index,))
                m.set_model_attn1_replace(_unet_attn1(_unwrap(attn1.get(key))), layer.block, layer.number, index)
    else:
        dit = replace.get("dit", {})
        for dit_layer in dit_layers:
            key = (dit_layer.kind, dit_layer.index)
            m.set_model_patch_replace(_dit_block(_unwrap(dit.get(key)), arch.text_first_joint), "dit", *key)
        if arch.text_first_joint and any(la.kind == "single_block" for la in dit_layers):
            last = ("double_block", arch.dit_blocks["double_block"] - 1)
            if last not in {(la.kind, la.index) for la in dit_layers}:
                m.set_model_patch_replace(_record_text_tokens(_unwrap(dit.get(last))), "dit", *last)
        options = m.model_options["transformer_options"] = dict(m.model_options["transformer_options"])
        options["optimized_attention_override"] = _attention_override(
            _unwrap(options.get("optimized_attention_override"))
        )

    model_sampling = m.get_model_object("model_sampling")
    schedule = PAGSchedule(
        scale, adaptive, model_sampling.percent_to_sigma(start_percent), model_sampling.percent_to_sigma(end_percent),
        float(model_sampling.timestep(model_sampling.sigma_max.reshape(1)).item()),
    )  # fmt: skip

    def add_perturbed_chunk(executor, model_, conds, x_in, timestep, model_options):
        # Only the guider's own [cond, uncond] call; nested calls (e.g. another PAG's) pass through.
        if len(conds) != 2 or conds[0] is None or not schedule.active(float(timestep.flatten()[0])):
            return executor(model_, conds, x_in, timestep, model_options)
        if batched:
            out = executor(model_, [conds[0], conds[1], conds[0]], x_in, timestep, model_options)
        else:
            out = executor(model_, conds, x_in, timestep, model_options)
            out = out + [executor(model_, [None, None, conds[0]], x_in, timestep, model_options)[2]]
        model_options[PERTURBED_STASH] = out[2]
        return out[:2]

    def add_guidance(args):
        perturbed = args["model_options"].pop(PERTURBED_STASH, None)
        if perturbed is None:
            return args["denoised"]
        s = schedule.scale_at(model_sampling, args["sigma"])
        return pag_guided(args["input"], args["sigma"], args["denoised"], args["cond_denoised"], perturbed, s, rescale)

    add_guidance.tl_pag = True  # type: ignore[attr-defined]
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, add_perturbed_chunk)
    m.set_model_sampler_post_cfg_function(add_guidance)
    return m


def _remove_previous(m) -> None:
    """Drop an earlier TL_PerturbedAttention's wrapper and post-CFG function from a clone (ours only)."""
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY)
    post = m.model_options.get("sampler_post_cfg_function")
    if post:
        m.model_options["sampler_post_cfg_function"] = [f for f in post if not _ours(f)]


class PerturbedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_PerturbedAttention",
            display_name="Perturbed-Attention Guidance (Trajectory Lab)",
            category="trajectory_lab/guidance",
            description=(
                "Perturbed-Attention Guidance (Ahn et al. 2024) on SD1.x/SDXL UNets and SD3, Flux, Wan DiTs: "
                "adds scale * (cond - perturbed cond), where the perturbed prediction replaces the chosen "
                "self-attention maps by the identity. The perturbed pass rides in the same forward call as CFG."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A UNet (SD1.x, SDXL) or DiT (SD3, Flux, Wan) model to patch."),
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
                    tooltip="s_t = max(0, s - a * (1000 - t)), t the timestep on a 0..1000 noise scale: "
                    "fades PAG out as noise falls. 0 = constant scale.",
                ),
                io.String.Input(
                    "layers",
                    default="auto",
                    tooltip="auto = UNet middle block / DiT block 1. UNet: m0, u0.4, d2.2-9 "
                    "(input d, middle m, output u; .t = transformer index). "
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
