"""FKC cost: time per particle-step of TL_FKCSampler vs plain euler_ancestral at the same total batch.

Usage: .venv/bin/python bench/fkc_speed.py [--device cpu|cuda] [--out docs/FKC_SPEED.md] [--repeats N]

Both sample B images x K = 8 particles (plain: a batch of 8 B), euler_ancestral steps, cfg 4, same model and
noise; the ratio is the weights' and resampling's overhead (target <= 1.05x). cpu: tiny SD1.5 UNet at 8x8 and
32x32 latents; cuda: an SDXL-size UNet at 1024² (fp16, random weights), reported as particles/s too.
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

PARTICLES, STEPS, CFG = 8, 20, 4.0


def timed(model, sampler, latent, cond, sync) -> float:
    import comfy.sample
    import comfy.samplers

    negative = [[torch.zeros_like(cond[0][0]), {k: torch.zeros_like(v) for k, v in cond[0][1].items()}]]
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", STEPS)
    noise = comfy.sample.prepare_noise(latent, 0)
    sync()
    start = time.perf_counter()
    comfy.sample.sample_custom(model, noise, CFG, sampler, sigmas, cond, negative, latent, seed=0, disable_pbar=True)
    sync()
    return time.perf_counter() - start


def cases(device, sides=(8, 32)):
    if device == "cpu":
        import tiny_models

        model = tiny_models.build_tiny_model("sd15")
        cond = tiny_models.tiny_conditioning("sd15", 1)
        for size in sides:
            yield f"tiny SD1.5, {size}x{size} latent", model, cond, (4, size, size)
        return
    cls, dtype, config, shape, tokens, width, pooled = FULL_SIZE["SDXL 1024²"]
    yield (
        "SDXL-size UNet 1024², fp16",
        build_full_size(cls, dtype, config),
        random_conditioning(1, tokens, width, pooled),
        shape,
    )


def measure(device: str, repeats: int, sides=(8, 32)) -> list[tuple[str, float, float, float]]:
    """(case, plain s, FKC s, particle-steps per s) per case (cpu: latent sides); ComfyUI must be started."""
    import comfy.samplers
    from harness import pack

    fkc = pack("nodes.feynman_kac").FKCSampler.execute(PARTICLES, "target", "every_step", 0.5, "best").args[0]
    plain = comfy.samplers.sampler_object("euler_ancestral")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name, model, cond, shape in cases(device, sides):
        fkc_latent, plain_latent = torch.zeros((1, *shape)), torch.zeros((PARTICLES, *shape))
        times: dict[str, list[float]] = {"plain": [], "fkc": []}
        for repeat in range(repeats + 1):
            t_plain = timed(model, plain, plain_latent, cond, sync)
            t_fkc = timed(model, fkc, fkc_latent, cond, sync)
            if repeat:  # the first round warms up
                times["plain"].append(t_plain)
                times["fkc"].append(t_fkc)
        plain_s, fkc_s = statistics.median(times["plain"]), statistics.median(times["fkc"])
        rows.append((name, plain_s, fkc_s, PARTICLES * STEPS / fkc_s))
    return rows


def markdown(rows, device: str, repeats: int) -> str:
    lines = [
        "# FKC cost per particle-step", "",
        f"{PARTICLES} particles for 1 image vs plain euler_ancestral on a batch of {PARTICLES}; {STEPS} Karras steps, "
        f"cfg {CFG}; median of {repeats} after a warm-up; {environment_line(device)}. "
        f"Command: `python bench/fkc_speed.py --device {device}`. Target: FKC / plain <= 1.05.", "",
        "| case | plain s | FKC s | FKC / plain | particle-steps per s |", "|---|--:|--:|--:|--:|",
        *[f"| {n} | {p:.3f} | {f:.3f} | {f / p:.3f} | {r:.1f} |" for n, p, f, r in rows], "",
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    return run_benchmark(__doc__, "FKC_SPEED.md", 5, 3, lambda d, r: markdown(measure(d, r), d, r))


if __name__ == "__main__":
    sys.exit(main())
