"""DiffuseHigh speed: TL_DiffuseHigh vs plain upscale + img2img at the same steps, image vs latent guidance space.

Usage: .venv/bin/python bench/diffusehigh_speed.py [--device cpu|cuda] [--out docs/DIFFUSEHIGH_SPEED.md] [--repeats N]

cpu: the test suite's tiny SD1.5 UNet and tiny VAE, 64² -> 128² (1 stage) and -> 256² (2 stages).
cuda: an SDXL-size UNet (fp16) and an SD-size VAE (ComfyUI's default VAE dtype), random weights, 1024² -> 2048².
Every variant runs the same latent, conditioning, seed and sampler (euler, 15 steps at denoise 0.3 = the paper's
last 15 of 50, cfg 7.5, batch 1). "plain" is ComfyUI's own VAEDecode -> ImageScale bicubic -> VAEEncode -> KSampler
per stage. Wall time of the whole upscale, median of repeats after one warm-up, variants interleaved per repeat.
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
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    FULL_SIZE,
    bench_arguments,
    build_full_size,
    processor_name,
    random_conditioning,
    start_comfyui,
    write_atomically,
)

REPO = Path(__file__).resolve().parent.parent
STEPS, DENOISE, CFG, DWT_STEPS, SCALE = 15, 0.3, 7.5, 5, 2.0
VARIANTS = ("plain", "DiffuseHigh dwt_steps 0", "DiffuseHigh image", "DiffuseHigh latent")
# SD1.x/SDXL VAE (AutoencoderKL) at full size, as ComfyUI's VAE config path builds it.
FULL_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip


def build_full_size_vae():
    """A full-size SD VAE with seeded random weights (timings only)."""
    import comfy.sd
    import tiny_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = {"params": {"ddconfig": FULL_VAE, "embed_dim": 4}}
    with torch.inference_mode(False), torch.no_grad():
        donor = tiny_models.fill_seeded_(AutoencoderKL(**config["params"]), 0)
        return comfy.sd.VAE(sd=donor.state_dict(), config=config)


def cases(device: str):
    """(name, model, vae, positive, negative, base latent, stage counts) per benchmarked setting."""
    if device == "cpu":
        import tiny_models

        positive = tiny_models.tiny_conditioning("sd15", 1)
        negative = [[torch.zeros_like(positive[0][0]), {}]]
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        model, vae = tiny_models.build_tiny_model("sd15"), tiny_models.build_tiny_vae(4)
        yield "tiny SD1.5 UNet + tiny VAE (CPU), 64² base", model, vae, positive, negative, latent, (1, 2)
        return
    cls_name, dtype, unet_config, _, tokens, width, pooled = FULL_SIZE["SDXL 1024²"]
    started = time.perf_counter()
    model, vae = build_full_size(cls_name, dtype, unet_config), build_full_size_vae()
    print(f"SDXL-size UNet + SD VAE built in {time.perf_counter() - started:.1f} s", flush=True)
    positive = random_conditioning(1, tokens, width, pooled)
    pooled_zero = torch.zeros_like(positive[0][1]["pooled_output"])
    negative = [[torch.zeros_like(positive[0][0]), {"pooled_output": pooled_zero}]]
    latent = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0))
    yield "SDXL-size UNet fp16 + SD VAE, 1024² base", model, vae, positive, negative, latent, (1,)


def plain_chain(model, vae, positive, negative, latent: dict, stages: int) -> torch.Tensor:
    """Plain upscale + img2img with ComfyUI's own nodes, stage by stage."""
    from harness import in_process_host

    nodes = in_process_host().nodes  # ComfyUI's nodes.py, not the pack's nodes/ package

    ratio = vae.downscale_ratio if isinstance(vae.downscale_ratio, int) else 8  # SD VAEs 8, the demo VAE 4
    base_h, base_w = (ratio * s for s in latent["samples"].shape[-2:])
    for k in range(1, stages + 1):
        image = nodes.VAEDecode().decode(vae, latent)[0]
        image = nodes.ImageScale().upscale(image, "bicubic", round(base_w * SCALE**k), round(base_h * SCALE**k),
                                           "disabled")[0]  # fmt: skip
        latent = nodes.VAEEncode().encode(vae, image)[0]
        latent = nodes.common_ksampler(model, 0, STEPS, CFG, "euler", "normal", positive, negative, latent,
                                       denoise=DENOISE)[0]  # fmt: skip
    return latent["samples"]


def low_band_error(vae, base: torch.Tensor, out: torch.Tensor, sharpen: float) -> float:
    """||LL(out) - LL(start latent)|| / ||LL(start latent)|| for one stage (db4, symmetric); the start latent is
    VAEEncode(sharpen(bicubic(VAEDecode(base)))), with the variant's own sharpening."""
    from harness import pack

    wavelets, sharpening = pack("guidance.wavelets"), pack("guidance.sharpen")
    image = vae.decode(base).movedim(-1, 1)
    size = tuple(int(SCALE * s) for s in image.shape[-2:])
    guide = sharpening.sharpen(torch.nn.functional.interpolate(image, size=size, mode="bicubic"), sharpen)
    reference = wavelets.dwt2(vae.encode(guide.movedim(1, -1)).to(out.device), "db4", "symmetric").low
    low = wavelets.dwt2(out.float(), "db4", "symmetric").low
    return float((low - reference).norm() / reference.norm())


