"""The ComfyUI layer: one module per technique (V3 schemas, thin execute()) and the extension listing them."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .demo_features import NODES as DEMO_FEATURE_NODES
from .demo_models import NODES as DEMO_NODES
from .demo_video import NODES as DEMO_VIDEO_NODES
from .diffusehigh import DiffuseHigh
from .feynman_kac import FKCGuider, FKCSampler
from .flowturbo import FlowTurboSampler, LoadVelocityRefiner, TrainVelocityRefiner
from .multitext_video import MultiTextVideo, PromptSequenceNode
from .perturbed_attention import PerturbedAttention
from .trajectory_stitching import TStitchChain, TStitchGuider, TStitchModel
from .vendi import NODES as VENDI_NODES

# Every node class of the pack, in menu order. Node IDs are stored in saved workflows: never rename one.
NODES: list[type[io.ComfyNode]] = [
    PerturbedAttention,
    TStitchModel,
    TStitchGuider,
    TStitchChain,
    FlowTurboSampler,
    TrainVelocityRefiner,
    LoadVelocityRefiner,
    FKCGuider,
    FKCSampler,
    *VENDI_NODES,
    DiffuseHigh,
    PromptSequenceNode,
    MultiTextVideo,
    *DEMO_NODES,
    *DEMO_VIDEO_NODES,
    *DEMO_FEATURE_NODES,
]


class TrajectoryLabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
