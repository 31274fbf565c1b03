"""Which network a MODEL holds and where its self-attention layers are, in ComfyUI's patch-key terms.

DiTs are supported where ComfyUI's forward reads `patches_replace["dit"]` (the block marker) and the block's first
attention call passes transformer_options to optimized_attention (the perturbation): see `_DITS`. Not supported,
with a clear error: HunYuanDiT (its attention gets no transformer_options), DiTs whose forward reads no
`patches_replace["dit"]` (PixArt, Lumina 2, HiDream, Cosmos, ...), and audio and 3-D DiTs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Architecture:
    """family: 'unet' or 'dit'. For UNets, depth per (block, number) holding attention. For DiTs, the number of blocks
    per `patches_replace["dit"]` kind; joint_layout, how the first attention of a block orders its tokens ('none':
    image self-attention; 'text_first' / 'image_first': joint text + image attention); auto_block, the block of the
    main stack ("double_block") that layers = "auto" perturbs; solo_cond, a model input (ComfyUI model_conds key)
    that the network cannot take for more than one batch row, so a conditioning that carries it is never batched
    with its own perturbed copy."""

    name: str
    family: str
    unet_depths: dict[tuple[str, int], int] = field(default_factory=dict)
    dit_blocks: dict[str, int] = field(default_factory=dict)
    joint_layout: str = "none"
    auto_block: int = 1
    solo_cond: str | None = None


@dataclass(frozen=True)
class DiTFamily:
    """label: the models, for messages; stacks: `patches_replace["dit"]` kind -> the network's block list attribute."""

    label: str
    stacks: dict[str, str]
    joint_layout: str
    auto_block: int = 1  # block 1 of the main stack (diffusers' PAG default for SD3, PixArt and HunyuanDiT)
    solo_cond: str | None = None


_FLUX_STACKS = {"double_block": "double_blocks", "single_block": "single_blocks"}

# DiT classes (subclasses included: Flux2, ChromaRadiance, the Wan variants, ...) whose forward reads
# `patches_replace["dit"]` and whose blocks' first attention call goes through optimized_attention with
# transformer_options, so the attention override reaches it. Checked in ComfyUI 0.3.75's source.
_DITS = {
    ("comfy.ldm.flux.model", "Flux"): DiTFamily("Flux (Flux.1, Flux.2)", _FLUX_STACKS, "text_first"),
    ("comfy.ldm.chroma.model", "Chroma"): DiTFamily("Chroma", _FLUX_STACKS, "text_first"),
    ("comfy.ldm.modules.diffusionmodules.mmdit", "MMDiT"): DiTFamily(
        "SD3 (MMDiT)", {"double_block": "joint_blocks"}, "text_first"
    ),
    ("comfy.ldm.wan.model", "WanModel"): DiTFamily("Wan", {"double_block": "blocks"}, "none"),
    # Qwen-Image: one joint stack, [txt, img].
    ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel"): DiTFamily(
        "Qwen-Image", {"double_block": "transformer_blocks"}, "text_first"
    ),
    # HunyuanVideo (also HunyuanVideo 1.5 and HunyuanImage 2.1): Flux-like blocks built with flipped_img_txt, so
    # double blocks attend over [img, txt] and single blocks run on [img, txt]. Its forward writes a text padding
    # mask into a one-row attention mask, so a batch of two rows with such a mask fails inside ComfyUI.
    ("comfy.ldm.hunyuan_video.model", "HunyuanVideo"): DiTFamily(
        "HunyuanVideo (1.0, 1.5, HunyuanImage 2.1)", _FLUX_STACKS, "image_first", solo_cond="attention_mask"
    ),
    # LTXV: attn1 is plain self-attention over the video tokens. Auto: block 19, where LTX-Video's own 2B configs
    # apply spatiotemporal guidance in its "attention_values" mode, which is this same identity perturbation.
    ("comfy.ldm.lightricks.model", "LTXVModel"): DiTFamily("LTXV", {"double_block": "transformer_blocks"}, "none", 19),
    # AuraFlow: joint layers on [register tokens + txt, img], then single layers on the same concatenation.
    ("comfy.ldm.aura.mmdit", "MMDiT"): DiTFamily(
        "AuraFlow", {"double_block": "double_layers", "single_block": "single_layers"}, "text_first"
    ),
    # Mochi: asymmetric widths, but after the projections one joint attention over [img, txt[:num_tokens]].
    ("comfy.ldm.genmo.joint_model.asymm_models_joint", "AsymmDiTJoint"): DiTFamily(
        "Mochi", {"double_block": "blocks"}, "image_first"
    ),
}

# DiTs that read `patches_replace["dit"]` but cannot be perturbed this way: why, for the error message.
_UNSUPPORTED_DITS = {
    ("comfy.ldm.hydit.models", "HunYuanDiT"): "ComfyUI calls its attention without transformer_options (and its "
    "block replace gets none), so no attention override can reach it",
}


def diffusion_model_of(model):
    return model.get_model_object("diffusion_model")


def _unet_depths(net) -> dict[tuple[str, int], int]:
    depths = {}
    stacks = [("input", net.input_blocks), ("middle", [net.middle_block]), ("output", net.output_blocks)]
    for block, modules in stacks:
        for number, module in enumerate(modules):
            transformers = [m for m in module.modules() if hasattr(m, "transformer_blocks")]
            if transformers:
                depths[(block, number)] = len(transformers[0].transformer_blocks)
    return depths


def detect_architecture(model) -> Architecture:
    """Classify a MODEL's network; raise ValueError naming the supported ones for anything else."""
    net = diffusion_model_of(model)
    name = f"{type(net).__module__}.{type(net).__name__}"
    for cls in type(net).__mro__:
        key = (cls.__module__, cls.__name__)
        if key == ("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel"):
            return Architecture(type(net).__name__, "unet", unet_depths=_unet_depths(net))
        if key in _DITS:
            family = _DITS[key]
            counts = {kind: len(getattr(net, attr)) for kind, attr in family.stacks.items() if hasattr(net, attr)}
            return Architecture(type(net).__name__, "dit", dit_blocks=counts, joint_layout=family.joint_layout,
                                auto_block=family.auto_block, solo_cond=family.solo_cond)  # fmt: skip
        if key in _UNSUPPORTED_DITS:
            raise ValueError(f"model: unsupported architecture {name}: {_UNSUPPORTED_DITS[key]}")
    supported = ["UNetModel (SD1.x, SDXL)"] + [family.label for family in _DITS.values()]
    raise ValueError(f"model: unsupported architecture {name}; supported: {', '.join(supported)}")
