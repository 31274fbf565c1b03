"""Evidence: what each technique buys, measured against its baseline in one run; writes docs/EVIDENCE.md.

Usage: .venv/bin/python bench/evidence.py [--sections exact,speed,quality] [--repeats N] [--seeds N] [--out PATH]

exact:   the figures the tests assert on analytic models (bench/evidence_exact.py), beside the papers' numbers.
speed:   the CPU speed benchmarks (bench/*_speed.py) called as functions, at reduced sizes and repeats, as ratios.
quality: the demo world (bench/quality.py): attribute accuracy, Fréchet distance in the demo classifier's feature
         space and Vendi score over several seeds; rows whose demo model is missing say "pending demo models".
The GPU figures come from bench/gpu_evidence.py on a GPU machine (see bench/README.md); their file is linked.
About 10 minutes on 2 CPU cores. Not part of the test suite.
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
from common import REPO, environment_line, start_comfyui, write_atomically  # noqa: E402

SECTIONS = ("exact", "speed", "quality")
GPU_RESULT = REPO / "docs" / "EVIDENCE_GPU.md"


def demote(markdown: str, levels: int = 2) -> str:
    """Headings one or more levels down, so a benchmark's own file nests under an evidence section."""
    return "\n".join("#" * levels + line if line.startswith("#") else line for line in markdown.splitlines()) + "\n"


def verdict(ok: bool | None) -> str:
    return "— (no numeric target)" if ok is None else "meets" if ok else "**misses**"


def speed(repeats: int) -> tuple[str, list[tuple[str, str, str, bool]]]:
    """The CPU speed benchmarks, each called through its own module; (markdown, [(technique, claim, measured, ok)])."""
    import diffusehigh_speed
    import fkc_speed
    import flowturbo_speed
    import multitext_video_speed
    import pag_speed
    import tstitch_speed
    import vendi_speed

    parts, checks = [], []

    def timed(name, fn):
        started = time.perf_counter()
        result = fn()
        print(f"speed {name}: {time.perf_counter() - started:.1f} s", flush=True)
        return result, time.perf_counter() - started

    rows, seconds = timed("pag", lambda: pag_speed.bench("cpu", repeats))
    parts.append(pag_speed.markdown(rows, "cpu", repeats, seconds))
    worst = max(r["ours batched"] / r["built-in PAG"] for r in rows if r["batch"] == 1)
    checks.append(("PAG", "batched: ≤ 0.65× the built-in node's time at batch 1 (issue 3; set for SDXL on a GPU)",
                   f"≤ {worst:.2f}× built-in across tiny sd15/sdxl/sd3/flux/wan21", worst <= 0.65))  # fmt: skip

    (title, med), _ = timed("tstitch", lambda: tstitch_speed.measure("cpu", repeats, side=16))
    parts.append(tstitch_speed.markdown(title, med, "cpu", repeats))
    c, ideal, measured = tstitch_speed.ratios(med)
    checks.append(("T-Stitch", "r = 0.4 costs 1 − r(1 − c_small/c_large) of large-only, within 5%",
                   f"{measured:.3f} vs ideal {ideal:.3f} ({100 * (measured / ideal - 1):+.1f}%)",
                   abs(measured / ideal - 1) <= 0.05))  # fmt: skip

    fkc_rows, _ = timed("fkc", lambda: fkc_speed.measure("cpu", repeats, sides=(8, 16)))
    parts.append(fkc_speed.markdown(fkc_rows, "cpu", repeats))
    worst = max(f / p for _, p, f, _ in fkc_rows)
    checks.append(("FKC", "weights + resampling cost ≤ 1.05× plain euler_ancestral per particle-step",
                   f"≤ {worst:.3f}×", worst <= 1.05))  # fmt: skip

    (title, ft_rows), _ = timed("flowturbo", lambda: flowturbo_speed.measure("cpu", repeats))
    parts.append(flowturbo_speed.markdown(title, ft_rows, "cpu", repeats))
    error = {label: e for label, _, e in ft_rows}
    measured = (f"error H1P13 {error['FlowTurbo H1P13']:.4f} vs Heun 8 {error['Heun 8']:.4f} vs Euler 15 "
                f"{error['Euler 15']:.4f}")  # fmt: skip
    beats = error["FlowTurbo H1P13"] < min(error["Heun 8"], error["Euler 15"])
    checks.append(("FlowTurbo", "at equal model calls (15) the pseudo-corrector beats Heun and Euler", measured, beats))

    dh_rows, seconds = timed("diffusehigh", lambda: diffusehigh_speed.bench("cpu", repeats, max_stages=1))
    parts.append(diffusehigh_speed.markdown(dh_rows, "cpu", repeats, seconds))
    r = dh_rows[0]
    checks.append(("DiffuseHigh", "cost of the structure guidance over plain upscale + img2img at equal steps",
                   f"latent space {r['DiffuseHigh latent'] / r['plain']:.2f}×, image space "
                   f"{r['DiffuseHigh image'] / r['plain']:.2f}× plain", None))  # fmt: skip

    (name, medians, per_segment), seconds = timed("multitext", lambda: multitext_video_speed.bench("cpu", repeats))
    parts.append(multitext_video_speed.markdown(name, medians, per_segment, "cpu", repeats, seconds))
    default = per_segment["default (decoded_frame)"] / medians["plain"]
    fast = per_segment["latent_frame, inversion_steps = steps / 2"] / medians["plain"]
    checks.append(("Multi-text video", "a continuing segment costs ≤ 3× a plain segment (issue 9)",
                   f"default {default:.2f}×, latent_frame + half inversion {fast:.2f}× (tiny: the VAE dominates)",
                   default <= 3.0))  # fmt: skip

    (vrows, io_rows), seconds = timed("vendi", lambda: vendi_speed.bench(repeats, bank_sizes=(1, 100, 10000)))
    parts.append(vendi_speed.markdown(vrows, io_rows, [], repeats, seconds))
    term = {v["bank"]: v["term"] for v in vrows if v["features"].startswith("pooled")}
    growth = term[max(term)] / term[min(term)]
    measured = f"guidance term {term[min(term)]:.1f} ms at N = {min(term)}, {term[max(term)]:.1f} ms at N = {max(term)}"
    checks.append(("c-VSG", "per-step cost flat in the bank size (≤ 2× from N = 1 to 10000)", measured, growth <= 2))
    return "\n".join(demote(p) for p in parts), checks


