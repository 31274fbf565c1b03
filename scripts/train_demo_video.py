"""Train the demo video model `shapes_video_wan` (a Wan 2.1-style T2V DiT) on shape videos; write its weights.

    .venv/bin/python scripts/train_demo_video.py            # the shipped weights: seed 0, 10000 steps, ~15 min
    .venv/bin/python scripts/train_demo_video.py --steps 200 --out /tmp/try.safetensors

Clips are 4 frames of 16x16 pixels (latent [48, 4, 4, 4] through the 4x4 fold) of one large shape starting near the
centre that moves left/right/up/down, grows, shrinks or changes colour, captioned "red circle moves right", as
demo.shapes_world.sample_videos makes them, except that a moving shape travels exactly one latent cell per frame.

Why it takes 10000 steps, logit-normal noise levels and centred paths (measured on one CPU thread, seed 0; the
tests in tests/test_demo_video.py): with noise levels uniform in t, runs of 600-10000 steps drew shapes that move,
but in a random direction: the denoiser's error with the direction word swapped equalled its error with the right word
(10000 steps on the clip stream of a logit-normal run that did learn it: right in 0.44-0.48 of clips, ratio 1.00).
With t = sigmoid(0.5 + z), weighting the middle levels where a clip's layout is decided, the same network has
direction by 10000 steps (right in every test clip, end-to-end travel 0.71 frame widths; training clips 0.68).
Centred paths are part of it: Wan places things only through relative RoPE attention, and the word is learnt as a
layout ("moves right" starts on the left) only when the layout is fixed. The same 10000 steps with paths free across
the motion (anywhere across the frame, centred along it), which would let a multi-text segment continue from any
place, left the direction at chance (swapped-word error ratio 1.01).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_training import TrainSettings, pack, save_weights, train  # noqa: E402
from train_demo_models import update_manifest  # noqa: E402

MODEL_NAME = "shapes_video_wan"
FRAMES, SIZE = 4, 16
CELL_TRAVEL = (FRAMES - 1) * 4 / SIZE  # start-to-end travel, frame widths: one latent cell per frame
# ema 0.995: a ~200-step average, close behind the late learning of direction
DEFAULTS = TrainSettings(steps=10000, batch=16, lr=1e-3, warmup=100, decay_from=0.7, ema=0.995, seed=0, log_every=250,
                         noise_levels="logit_normal", logit_mean=0.5, logit_std=1.0)  # fmt: skip


def videos_to_latent(videos: np.ndarray) -> torch.Tensor:
    """[n, 3, T, H, W] in [0, 1] -> the demo video VAE's latent [n, 48, T, H/4, W/4] (its [-1, 1] input + fold)."""
    fold = pack("nodes.demo_models").FoldedPixels()
    return fold.encode(torch.from_numpy(videos) * 2.0 - 1.0)


def sample_clips(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
    """demo.shapes_world.sample_videos, but a moving shape travels exactly one latent cell (4 pixels) per frame."""
    world = pack("demo.shapes_world")
    videos, captions = [], []
    for _ in range(n):
        motion = str(rng.choice(world.MOTIONS))
        start = replace(world.random_shape(rng, position="center"), size="large")
        to_colour = str(rng.choice([c for c in world.COLOURS if c != start.colour])) if motion == "turns" else None
        background = world.random_background(rng)
        path = world.video_frames(start, motion, FRAMES, to_colour, travel=CELL_TRAVEL)
        videos.append(np.stack([world.render([s], background, SIZE) for s in path], axis=1))
        captions.append(world.video_caption(start, motion, to_colour))
    return np.stack(videos), captions


def training_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    videos, captions = sample_clips(rng, n)
    return videos_to_latent(videos), captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps)
    parser.add_argument("--batch", type=int, default=DEFAULTS.batch)
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed)
    parser.add_argument("--out", type=Path, default=None, help="default: demo/weights/shapes_video_wan.safetensors")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    demo_models = pack("nodes.demo_models")
    settings = replace(DEFAULTS, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    model = demo_models.build_network(MODEL_NAME, seed=settings.seed)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    print(f"{MODEL_NAME}: {params / 1e6:.2f}M parameters, {settings}", flush=True)
    result = train(model, demo_models.DEMO_MODELS[MODEL_NAME].family, training_batch, settings,
                   log=lambda line: print(line, flush=True))  # fmt: skip
    out = args.out or demo_models.weights_path(MODEL_NAME)
    command = "python scripts/train_demo_video.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    metadata = {"model": MODEL_NAME, "command": command.strip(), "settings": asdict(settings),
                "clips": {"frames": FRAMES, "size": SIZE}, "parameters": params,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "finished": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result["summary"]}  # fmt: skip
    save_weights(out, result["state_dict"], metadata)
    if args.out is None:  # the shipped file: record its hash and how it was made
        update_manifest(
            out,
            {
                "command": metadata["command"],
                "seed": settings.seed,
                "steps": settings.steps,
                "batch": settings.batch,
                "lr": settings.lr,
                "noise_levels": settings.noise_levels,
                "seconds": result["summary"]["seconds"],
                "final_loss": result["summary"]["final_loss"],
                "parameters": params,
                "clips": metadata["clips"],
                "trained_at": metadata["finished"],
            },
        )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {result['summary']}", flush=True)


if __name__ == "__main__":
    main()
