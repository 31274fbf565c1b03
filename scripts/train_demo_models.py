"""Train the shapes-world demo models and the shapes attribute classifier; weights go to demo/weights/.

    python scripts/train_demo_models.py [names...]      (default: all; one after another)

Seeded and fixed-length: the same command on the same machine type gives the same weights. Each run renders its
dataset once (fast: ~0.3 ms a scene), trains with one thread (small convolutions are far slower with more on
small CPUs), writes fp16 safetensors atomically with the command, seed, steps and seconds in their metadata, and
records each file's sha256, size and training time in demo/weights/MANIFEST.json. Do not run this in CI: the
weights are committed. Times on the 2-core CPU machine are in the manifest.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from atomic import write_atomically  # noqa: E402
from comfy_host import PACK_ROOT  # noqa: E402
from demo_training import TrainSettings, pack, save_weights, train  # noqa: E402

WEIGHTS_DIR = PACK_ROOT / "demo" / "weights"
MANIFEST = WEIGHTS_DIR / "MANIFEST.json"
CLASSIFIER = "shapes_classifier"
DATASET_SIZE = 20_000
CAPTION_DROP = 0.25  # each attribute word left out with this probability: partial prompts work too


@dataclass(frozen=True)
class Plan:
    steps: int
    batch: int = 64
    lr: float = 1e-3
    ema: float = 0.995  # short runs: an EMA horizon of ~200 steps, so early weights do not linger
    decay_from: float = 1.0  # the learning rate falls linearly to 0 over the last (1 - decay_from) of the steps


# Step counts fixed so each run takes about 8-20 minutes on one shared CPU core.
PLANS = {
    CLASSIFIER: Plan(steps=1000, batch=128, lr=2e-3),
    "shapes_unet_small": Plan(steps=2000, batch=32, decay_from=0.5),
    "shapes_unet_large": Plan(steps=2400, batch=32, decay_from=0.5),
    "shapes_dit_flow": Plan(steps=2400, batch=32, lr=5e-4, decay_from=0.5),
}


@dataclass
class ShapesDataset:
    images: torch.Tensor  # [N, 3, 32, 32] in [0, 1]
    shapes: list  # the Shape of each scene (captions are drawn per batch, with word dropout)
    labels: dict[str, torch.Tensor]  # attribute -> [N] class indices


def render_dataset(seed: int, n: int = DATASET_SIZE) -> ShapesDataset:
    world = pack("demo.shapes_world")
    rng = np.random.default_rng(seed)
    shapes = [world.random_shape(rng) for _ in range(n)]
    images = np.stack([world.render([s], world.random_background(rng)) for s in shapes])
    labels = {
        key: torch.tensor([values.index(getattr(s, key)) for s in shapes]) for key, values in world.ATTRIBUTES.items()
    }
    return ShapesDataset(torch.from_numpy(images), shapes, labels)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def update_manifest(path: Path, record: dict) -> None:
    """Add or replace one file's record in MANIFEST.json (atomic rewrite)."""
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
    manifest[path.name] = {"sha256": sha256(path), "bytes": path.stat().st_size, **record}
    write_atomically(MANIFEST, json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")


def train_classifier(data: ShapesDataset, plan: Plan, seed: int, command: str) -> dict:
    classifier = pack("demo.classifier")
    world = pack("demo.shapes_world")
    torch.manual_seed(seed)
    with torch.inference_mode(False):
        model = classifier.AttributeClassifier(world.ATTRIBUTES)
        held_out = 2000
        train_images, test_images = data.images[held_out:], data.images[:held_out]
        train_labels = {k: v[held_out:] for k, v in data.labels.items()}
        summary = classifier.train_classifier(model, train_images, train_labels, plan.steps, plan.batch, plan.lr, seed)
    test_labels = {k: v[:held_out] for k, v in data.labels.items()}
    summary["held_out_accuracy"] = classifier.accuracy(model, test_images, test_labels)
    print(f"{CLASSIFIER}: held-out accuracy {summary['held_out_accuracy']}")
    path = WEIGHTS_DIR / f"{CLASSIFIER}.safetensors"
    record = {"command": command, "seed": seed, "steps": plan.steps, "batch": plan.batch, "seconds": summary["seconds"],
              "held_out_accuracy": summary["held_out_accuracy"]}  # fmt: skip
    classifier.save_classifier(path, model, record)
    return {"path": path, **record}


def train_diffusion(name: str, data: ShapesDataset, plan: Plan, seed: int, command: str) -> dict:
    demo_models = pack("nodes.demo_models")
    world = pack("demo.shapes_world")
    spec = demo_models.DEMO_MODELS[name]
    model = demo_models.build_network(name, seed=seed)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    print(f"{name}: {params / 1e6:.2f}M parameters, {plan.steps} steps at batch {plan.batch}")

    def sample(rng: np.random.Generator, n: int):
        index = rng.integers(0, len(data.shapes), n)
        pixels = data.images[torch.from_numpy(index)] * 2.0 - 1.0  # the pixel-space VAE's input mapping
        latents = torch.nn.functional.pixel_unshuffle(pixels, demo_models.FOLD)
        return latents, [world.caption(data.shapes[i], rng, CAPTION_DROP) for i in index]

    settings = TrainSettings(
        steps=plan.steps, batch=plan.batch, lr=plan.lr, ema=plan.ema, decay_from=plan.decay_from, seed=seed
    )
    result = train(model, spec.family, sample, settings)
    summary = result["summary"]
    path = demo_models.weights_path(name)
    record = {"command": command, "seed": seed, "steps": plan.steps, "batch": plan.batch, "lr": plan.lr,
              "ema": plan.ema, "decay_from": plan.decay_from, "seconds": summary["seconds"],
              "final_loss": round(summary["final_loss"], 5),
              "parameters": params,
              "caption_drop": CAPTION_DROP, "cfg_dropout": settings.cfg_dropout}  # fmt: skip
    save_weights(path, result["state_dict"], record)
    return {"path": path, **record}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"what to train (default: all): {', '.join(PLANS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = args.names or list(PLANS)
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        parser.error(f"unknown names {unknown}; valid: {list(PLANS)}")
    torch.set_num_threads(1)
    command = " ".join(["python scripts/train_demo_models.py", *map(shlex.quote, sys.argv[1:])])
    started = time.monotonic()
    data = render_dataset(args.seed)
    print(f"rendered {len(data.shapes)} scenes in {time.monotonic() - started:.1f} s")
    for name in names:
        plan = PLANS[name]
        if name == CLASSIFIER:
            record = train_classifier(data, plan, args.seed, command)
        else:
            record = train_diffusion(name, data, plan, args.seed, command)
        path = record.pop("path")
        record["trained_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        update_manifest(path, record)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) after {record['seconds']} s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
