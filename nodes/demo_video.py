"""Multi-text video on the demo world: TL_DemoPromptSequence makes a TL_PROMPT_SEQUENCE with the demo text encoder,
for TL_MultiTextVideo on the demo video model (TL_LoadDemoModel "shapes_video_wan", prompts such as
"red circle moves right"). It is TL_PromptSequence with the demo encoding in place of a CLIP.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..demo import text_encoder
from .demo_models import demo_conditioning
from .multitext_video import PromptSequenceNode, PromptSequenceType


class DemoTextAsClip:
    """The two CLIP calls TL_PromptSequence makes per line, answered with the demo encoding of that line."""

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, text: str) -> list:
        return demo_conditioning(text)


class DemoPromptSequence(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        chained_inputs = [i for i in PromptSequenceNode.define_schema().inputs if i.id not in ("clip", "text")]
        return io.Schema(
            node_id="TL_DemoPromptSequence",
            display_name="Demo Prompt Sequence (Trajectory Lab)",
            category="trajectory_lab/demo",
            description="TL_PromptSequence for the demo models: one prompt per non-empty line, encoded like "
            "TL_DemoTextEncode (no CLIP), then the connected conditioning inputs. One TL_MultiTextVideo segment "
            "per prompt, e.g. 'red circle moves right' then 'red circle moves down'.",
            inputs=[
                io.String.Input(
                    "text",
                    multiline=True,
                    default="red circle moves right\nred circle moves down",
                    tooltip="One prompt per line, words from the demo vocabulary: "
                    + ", ".join(text_encoder.VOCABULARY),
                ),
                *chained_inputs,
            ],
            outputs=[PromptSequenceType.Output()],
        )

    @classmethod
    def execute(cls, text, previous=None, **conditionings) -> io.NodeOutput:
        return PromptSequenceNode.execute(DemoTextAsClip(), text, previous, **conditionings)


NODES: list[type[io.ComfyNode]] = [DemoPromptSequence]
