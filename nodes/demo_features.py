"""TL_DemoFeatures: the demo worlds' own attribute classifiers (demo/classifier.py) as TL_FEATURES.

The embedding is the classifier's penultimate layer, computed in torch on the decoded image, so c-VSG guidance
gradients reach the pixels (and through the demo VAE the latent). Weights live in demo/weights/.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from comfy_api.latest import io

from ..demo import classifier as demo_classifier
from .demo_models import TRAIN_COMMAND, WEIGHTS_DIR
from .vendi_features import FeatureExtractor, Features


@dataclass(frozen=True)
class DemoFeatureSpec:
    filename: str  # under demo/weights/
    description: str
    make: str  # the command that makes the weights (for the missing-file error)


DEMO_FEATURES: dict[str, DemoFeatureSpec] = {
    "shapes_attributes": DemoFeatureSpec(
        "shapes_classifier.safetensors",
        "shapes world: shape / colour / size / position classifier embedding (128-d)",
        f"{TRAIN_COMMAND} shapes_classifier",
    ),
    "fashion_classes": DemoFeatureSpec(
        "fashion_classifier.safetensors",
        "Fashion-MNIST: 10-class classifier embedding",
        "python scripts/train_fashion_model.py classifier",
    ),
}


def feature_path(name: str) -> Path:
    if name not in DEMO_FEATURES:
        raise ValueError(f"features_name: unknown {name!r}; expected one of {list(DEMO_FEATURES)}")
    return WEIGHTS_DIR / DEMO_FEATURES[name].filename


@functools.cache
def load_demo_classifier(name: str) -> demo_classifier.AttributeClassifier:
    """The trained classifier behind a feature name, loaded once per process."""
    path = feature_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"features_name: no weights for {name!r} at {path}; make them with "
                                f"`{DEMO_FEATURES[name].make}`")  # fmt: skip
    return demo_classifier.load_classifier(path)


class DemoClassifierExtractor(FeatureExtractor):
    """IMAGE [B, H, W, C] in 0..1 -> the classifier's embedding [B, D], differentiably."""

    space = "image"

    def __init__(self, name: str) -> None:
        self.classifier = load_demo_classifier(name)
        first = next(self.classifier.parameters()).detach().flatten()[:256].float()
        digest = hashlib.sha1(first.numpy().tobytes()).hexdigest()[:12]  # a retrained file is a new feature space
        self.name = f"demo:{name}:{digest}"

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch[..., :3].movedim(-1, 1).float()
        return self.classifier.features(pixels.to(next(self.classifier.parameters()).device))

    def modules(self) -> list[torch.nn.Module]:
        return [self.classifier]


class DemoFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_DemoFeatures",
            display_name="Demo Features (Trajectory Lab)",
            category="trajectory_lab/demo",
            description="TL_FEATURES from a small classifier trained on a demo world (the demo models' own "
            "semantic feature space). With TL_VendiGuider it needs the vae input.",
            inputs=[
                io.Combo.Input(
                    "features_name",
                    options=list(DEMO_FEATURES),
                    tooltip="; ".join(f"{n}: {s.description}" for n, s in DEMO_FEATURES.items()),
                )
            ],
            outputs=[Features.Output(display_name="features")],
        )

    @classmethod
    def execute(cls, features_name) -> io.NodeOutput:
        return io.NodeOutput(DemoClassifierExtractor(features_name))


NODES: list[type[io.ComfyNode]] = [DemoFeatures]
