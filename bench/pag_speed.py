"""PAG speed: ms per sampler step of plain CFG, ComfyUI's built-in PAG and ours (batched, unbatched), one run.

Usage: .venv/bin/python bench/pag_speed.py [--device cpu|cuda] [--out docs/PAG_SPEED.md] [--repeats N]

cpu: the test suite's tiny real models (sd15, sdxl, sd3, flux, wan21). cuda: full-size architectures with
random weights (SD1.5 512² fp16, SDXL 1024² fp16, Flux-dev 1024² bf16). Every variant samples the same model,
noise and conditioning (euler, 6 steps); ms/step comes from per-step timestamps (the first step and the
sampler's set-up are left out), median over repeats after one warm-up, variants interleaved per repeat.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core CPU machines: threads make small convs ~100x slower

import datetime  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402, F401  (re-exported: older scripts import these from here)
    FULL_SIZE,
    bench_arguments,
    build_full_size,
    processor_name,
    random_conditioning,
    start_comfyui,
    write_atomically,
)

STEPS, CFG, PAG_SCALE, BATCHES = 6, 5.0, 3.0, (1, 4)
VARIANTS = ("CFG", "built-in PAG", "ours batched", "ours unbatched")
TINY_ARCHS = ("sd15", "sdxl", "sd3", "flux", "wan21")


def cases(device: str, models=None):
    """(name, MODEL, positive, negative, latent shape for a batch) per benchmarked model (`models`: names of
    FULL_SIZE to keep on cuda), built lazily."""
    if device == "cpu":
        import tiny_models

        for arch in TINY_ARCHS:
            conds = [tiny_models.tiny_conditioning(arch, seed) for seed in (1, 2)]
            yield f"{arch} (tiny)", tiny_models.build_tiny_model(arch), *conds, partial(tiny_models.latent_shape, arch)
        return
    for name, (cls_name, dtype, unet_config, latent, tokens, width, pooled) in FULL_SIZE.items():
        if models is not None and name not in models:
            continue
        started = time.perf_counter()
        model = build_full_size(cls_name, dtype, unet_config)
        print(f"{name}: built in {time.perf_counter() - started:.1f} s", flush=True)
        conds = [random_conditioning(seed, tokens, width, pooled) for seed in (1, 2)]
        yield name, model, *conds, lambda b, c=latent: (b, *c)


def sample_timed(model, positive, negative, shape, sync) -> tuple[float, torch.Tensor]:
    """Sample once; seconds per step between the first and the last step's callback, and the final latent."""
    import comfy.sample

    stamps: list[float] = []

    def callback(step, x0, x, total_steps):
        sync()
        stamps.append(time.perf_counter())

    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = comfy.sample.sample(model, noise, STEPS, CFG, "euler", "normal", positive, negative, torch.zeros(shape),
                              seed=0, callback=callback, disable_pbar=True)  # fmt: skip
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), out.float()


def bench(device: str, repeats: int, models=None, batches=BATCHES) -> list[dict]:
    pag, builtin = start_comfyui(device)
    import comfy.model_management as mm

    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    rows = []
    for name, model, positive, negative, latent_shape in cases(device, models):
        variants = {
            "CFG": model,
            "built-in PAG": builtin.execute(model, PAG_SCALE).result[0],
            "ours batched": pag.apply_perturbed_attention(model, PAG_SCALE, 0.0, "auto", 0.0, 1.0, 0.0, True),
            "ours unbatched": pag.apply_perturbed_attention(model, PAG_SCALE, 0.0, "auto", 0.0, 1.0, 0.0, False),
        }
        for batch in batches:
            shape = latent_shape(batch)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            with torch.inference_mode():
                outs = {v: sample_timed(m, positive, negative, shape, sync)[1] for v, m in variants.items()}  # warm-up
                for _ in range(repeats):  # interleaved, so drift hits every variant alike
                    for v, m in variants.items():
                        times[v].append(sample_timed(m, positive, negative, shape, sync)[0])
            row = {"model": name, "batch": batch, **{v: 1000 * statistics.median(t) for v, t in times.items()}}
            row["Δ built-in − CFG"] = (outs["built-in PAG"] - outs["CFG"]).abs().max().item()
            row["Δ ours − built-in"] = (outs["ours batched"] - outs["built-in PAG"]).abs().max().item()
            row["Δ batched − unbatched"] = (outs["ours batched"] - outs["ours unbatched"]).abs().max().item()
            rows.append(row)
            summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(summary, flush=True)
        del model, variants
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()
    return rows


def markdown(rows: list[dict], device: str, repeats: int, seconds: float) -> str:
    import comfyui_version

    def x(r, v):
        return f"{r[v]:.1f} ({r[v] / r['CFG']:.2f}×)"

    lines = [
        "# PAG speed: ms per sampler step",
        "",
        f"`bench/pag_speed.py --device {device}`, {datetime.date.today().isoformat()}, {seconds:.0f} s in all.",
        f"{processor_name(device)}; torch {torch.__version__}; ComfyUI {comfyui_version.__version__}; "
        f"Python {platform.python_version()}.",
        "",
        f"Euler, {STEPS} steps, cfg {CFG:g}, PAG scale {PAG_SCALE:g} on the default layer (UNet middle block; ours "
        f"on DiTs: block 1). ms/step over steps 2-{STEPS} (the sampler's set-up and first step left out), median "
        f"of {repeats} repeats after one warm-up. (×) = time / CFG time. Δ = max |difference| of the final latents: "
        "built-in PAG only patches UNet attention, so on DiTs its Δ to CFG is ~0 (it changes nothing) while it still "
        "pays for an extra conditional pass. Random weights: timings only, no image quality.",
        "",
        "| model | batch | CFG | built-in PAG | ours batched | ours unbatched | batched / built-in "
        "| unbatched / built-in | Δ built-in − CFG | Δ ours − built-in | Δ batched − unbatched |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['CFG']:.1f} | {x(r, 'built-in PAG')} | {x(r, 'ours batched')} "
            f"| {x(r, 'ours unbatched')} | {r['ours batched'] / r['built-in PAG']:.2f} "
            f"| {r['ours unbatched'] / r['built-in PAG']:.2f} | {r['Δ built-in − CFG']:.2g} "
            f"| {r['Δ ours − built-in']:.2g} | {r['Δ batched − unbatched']:.2g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    args = bench_arguments(__doc__, "PAG_SPEED.md", 5, 3)
    if args is None:
        return 2
    repeats = args.repeats
    started = time.perf_counter()
    rows = bench(args.device, repeats)
    write_atomically(args.out, markdown(rows, args.device, repeats, time.perf_counter() - started))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
