"""Which network a MODEL holds and where its self-attention layers are, in ComfyUI's patch-key terms."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Architecture:
    """family: 'unet' or 'dit'. For UNets, depth per (block, number) holding attention; for DiTs, the number of
    blocks per `patches_replace["dit"]` kind and whether joint attention puts text tokens first."""

    name: str
    family: str
    unet_depths: dict[tuple[str, int], int] = field(default_factory=dict)
    dit_blocks: dict[str, int] = field(default_factory=dict)
    text_first_joint: bool = False


# DiT classes whose blocks ComfyUI keys as ("double_block" | "single_block", i) and whose self/joint attention
# goes through optimized_attention with transformer_options: (module, class) -> (stacks, text-first joint attention)
_DITS = {
    ("comfy.ldm.flux.model", "Flux"): ({"double_block": "double_blocks", "single_block": "single_blocks"}, True),
    ("comfy.ldm.chroma.model", "Chroma"): ({"double_block": "double_blocks", "single_block": "single_blocks"}, True),
    ("comfy.ldm.modules.diffusionmodules.mmdit", "MMDiT"): ({"double_block": "joint_blocks"}, True),
    ("comfy.ldm.wan.model", "WanModel"): ({"double_block": "blocks"}, False),
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
    for cls in type(net).__mro__:
        if (cls.__module__, cls.__name__) == ("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel"):
            return Architecture(type(net).__name__, "unet", unet_depths=_unet_depths(net))
        if (cls.__module__, cls.__name__) in _DITS:
            stacks, text_first = _DITS[(cls.__module__, cls.__name__)]
            counts = {kind: len(getattr(net, attr)) for kind, attr in stacks.items() if hasattr(net, attr)}
            return Architecture(type(net).__name__, "dit", dit_blocks=counts, text_first_joint=text_first)
    supported = ["UNetModel (SD1.x, SDXL)"] + [name for _, name in _DITS]
    raise ValueError(
        f"model: unsupported architecture {type(net).__module__}.{type(net).__name__}; "
        f"supported: {', '.join(supported)}"
    )
