"""Train the demo video model `shapes_video_wan` (a Wan 2.1-style T2V DiT) on shape videos; write its weights.

    .venv/bin/python scripts/train_demo_video.py            # the shipped weights: seed 0, 1600 steps
    .venv/bin/python scripts/train_demo_video.py --steps 200 --out /tmp/try.safetensors

Clips are 8 frames of 16x16 pixels (latent [48, 8, 4, 4] through the 4x4 fold): one large shape that moves
left/right/up/down, grows, shrinks or changes colour, captioned "red circle moves right". Unlike
demo.shapes_world.sample_videos, the start position varies over the frame, so a clip that begins where another
prompt's clip ended (multi-text video's continuation) is in the training distribution. One thread, as on CI.
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

MODEL_NAME = "shapes_video_wan"
FRAMES, SIZE = 8, 16
START_RANGE = (0.32, 0.68)  # centre of the shape at the clip's middle frame, fractions of the frame
# ema 0.995: a ~200-step average (0.999 would lag a run this short)
DEFAULTS = TrainSettings(steps=1600, batch=16, lr=1e-3, warmup=100, ema=0.995, seed=0, log_every=100)


def sample_clips(rng: np.random.Generator, n: int, frames: int = FRAMES, size: int = SIZE):
    """(videos [n, 3, T, H, W] in [0, 1], captions, motions): one large shape per clip, anywhere mid-frame."""
    world = pack("demo.shapes_world")
    videos, captions, motions = [], [], []
    for _ in range(n):
        motion = str(rng.choice(world.MOTIONS))
        shape = world.random_shape(rng)
        start = replace(shape, size="large", x=float(rng.uniform(*START_RANGE)), y=float(rng.uniform(*START_RANGE)))
        to_colour = str(rng.choice([c for c in world.COLOURS if c != start.colour])) if motion == "turns" else None
        background = world.random_background(rng)
        clip = [world.render([s], background, size) for s in world.video_frames(start, motion, frames, to_colour)]
        videos.append(np.stack(clip, axis=1))
        captions.append(world.video_caption(start, motion, to_colour))
        motions.append(motion)
    return np.stack(videos), captions, motions


def videos_to_latent(videos: np.ndarray) -> torch.Tensor:
    """[n, 3, T, H, W] in [0, 1] -> the demo video VAE's latent [n, 48, T, H/4, W/4] (its [-1, 1] input + fold)."""
    fold = pack("nodes.demo_models").FoldedPixels()
    return fold.encode(torch.from_numpy(videos) * 2.0 - 1.0)


def training_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
    videos, captions, _ = sample_clips(rng, n)
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
                "clips": {"frames": FRAMES, "size": SIZE, "start_range": START_RANGE}, "parameters": params,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "finished": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result["summary"]}  # fmt: skip
    save_weights(out, result["state_dict"], metadata)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {result['summary']}", flush=True)


if __name__ == "__main__":
    main()
