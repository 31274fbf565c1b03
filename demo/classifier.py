"""A small attribute classifier for the demo worlds: named heads over one shared embedding (pure torch).

Input: images [B, 3, 32, 32] in [0, 1] (other sizes are area-resized). `features(x)` is the embedding the heads read
(the demo feature extractor for c-VSG, Vendi scores and classifier-space Frechet distances); `forward(x)` gives one
logit tensor per head; `predict(x)` the class names. The shapes world uses heads shape / colour / size / position;
Fashion-MNIST one head `class`. Stride-2 convolutions keep a 4x4 map before the embedding (no global pooling), so
position stays visible. Weights are safetensors with the head spec in their metadata.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic_files import atomic_destination

INPUT_SIZE = 32


class AttributeClassifier(nn.Module):
    def __init__(self, heads: dict[str, tuple[str, ...] | list[str]], width: int = 32, feature_dim: int = 128):
        super().__init__()
        if not heads:
            raise ValueError("heads: need at least one named head, e.g. {'shape': ('circle', 'square')}")
        self.heads_spec = {name: tuple(classes) for name, classes in heads.items()}
        self.width, self.feature_dim = width, feature_dim
        w = width
        self.trunk = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.GELU(),  # 16x16
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GELU(),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim),
        )  # fmt: skip
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(c)) for name, c in self.heads_spec.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The embedding [B, feature_dim] of images [B, 3, H, W] in [0, 1]; differentiable in the images."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        if images.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            images = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
        weight = self.trunk[0].weight
        return self.trunk((images.to(weight) - 0.5) * 2.0)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = F.gelu(self.features(images))
        return {name: head(embedding) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """The most likely class name of each head for each image."""
        logits = self(images)
        return {name: [self.heads_spec[name][i] for i in logits[name].argmax(1).tolist()] for name in logits}


def train_classifier(
    model: AttributeClassifier,
    images: torch.Tensor,
    labels: dict[str, torch.Tensor],
    steps: int,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    noise: float = 0.06,
    log: Callable[[str], None] = print,
) -> dict:
    """Train in place on images [N, 3, H, W] in [0, 1] and labels {head: [N] class indices}; sum of the heads'
    cross-entropies, AdamW with cosine decay. Each image gets Gaussian pixel noise of a random std in [0, noise]
    so that slightly imperfect generations are still read correctly. Returns a summary of the run."""
    missing = set(model.heads_spec) - set(labels)
    if missing:
        raise ValueError(f"labels: no labels for heads {sorted(missing)}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    started, running = time.monotonic(), 0.0
    model.train()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(1, steps + 1):
            index = torch.randint(0, images.shape[0], (batch,), generator=gen)
            x = images[index]
            std = noise * torch.rand(batch, 1, 1, 1, generator=gen)
            x = x + std * torch.randn(x.shape, generator=gen)
            logits = model(x)
            loss = sum(F.cross_entropy(logits[name], labels[name][index]) for name in model.heads_spec)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            running = loss.item() if step == 1 else 0.97 * running + 0.03 * loss.item()
            if step % 100 == 0 or step == steps:
                log(f"classifier step {step}/{steps}  loss {running:.4f}  {time.monotonic() - started:.0f} s")
    model.eval()
    return {"steps": steps, "seconds": round(time.monotonic() - started, 1), "final_loss": round(running, 5)}


@torch.no_grad()
def accuracy(model: AttributeClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracy on labelled images."""
    model.eval()
    hits = {name: 0 for name in model.heads_spec}
    for start in range(0, images.shape[0], 512):
        logits = model(images[start : start + 512])
        for name in hits:
            hits[name] += int((logits[name].argmax(1) == labels[name][start : start + 512]).sum())
    return {name: hits[name] / images.shape[0] for name in hits}


def save_classifier(path: Path | str, model: AttributeClassifier, metadata: dict | None = None) -> None:
    """fp32 safetensors (a few hundred KB) with the architecture in the metadata; atomic (temp file + rename)."""
    import safetensors.torch

    meta = {"heads": model.heads_spec, "width": model.width, "feature_dim": model.feature_dim, **(metadata or {})}
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    with atomic_destination(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})


def load_classifier(path: Path | str) -> AttributeClassifier:
    """The classifier saved at path, in eval mode, with normal (not inference-mode) weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "heads" not in meta:
        raise ValueError(f"{path}: not a demo classifier file (no 'heads' in its metadata)")
    with torch.inference_mode(False):
        model = AttributeClassifier(meta["heads"], int(meta["width"]), int(meta["feature_dim"]))
        model.load_state_dict(state)
    return model.eval().requires_grad_(False)
