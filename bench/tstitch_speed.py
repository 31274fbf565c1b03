"""T-Stitch speed: wall time of a stitched run vs large-only, against the ideal 1 - r (1 - c_small / c_large).

Usage: .venv/bin/python bench/tstitch_speed.py [--device cpu|cuda] [--out docs/TSTITCH_SPEED.md] [--repeats N]

cpu: two SD1.5-family UNets in one latent space at 32x32 latents, model_channels 128 (large) and 32 (small).
cuda: an SDXL-size UNet and an SSD-1B-size UNet at 1024² (fp16, random weights; ComfyUI's own configs).
All runs: euler, 10 steps, cfg 5, batch 2, same noise; median of repeats after a warm-up, variants interleaved.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    FULL_SIZE,
    build_full_size,
    environment_line,
    random_conditioning,
    run_benchmark,
)

STEPS, CFG, BATCH, RATIO = 10, 5.0, 2, 0.4
# fmt: off
_CPU_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "in_channels": 4, "adm_in_channels": None, "num_res_blocks": [1, 1, 1],
             "transformer_depth": [1, 1, 1, 1, 1, 1], "channel_mult": [1, 2, 4], "transformer_depth_middle": 1,
             "use_linear_in_transformer": False, "context_dim": 64, "num_head_channels": 32,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1], "use_temporal_attention": False,
             "use_temporal_resblock": False}
_SSD1B = {**FULL_SIZE["SDXL 1024²"][2], "transformer_depth": [0, 0, 2, 2, 4, 4], "transformer_depth_middle": -1,
          "transformer_depth_output": [0, 0, 0, 1, 1, 2, 10, 4, 4]}
# fmt: on


def cpu_pair(side: int = 32):
    import tiny_models

    def build(channels, seed):
        import comfy.supported_models

        config = comfy.supported_models.SD15({**_CPU_UNET, "model_channels": channels})
        config.unet_config.update({**_CPU_UNET, "model_channels": channels})
        config.set_inference_dtype(torch.float32, None)
        with torch.inference_mode(False), torch.no_grad():
            model = config.get_model({})
            tiny_models.fill_seeded_(model.diffusion_model, seed)
        return tiny_models._new_patcher(model)

    cond = random_conditioning(1, 8, 64, None)
    title = f"SD1.5-family UNets {side}x{side} latent (model_channels 128 vs 32)"
    return title, build(128, 0), build(32, 1), cond, (4, side, side)


def cuda_pair():
    cls, dtype, sdxl, latent, tokens, width, pooled = FULL_SIZE["SDXL 1024²"]
    large, small = build_full_size(cls, dtype, sdxl), build_full_size("SSD1B", dtype, _SSD1B)
    cond = random_conditioning(1, tokens, width, pooled)
    return "SDXL-size vs SSD-1B-size UNet, 1024², fp16", large, small, cond, latent


def timed(model, cond, latent, sync) -> float:
    import comfy.sample

    negative = [[torch.zeros_like(cond[0][0]), {k: torch.zeros_like(v) for k, v in cond[0][1].items()}]]
    shape = (BATCH, *latent)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    sync()
    start = time.perf_counter()
    comfy.sample.sample(model, noise, STEPS, CFG, "euler", "normal", cond, negative, torch.zeros(shape), seed=0,
                        disable_pbar=True)  # fmt: skip
    sync()
    return time.perf_counter() - start


def measure(device: str, repeats: int, side: int = 32) -> tuple[str, dict[str, float]]:
    """(setting, median seconds per variant; cpu: latent side); ComfyUI must be started for `device`."""
    from harness import pack

    stitching = pack("nodes.trajectory_stitching")
    title, large, small, cond, latent = cpu_pair(side) if device == "cpu" else cuda_pair()
    stitched = stitching.TStitchModel.execute(small, large, RATIO, "steps").result[0]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    variants = {"large only": large, "small only": small, f"T-Stitch r={RATIO}": stitched}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for repeat in range(repeats + 1):
        for key, model in variants.items():
            t = timed(model, cond, latent, sync)
            if repeat:  # the first round warms up
                times[key].append(t)
    return title, {k: statistics.median(v) for k, v in times.items()}


def ratios(med: dict[str, float]) -> tuple[float, float, float]:
    """(c_small / c_large, ideal stitched / large-only = 1 - r (1 - c), measured stitched / large-only)."""
    c = med["small only"] / med["large only"]
    return c, 1 - RATIO * (1 - c), med[f"T-Stitch r={RATIO}"] / med["large only"]


def markdown(title: str, med: dict[str, float], device: str, repeats: int) -> str:
    c, ideal, measured = ratios(med)
    lines = [
        "# T-Stitch speed", "",
        f"{title}; euler {STEPS} steps, cfg {CFG}, batch {BATCH}; median of {repeats} after a warm-up.",
        f"{environment_line(device)}. Command: `python bench/tstitch_speed.py --device {device}`.", "",
        "| variant | s per image batch | x large-only |", "|---|--:|--:|",
        *[f"| {k} | {v:.3f} | {v / med['large only']:.3f} |" for k, v in med.items()], "",
        f"c_small / c_large = {c:.3f}; ideal stitched ratio 1 - r (1 - c) = {ideal:.3f}; measured {measured:.3f} "
        f"({100 * (measured / ideal - 1):+.1f}% vs ideal; target within 5%).", "",
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    return run_benchmark(__doc__, "TSTITCH_SPEED.md", 5, 3, lambda d, r: markdown(*measure(d, r), d, r))


if __name__ == "__main__":
    sys.exit(main())
