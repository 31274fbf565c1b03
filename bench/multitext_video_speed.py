"""Multi-text video speed: cost of one continuing segment of TL_MultiTextVideo vs plain generation of that segment.

Usage: .venv/bin/python bench/multitext_video_speed.py [--device cpu|cuda] [--out docs/MULTITEXT_VIDEO_SPEED.md]
                                                       [--repeats N]

cpu: the test suite's tiny Wan 2.1 T2V model (dim 64, 2 layers) with a tiny real Wan 2.1 VAE, latent 16x3x8x8
(9 pixel frames at 64x64), 20 steps. cuda: a Wan 2.1 1.3B-size T2V model (dim 1536, 30 layers, bf16) and a Wan
2.1-size VAE (dim 96), random weights, 480x832 x 33 frames (latent 16x9x60x104), 20 steps.
"plain" is ComfyUI's own sampling (comfy.sample.sample, euler, simple) of one segment. For each variant the node
runs with 1 and with 3 prompts; a continuing segment costs (t3 - t1) / 2 (its VAE decode + encode, inversion and
sampling). Euler, cfg 5, batch 1; median of repeats after one warm-up, variants interleaved per repeat.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core CPU machines: threads make small convs ~100x slower

import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    bench_arguments,
    build_full_size,
    processor_name,
    random_conditioning,
    start_comfyui,
    write_atomically,
)

REPO = Path(__file__).resolve().parent.parent
STEPS, CFG = 20, 5.0
# name: node options beyond the defaults (last_frame_inversion 0.5, dynamic_noise, structure_guidance 7)
VARIANTS: dict[str, dict] = {
    "default (decoded_frame)": {},
    "latent_frame": {"continue_from": "latent_frame"},
    "inversion_steps = steps / 2": {"inversion_steps": STEPS // 2},
    "inversion_refinement 1": {"inversion_refinement": 1},
    "latent_frame, inversion_steps = steps / 2": {"continue_from": "latent_frame", "inversion_steps": STEPS // 2},
}
# Wan 2.1 T2V 1.3B as comfy.model_detection derives it from the checkpoint.
WAN_1_3B = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "in_dim": 16, "dim": 1536,
            "ffn_dim": 8960, "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 12, "num_layers": 30,
            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}  # fmt: skip


def setting(device: str):
    """(description, model, vae, positive conditionings, negative, latent shape)."""
    import tiny_models
    import video_models

    if device == "cpu":
        conds = [tiny_models.tiny_conditioning("wan21", seed) for seed in (1, 2, 3)]
        negative = [[torch.zeros_like(conds[0][0][0]), {}]]
        model, vae = tiny_models.build_tiny_model("wan21"), video_models.build_wan_vae(8)
        return "tiny Wan 2.1 + tiny Wan VAE, 9 frames 64x64", model, vae, conds, negative, (1, 16, 3, 8, 8)
    started = time.perf_counter()
    model = build_full_size("WAN21_T2V", torch.bfloat16, WAN_1_3B)
    vae = video_models.build_wan_vae(96)
    print(f"Wan 1.3B-size model + Wan VAE built in {time.perf_counter() - started:.1f} s", flush=True)
    conds = [random_conditioning(seed, 512, 4096, None) for seed in (1, 2, 3)]
    negative = [[torch.zeros_like(conds[0][0][0]), {}]]
    return "Wan 2.1 1.3B-size bf16 + Wan VAE, 480x832 x 33 frames", model, vae, conds, negative, (1, 16, 9, 60, 104)


def bench(device: str, repeats: int, variants=tuple(VARIANTS)) -> tuple[str, dict, dict]:
    start_comfyui(device)
    import comfy.sample
    from harness import pack

    mtv = pack("nodes.multitext_video")
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    name, model, vae, conds, negative, shape = setting(device)

    def timed(fn) -> float:
        sync()
        started = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - started

    def plain():
        latent = torch.zeros(shape)
        noise = comfy.sample.prepare_noise(latent, 0)
        comfy.sample.sample(model, noise, STEPS, CFG, "euler", "simple", conds[0], negative, latent, seed=0,
                            disable_pbar=True)  # fmt: skip

    def node(count: int, options: dict):
        prompts = mtv.PromptSequence(tuple(conds[:count]), tuple(f"p{k}" for k in range(count)))
        return lambda: mtv.MultiTextVideo.execute(model, vae, prompts, negative, {"samples": torch.zeros(shape)}, 0,
                                                  STEPS, CFG, 0.5, True, 7.0, **options)  # fmt: skip

    def still():  # what decoded_frame adds per continuing segment: decode, repeat the last frame, encode
        mtv.last_frame_still(vae, torch.zeros(shape), "decoded_frame")

    runs = {"plain": plain, "VAE decode + encode": still}
    for variant in variants:
        runs[f"{variant} x1"] = node(1, VARIANTS[variant])
        runs[f"{variant} x3"] = node(3, VARIANTS[variant])
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for key, fn in runs.items():
                times[key].append(timed(fn))
    medians = {k: statistics.median(v) for k, v in times.items()}
    per_segment = {v: (medians[f"{v} x3"] - medians[f"{v} x1"]) / 2 for v in variants}
    for key, value in medians.items():
        print(f"{key}: {value:.3f} s", flush=True)
    return name, medians, per_segment


CPU_NOTE = [
    "On these tiny models one VAE pass costs several whole sampling runs, so the VAE dominates the default; at "
    "full size the model does. Counted at full size (bench/flops.py: Wan 2.1 1.3B at 480x832 x 33 frames, 20 "
    "steps; operations, not time), a continuing segment costs 1.56x plain by default and 1.31x with "
    "inversion_steps = steps / 2: the unconditional inversion adds half a CFG call per step and one VAE decode + "
    "encode about 1.2 CFG calls. GPU wall time: bench/gpu_evidence.py.",
    "",
]


def markdown(name: str, medians: dict, per_segment: dict, device: str, repeats: int, seconds: float) -> str:
    import comfyui_version

    plain = medians["plain"]
    lines = [
        "# Multi-text video speed: a continuing segment vs plain generation",
        "",
        f"`bench/multitext_video_speed.py --device {device}`, {datetime.date.today().isoformat()}, {seconds:.0f} s "
        "in all.",
        f"{processor_name(device)}; torch {torch.__version__}; ComfyUI {comfyui_version.__version__}; "
        f"Python {platform.python_version()}.",
        "",
        f"{name}; euler, {STEPS} steps, cfg {CFG:g}, batch 1. plain = ComfyUI's own sampling of one segment. A "
        "continuing segment (VAE decode + repeat + encode of the last frame unless latent_frame, unconditional "
        "inversion, Dynamic Noise, structure-guided sampling) costs (t(3 prompts) - t(1 prompt)) / 2. Median of "
        f"{repeats} repeats after one warm-up. (×) = time / plain. Random weights: timings only.",
        "",
        f"plain: {plain:.3f} s per segment; the last-frame still through the VAE (decode the segment, repeat its "
        f"last frame, encode): {medians['VAE decode + encode']:.3f} s ({medians['VAE decode + encode'] / plain:.2f}×).",
        "",
        *(CPU_NOTE if device == "cpu" else []),
        "| variant | 1 prompt s (×) | 3 prompts s | continuing segment s (×) |",
        "|---|--:|--:|--:|",
    ]
    for variant in per_segment:
        one, three = medians[f"{variant} x1"], medians[f"{variant} x3"]
        seg = per_segment[variant]
        lines.append(f"| {variant} | {one:.3f} ({one / plain:.2f}×) | {three:.3f} | {seg:.3f} ({seg / plain:.2f}×) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = bench_arguments(__doc__, "MULTITEXT_VIDEO_SPEED.md", 5, 2)
    if args is None:
        return 2
    repeats = args.repeats
    started = time.perf_counter()
    name, medians, per_segment = bench(args.device, repeats)
    write_atomically(
        args.out, markdown(name, medians, per_segment, args.device, repeats, time.perf_counter() - started)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