def run_case(dh_nodes, name, model, vae, positive, negative, base, stages: int, repeats: int, sync) -> dict:
    """Time every variant on one setting (interleaved per repeat) and, for one stage, measure the low-band error."""
    common = dict(model=model, positive=positive, negative=negative, vae=vae, latent={"samples": base},
                  scale_factor=SCALE, stages=stages, denoise=DENOISE, wavelet="db4", sharpen=1.0, seed=0,
                  steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal")  # fmt: skip

    def node(**overrides):
        return lambda: dh_nodes.DiffuseHigh.execute(**{**common, **overrides}).result[0]["samples"]

    variants = {
        "plain": lambda: plain_chain(model, vae, positive, negative, {"samples": base}, stages),
        "DiffuseHigh dwt_steps 0": node(dwt_steps=0),
        "DiffuseHigh image": node(dwt_steps=DWT_STEPS, guidance_space="image"),
        "DiffuseHigh latent": node(dwt_steps=DWT_STEPS, guidance_space="latent"),
    }
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with torch.inference_mode():
        outs = {v: fn() for v, fn in variants.items()}  # warm-up
        for _ in range(repeats):
            for v, fn in variants.items():
                sync()
                started = time.perf_counter()
                fn()
                sync()
                times[v].append(time.perf_counter() - started)
        errors = {}
        if stages == 1:
            errors = {v: low_band_error(vae, base, outs[v], 0.0 if v == "plain" else 1.0) for v in VARIANTS}
    out_side = outs["plain"].shape[-1] * 8
    return {"case": name, "stages": stages, "output": f"{out_side}²",
            **{v: statistics.median(t) for v, t in times.items()}, "errors": errors}  # fmt: skip


def bench(device: str, repeats: int, max_stages: int = 2) -> list[dict]:
    start_comfyui(device)
    import comfy.model_management as mm
    from harness import pack

    dh_nodes = pack("nodes.diffusehigh")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for case in cases(device):
        *setting, stage_counts = case
        for stages in [k for k in stage_counts if k <= max_stages]:
            row = run_case(dh_nodes, *setting, stages, repeats, sync)
            rows.append(row)
            errors = row["errors"]
            print(f"{row['case']}, {stages} stage(s): " + ", ".join(f"{v} {row[v]:.3f} s" for v in VARIANTS)
                  + ("; LL error " + ", ".join(f"{v} {e:.3f}" for v, e in errors.items()) if errors else ""),
                  flush=True)  # fmt: skip
        del case, setting
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()
    return rows


def markdown(rows: list[dict], device: str, repeats: int, seconds: float) -> str:
    import comfyui_version

    lines = [
        "# DiffuseHigh speed: overhead of the structure guidance",
        "",
        f"`bench/diffusehigh_speed.py --device {device}`, {datetime.date.today().isoformat()}, {seconds:.0f} s in "
        f"all. {processor_name(device)}; torch {torch.__version__}; ComfyUI {comfyui_version.__version__}; "
        f"Python {platform.python_version()}.",
        "",
        f"Each stage: x{SCALE:g} bicubic, euler {STEPS} steps at denoise {DENOISE:g} (the paper's last 15 of 50), "
        f"cfg {CFG:g}, batch 1, seed 0. plain = ComfyUI's VAEDecode -> ImageScale bicubic -> VAEEncode -> KSampler "
        f"per stage; DiffuseHigh with sharpen 1 and db4, dwt_steps {DWT_STEPS} in image space (decode + swap + "
        "encode per guided step, as the paper) or latent space (swap on the latent, no VAE call). Wall time of the "
        f"whole upscale, median of {repeats} repeats after one warm-up. (×) = time / plain. Last column: the extra "
        "time of one image-space guided step (a VAE decode + encode at the stage size) over a latent-space one.",
        "",
        "dwt_steps 0 does the same work as plain plus one 3x3 sharpening per stage (its output equals plain's bit "
        "for bit when sharpen is 0, see tests/test_diffusehigh.py); on shared CPUs the same variant timed twice in "
        "one run differs by up to ~10%, so read differences that small as noise.",
        "",
        "| case | stages | output | plain s | DiffuseHigh dwt_steps 0 | DiffuseHigh image | DiffuseHigh latent "
        "| image − latent per guided step |",
        "|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for r in rows:

        def x(v, r=r):
            return f"{r[v]:.3f} ({r[v] / r['plain']:.2f}×)"

        per_step = (r["DiffuseHigh image"] - r["DiffuseHigh latent"]) / (DWT_STEPS * r["stages"])
        lines.append(
            f"| {r['case']} | {r['stages']} | {r['output']} | {r['plain']:.3f} | {x('DiffuseHigh dwt_steps 0')} "
            f"| {x('DiffuseHigh image')} | {x('DiffuseHigh latent')} | {1000 * per_step:.0f} ms |"
        )
    with_errors = [r for r in rows if r["errors"]]
    if with_errors:
        lines += [
            "",
            "Structure kept (1 stage): relative low-band distance ||LL(output) − LL(start)|| / ||LL(start)|| in the "
            "latent the sampler works on (db4, symmetric; start = VAEEncode(sharpen(bicubic(VAEDecode(input)))), "
            "each variant with its own sharpening). Random weights: this shows how strongly each variant holds the "
            "upscaled structure against the model, not image quality.",
            "",
            "| case | " + " | ".join(VARIANTS) + " |",
            "|---|" + "--:|" * len(VARIANTS),
        ]
        for r in with_errors:
            lines.append(f"| {r['case']} | " + " | ".join(f"{r['errors'][v]:.3f}" for v in VARIANTS) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = bench_arguments(__doc__, "DIFFUSEHIGH_SPEED.md", 5, 5)
    if args is None:
        return 2
    started = time.perf_counter()
    rows = bench(args.device, args.repeats)
    write_atomically(args.out, markdown(rows, args.device, args.repeats, time.perf_counter() - started))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