def checks_table(checks) -> str:
    lines = ["| technique | claim or target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {t} | {claim} | {measured} | {verdict(ok)} |" for t, claim, measured, ok in checks]
    return "\n".join(lines) + "\n"


def document(parts: dict[str, str], checks, seconds: float, args) -> str:
    gpu = (
        f"GPU figures: [{GPU_RESULT.name}]({GPU_RESULT.name}) (written by `bench/gpu_evidence.py` on a GPU machine)."
        if GPU_RESULT.exists()
        else "GPU figures: not measured yet. No GPU was lent to the session that wrote this; "
        "`bench/gpu_evidence.py` is ready for one (bench/README.md) and writes docs/EVIDENCE_GPU.md."
    )
    lines = [
        "# Evidence: what each technique buys",
        "",
        f"Written by `.venv/bin/python bench/evidence.py --sections {','.join(args.sections)} --repeats {args.repeats} "
        f"--seeds {args.seeds}` in {seconds / 60:.1f} minutes. {environment_line('cpu')}.",
        "",
        "Every table below names the machine, the versions and the date it was measured on. Verdicts compare a "
        "figure with a paper's claim or the project's target; **misses** marks where they disagree, and the text "
        "under the table says why as far as known.",
        "",
        gpu,
        "",
    ]
    if checks:
        lines += ["## Claims and targets at a glance (CPU speed)", "", checks_table(checks)]
    titles = {
        "exact": "## 1. Exactness on analytic models",
        "quality": "## 2. Quality on the demo world",
        "speed": "## 3. Speed on CPU (ratios within one run)",
    }
    for key in ("exact", "quality", "speed"):
        if key in parts:
            lines += [titles[key], "", parts[key]]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: exact, speed, quality")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per speed variant (after a warm-up)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per quality row")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "EVIDENCE.md")
    args = parser.parse_args()
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; valid: {', '.join(SECTIONS)}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    start_comfyui("cpu")
    parts, checks = {}, []
    if "exact" in args.sections:
        import evidence_exact

        parts["exact"] = evidence_exact.exactness()[0]
    if "quality" in args.sections:
        import quality

        parts["quality"] = quality.quality_section(args.seeds)
    if "speed" in args.sections:
        parts["speed"], checks = speed(args.repeats)
    write_atomically(args.out, document(parts, checks, time.perf_counter() - started, args))
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
