"""FlowTurbo: error and time at equal model calls vs Euler and Heun (GMM, CPU) and ms per image (Flux-size, GPU).

Usage: .venv/bin/python bench/flowturbo_speed.py [--device cpu|cuda] [--out docs/FLOWTURBO_SPEED.md] [--repeats N]

cpu: the exact two-mode GMM flow model (tests/tiny_models.py) sampled through ComfyUI with Euler, Heun and
FlowTurbo plans at the same number of model calls; error = mean |x - x_ref| against Heun with 200 steps from
the same noise (a refiner is not used: R steps need a distilled refiner; see the tests for one).
cuda: a Flux-dev-size DiT at 1024² (bf16, random weights): ms per image for Euler 28 steps vs H1P13 (15 calls).
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

# (label, sampler spec, steps): every plan costs 15 model calls on CPU (Euler 15; Heun 8 = 15; H1P13 = 15 steps).
CPU_PLANS = [("Euler 15", "euler", 15), ("Heun 8", "heun", 8), ("FlowTurbo H1P13", (1, 0), 14),
             ("FlowTurbo H3P10", (3, 0), 13)]  # fmt: skip
GPU_PLANS = [("Euler 28", "euler", 28), ("FlowTurbo H1P13", (1, 0), 14)]


def run(model, spec, steps, cond, latent, sync, seed=5):
    import comfy.sample
    import comfy.samplers
    from harness import pack

    if isinstance(spec, tuple):
        sampler = pack("nodes.flowturbo").FlowTurboSampler.execute(*spec).result[0]
    else:
        sampler = comfy.samplers.sampler_object(spec)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    noise = comfy.sample.prepare_noise(latent, seed)
    sync()
    start = time.perf_counter()
    out = comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, latent, seed=0, disable_pbar=True)
    sync()
    return time.perf_counter() - start, out


def measure(device: str, repeats: int) -> tuple[str, list[tuple[str, float, float]]]:
    """(setting, [(plan, median s, mean abs error vs the reference or nan)]); ComfyUI must be started."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cpu":
        import tiny_models

        model = tiny_models.build_gmm_model("flow", "two_modes_1d")
        cond = tiny_models.gmm_conditioning([0, 0])
        latent = torch.zeros(tiny_models.gmm_latent_shape("two_modes_1d", 2048))
        title, plans = "exact two-mode GMM flow model, 2048 samples", CPU_PLANS
        reference = run(model, "heun", 200, cond, latent, sync)[1]
    else:
        cls, dtype, config, shape, tokens, width, pooled = FULL_SIZE["Flux-dev 1024²"]
        model = build_full_size(cls, dtype, config)
        cond = random_conditioning(1, tokens, width, pooled)
        latent = torch.zeros((1, *shape))
        title, plans, reference = "Flux-dev-size DiT 1024², bf16, random weights (speed only)", GPU_PLANS, None
    rows = []
    for label, spec, steps in plans:
        run(model, spec, steps, cond, latent, sync)  # warm-up
        times, out = [], None
        for _ in range(repeats):
            t, out = run(model, spec, steps, cond, latent, sync)
            times.append(t)
        error = (out - reference).abs().mean().item() if reference is not None else float("nan")
        rows.append((label, statistics.median(times), error))
    return title, rows


def markdown(title: str, rows, device: str, repeats: int) -> str:
    base = rows[0][1]
    lines = [
        "# FlowTurbo speed and accuracy", "",
        f"{title}; median of {repeats} after a warm-up; {environment_line(device)}. "
        f"Command: `python bench/flowturbo_speed.py --device {device}`.", "",
        "| plan | s per batch | x first row | mean abs error vs reference |", "|---|--:|--:|--:|",
        *[f"| {label} | {t:.4f} | {t / base:.3f} | {e:.4g} |" for label, t, e in rows], "",
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    return run_benchmark(__doc__, "FLOWTURBO_SPEED.md", 5, 3, lambda d, r: markdown(*measure(d, r), d, r))


if __name__ == "__main__":
    sys.exit(main())
