"""GPU evidence: the speed benchmarks at full size (random weights) in one process, written to EVIDENCE_GPU.md.

Usage on a GPU machine (see bench/README.md):  python3 bench/gpu_evidence.py --out $OUT/EVIDENCE_GPU.md
Smoke run of the same code on CPU at tiny sizes:  .venv/bin/python bench/gpu_evidence.py --tiny --out /tmp/x.md

Sections, in order (bench/evidence.py speed_steps with device cuda): PAG on an SDXL-size UNet 1024² and a Flux-dev-
size DiT 1024² (CFG vs ComfyUI's built-in PAG vs ours, batch 1); T-Stitch with SDXL-size + SSD-1B-size UNets;
FKC particles/s on the SDXL-size UNet; FlowTurbo H1P13 vs Euler 28 on the Flux-size DiT; DiffuseHigh 1024² →
2048²; multi-text video on a Wan 2.1 1.3B-size model, 480×832 × 33 frames per segment. Planned at about 6 minutes
on one H100 or H200 with model construction; once --budget seconds have passed, the remaining sections are listed
as skipped, and the file is rewritten after every section, so a run cut short still leaves its figures.
--tiny runs every section through the same functions with the test suite's tiny models on the CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FULL_SIZE, REPO, environment_line, start_comfyui, write_atomically  # noqa: E402
from evidence import GPU_STEPS, checks_table, speed  # noqa: E402

# Published parameter counts of the diffusion networks the full-size configs stand for.
PUBLISHED = {"SD1.5 512²": "860M", "SDXL 1024²": "2.6B", "Flux-dev 1024²": "12B", "SSD-1B": "1.3B",
             "Wan 2.1 T2V 1.3B": "1.3B"}  # fmt: skip


def full_size_configs() -> str:
    """Build every full-size architecture on the meta device (no memory, no GPU) and count its parameters: checks
    the configs the GPU run uses before any GPU time is spent."""
    import comfy.supported_models
    import multitext_video_speed
    import tstitch_speed

    configs = {name: (cls, dtype, config) for name, (cls, dtype, config, *_) in FULL_SIZE.items()}
    configs["SSD-1B"] = ("SSD1B", torch.float16, tstitch_speed._SSD1B)
    configs["Wan 2.1 T2V 1.3B"] = ("WAN21_T2V", torch.bfloat16, multitext_video_speed.WAN_1_3B)
    lines = ["### Full-size configurations, built on the meta device", "",
             "| network | ComfyUI class | parameters | published |", "|---|---|--:|--:|"]  # fmt: skip
    for name, (cls, dtype, config) in configs.items():
        model_config = getattr(comfy.supported_models, cls)(dict(config))
        model_config.set_inference_dtype(dtype, None)
        model = model_config.get_model({}, device="meta")
        count = sum(p.numel() for p in model.diffusion_model.parameters())
        lines.append(f"| {name} | {type(model).__name__} | {count / 1e9:.3f} B | {PUBLISHED[name]} |")
    return "\n".join(lines) + "\n"


def document(body: str, checks, device: str, seconds: float, budget: float, tiny: bool) -> str:
    command = "bench/gpu_evidence.py" + (" --tiny" if tiny else "")
    lines = [
        "# Evidence on a GPU: full-size architectures, random weights" if not tiny else
        "# GPU evidence script, smoke run at tiny sizes on CPU (the figures say nothing about a GPU)",
        "",
        f"`{command}` in {seconds:.0f} s (budget {budget:.0f} s). {environment_line(device)}.",
        "",
        "Random weights: timings and ratios only, no image quality. Verdicts compare with the target named in the "
        "row (the project's issues) or the paper's claim; **misses** marks a disagreement.",
        "",
        checks_table(checks, device),
        body,
    ]  # fmt: skip
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the same code path, no GPU")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "EVIDENCE_GPU.md")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after a warm-up (cuda 2, tiny 1)")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds after which no new section starts")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"error: no CUDA device visible to torch {torch.__version__}; use --tiny for the CPU smoke run",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.tiny:
        torch.set_num_threads(1)
    repeats = args.repeats or (1 if args.tiny else 2)
    started = time.perf_counter()
    start_comfyui(device)
    print(f"ComfyUI ready in {time.perf_counter() - started:.1f} s on {environment_line(device)}", flush=True)

    def save(body, checks):
        write_atomically(args.out, document(body, checks, device, time.perf_counter() - started, args.budget,
                                            args.tiny))  # fmt: skip

    body, checks = speed(device, repeats, budget_s=args.budget, on_part=save, only=GPU_STEPS)
    if args.tiny:  # the full-size configs themselves, without a GPU
        body = full_size_configs() + "\n" + body
    save(body, checks)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 1 if any(claim == "(benchmark failed)" for _, claim, _, _ in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
