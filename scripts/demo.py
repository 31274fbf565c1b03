"""The main job: start ComfyUI's real HTTP server headless with the pack, run one workflow per technique on the
pack's demo models, and write a labelled comparison sheet (baseline vs technique, one row per technique).

Every workflow is an API-format prompt of real nodes (TL_LoadDemoModel, TL_DemoTextEncode, TL_EmptyDemoLatent,
KSampler / SamplerCustomAdvanced, VAEDecode, SaveImage and the pack's technique nodes) queued through POST /prompt;
inputs not set here take the defaults the server reports in /object_info. Each row notes the wall time of both
workflows and, where it means something, what the demo classifier reads: prompted attributes hit (shapes world)
or the Vendi score of the batch in the classifier's feature space.

Usage: python scripts/demo.py [--out out/] [--only pag,tstitch,...]   (run by `make demo`, which sets up first)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from atomic import atomic_destination
from comfy_host import PACK_ROOT, ServerHost
from PIL import Image, ImageDraw, ImageFont

SHEET_NAME = "trajectory_lab_demo.png"
SCALE = 3  # 32 px demo images drawn at 96 px
BATCH = 4
SMALL, LARGE, DIT = "shapes_unet_small", "shapes_unet_large", "shapes_dit_flow"  # TL_LoadDemoModel names


# Pure-torch pack modules the sheet scores with, imported outside the server (tests/test_demo_world.py checks they are).
SCORING_MODULES = ("demo.classifier", "guidance.vendi")
_PACKAGE = "tl_demo_sheet_pack"


def _pack_module(submodule: str):
    """A pure-torch module of the pack, imported from the pack folder as a package of its own name (relative imports
    hold): the scoring runs here, outside the server, and this script's own name (demo) shadows the pack's demo/."""
    if _PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            _PACKAGE, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)]
        )
        sys.modules[_PACKAGE] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[_PACKAGE])
    return importlib.import_module(f"{_PACKAGE}.{submodule}")


# ---------------------------------------------------------------------------------------------------------------
# API-format prompts with defaults from the server
# ---------------------------------------------------------------------------------------------------------------


class Graph:
    """An API-format prompt under construction. `add` returns the new node's id; pass `(id, slot)` or the id
    itself (slot 0) as an input. Required inputs left out take the server's defaults (first combo option)."""

    def __init__(self, object_info: dict) -> None:
        self.info = object_info
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        if class_type not in self.info:
            raise KeyError(f"node {class_type!r} is not loaded in this ComfyUI")
        node_id = f"{len(self.nodes) + 1}_{class_type}"
        values = {}
        for name, spec in self.info[class_type]["input"].get("required", {}).items():
            if name in inputs:
                continue
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):
                values[name] = options.get("default", kind[0])
            elif kind == "COMBO":
                values[name] = options.get("default", options.get("options", [None])[0])
            elif "default" in options:
                values[name] = options["default"]
        for name, value in inputs.items():
            values[name] = [value, 0] if isinstance(value, str) and value in self.nodes else value
            if isinstance(value, tuple):
                values[name] = [value[0], value[1]]
        self.nodes[node_id] = {"class_type": class_type, "inputs": values}
        return node_id


@dataclass
class Variant:
    label: str  # drawn under its images
    build: Callable[[Graph], str]  # adds the workflow, returns the node whose IMAGE output is saved
    frames: int = 1  # images per sample (video: frames of one clip, drawn as a strip)


@dataclass
class Row:
    key: str
    title: str
    note: str
    baseline: Variant
    technique: Variant
    wanted: dict[str, str] | None = None  # attributes the prompt asks for (scored by the classifier)
    vendi: bool = False  # score the batch's diversity
    results: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# The workflows
# ---------------------------------------------------------------------------------------------------------------


def load(g: Graph, name: str) -> str:
    return g.add("TL_LoadDemoModel", model_name=name)


def encode(g: Graph, text: str) -> str:
    return g.add("TL_DemoTextEncode", text=text)


def latent(g: Graph, batch: int = BATCH, size: int = 32) -> str:
    return g.add("TL_EmptyDemoLatent", width=size, height=size, batch_size=batch)


def ksample(g, model, positive, negative, latent_image, steps=20, cfg=3.0, sampler="euler", seed=0) -> str:
    return g.add("KSampler", model=model, positive=positive, negative=negative, latent_image=latent_image, seed=seed,
                 steps=steps, cfg=cfg, sampler_name=sampler, scheduler="normal", denoise=1.0)  # fmt: skip


def custom_sample(g, model, guider, sampler, latent_image, steps, seed=0, scheduler="normal") -> str:
    sigmas = g.add("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=1.0)
    noise = g.add("RandomNoise", noise_seed=seed)
    return g.add("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                 latent_image=latent_image)  # fmt: skip


def decode(g: Graph, samples: str, loader: str) -> str:
    return g.add("VAEDecode", samples=samples, vae=(loader, 1))


def text_to_image(model_name: str, text: str, steps=20, cfg=3.0, patch: Callable | None = None, size=32):
    """KSampler on a demo model; `patch(g, model) -> model` applies a technique to the MODEL first."""

    def build(g: Graph) -> str:
        loader = load(g, model_name)
        model = patch(g, loader) if patch else loader
        sample = ksample(g, model, encode(g, text), encode(g, ""), latent(g, size=size), steps, cfg)
        return decode(g, sample, loader)

    return build


PROMPT = "large red circle left"
# PAG on the middle block alone barely changed these samples (scale 2 to 8); the middle plus every output block does.
PAG_SCALE, PAG_LAYERS = 3.0, "m0,u0,u1,u2,u3,u4,u5"


def pag_row() -> Row:
    pag = lambda g, m: g.add("TL_PerturbedAttention", model=m, scale=PAG_SCALE, layers=PAG_LAYERS)  # noqa: E731
    return Row(
        "pag", "Perturbed-Attention Guidance", f"'{PROMPT}', shapes_unet_large, CFG 3, 20 steps",
        Variant("CFG 3", text_to_image(LARGE, PROMPT)),
        Variant(f"CFG 3 + PAG {PAG_SCALE:g} (m0 and u0-u5)", text_to_image(LARGE, PROMPT, patch=pag)),
        wanted=dict(zip(("size", "colour", "shape", "position"), PROMPT.split(), strict=True)),
    )  # fmt: skip


def tstitch_row() -> Row:
    def stitched(g: Graph, large: str) -> str:
        small = load(g, SMALL)
        return g.add("TL_TStitchModel", small_model=(small, 0), large_model=large, small_fraction=0.4)

    text = "large blue triangle left"
    return Row(
        "tstitch", "T-Stitch", f"'{text}': small UNet (1.5M) for the first 40% of steps, large (2.6M, ~3x the "
        "cost per step) after; 20 steps",
        Variant("large model only", text_to_image(LARGE, text)),
        Variant("small -> large at 40%", text_to_image(LARGE, text, patch=stitched)),
        wanted=dict(zip(("size", "colour", "shape", "position"), text.split(), strict=True)),
    )  # fmt: skip


def fkc_row() -> Row:
    first, second = "blue triangle", "right"

    def composed(fkc: bool) -> Callable[[Graph], str]:
        def build(g: Graph) -> str:
            loader = load(g, LARGE)
            a, b, neg = encode(g, first), encode(g, second), encode(g, "")
            if fkc:
                guider = g.add("TL_FKCGuider", model=loader, positive=a, positive_2=b, negative=neg, cfg=3.0)
                sampler = g.add("TL_FKCSampler", particles=4, noise="target", resample="every_step", output="best")
            else:  # ComfyUI's own prompt AND: the two conditionings combined
                both = g.add("ConditioningCombine", conditioning_1=a, conditioning_2=b)
                guider = g.add("CFGGuider", model=loader, positive=both, negative=neg, cfg=3.0)
                sampler = g.add("KSamplerSelect", sampler_name="euler_ancestral")
            return decode(g, custom_sample(g, loader, guider, sampler, latent(g), 20), loader)

        return build

    return Row(
        "fkc", "Feynman-Kac Correctors", f"'{first}' AND '{second}', shapes_unet_large, 20 steps",
        Variant("ConditioningCombine, euler_ancestral", composed(False)),
        Variant("FKC AND, 4 particles, best", composed(True)),
        wanted={"colour": "blue", "shape": "triangle", "position": "right"},
    )  # fmt: skip


def flowturbo_row() -> Row:
    text = "large red circle left"

    def build_with(sampler_fn: Callable[[Graph], str], steps: int) -> Callable[[Graph], str]:
        def build(g: Graph) -> str:
            loader = load(g, DIT)
            guider = g.add("CFGGuider", model=loader, positive=encode(g, text), negative=encode(g, ""), cfg=3.0)
            return decode(g, custom_sample(g, loader, guider, sampler_fn(g), latent(g), steps, scheduler="simple"),
                          loader)  # fmt: skip

        return build

    euler = lambda g: g.add("KSamplerSelect", sampler_name="euler")  # noqa: E731
    turbo = lambda g: g.add("TL_FlowTurboSampler", heun_steps=1, refine_steps=0)  # noqa: E731
    return Row(
        "flowturbo", "FlowTurbo", f"'{text}', shapes_dit_flow (SD3 MMDiT, rectified flow), 8 model calls each",
        Variant("Euler, 8 steps", build_with(euler, 8)),
        Variant("FlowTurbo: Heun 1 + 6 pseudo-corrector", build_with(turbo, 7)),
        wanted=dict(zip(("size", "colour", "shape", "position"), text.split(), strict=True)),
    )  # fmt: skip


def cvsg_row() -> Row:
    text = "circle"

    def build_with(scale: float) -> Callable[[Graph], str]:
        def build(g: Graph) -> str:
            loader = load(g, LARGE)
            pos, neg = encode(g, text), encode(g, "")
            if scale == 0:
                guider = g.add("CFGGuider", model=loader, positive=pos, negative=neg, cfg=3.0)
            else:
                features = g.add("TL_DemoFeatures", features_name="shapes_attributes")
                guider = g.add("TL_VendiGuider", model=loader, positive=pos, negative=neg, cfg=3.0, scale=scale,
                               every_n_steps=2, memory_bank=f"demo_sheet_{os.getpid()}", vae=(loader, 1),
                               features=features)  # fmt: skip
            sampler = g.add("KSamplerSelect", sampler_name="euler")
            return decode(g, custom_sample(g, loader, guider, sampler, latent(g), 20), loader)

        return build

    return Row(
        "cvsg", "c-VSG (Vendi Score Guidance)", "prompt 'circle', shapes_unet_large; TL_DemoFeatures",
        Variant("CFG 3", build_with(0.0)),
        Variant("c-VSG scale 0.1, every 2 steps", build_with(0.1)),
        wanted={"shape": "circle"}, vendi=True,
    )  # fmt: skip


def diffusehigh_row() -> Row:
    text = "large yellow circle center"

    def high(g: Graph) -> str:
        loader = load(g, LARGE)
        pos, neg = encode(g, text), encode(g, "")
        base = ksample(g, loader, pos, neg, latent(g), 20, 3.0)
        up = g.add("TL_DiffuseHigh", model=loader, positive=pos, negative=neg, vae=(loader, 1), latent=base,
                   scale_factor=2.0, stages=1, denoise=0.5, dwt_steps=5, steps=20, cfg=3.0, seed=0)  # fmt: skip
        return decode(g, up, loader)

    return Row(
        "diffusehigh", "DiffuseHigh", f"'{text}' at 64x64 from a model trained at 32x32 (shapes_unet_large)",
        Variant("direct 64x64 sampling", text_to_image(LARGE, text, size=64)),
        Variant("32x32, then DiffuseHigh x2", high),
        wanted=dict(zip(("size", "colour", "shape", "position"), text.split(), strict=True)),
    )  # fmt: skip


def video_row(object_info: dict) -> Row | None:
    """Multi-text video, when the demo video model and TL_DemoPromptSequence are there."""
    if "TL_DemoPromptSequence" not in object_info:
        return None
    options = object_info["TL_LoadDemoModel"]["input"]["required"]["model_name"]
    names = options[0] if isinstance(options[0], list) else options[1].get("options", [])
    if "shapes_video_wan" not in names or not (PACK_ROOT / "demo/weights/shapes_video_wan.safetensors").is_file():
        return None
    prompts = ["red circle moves right", "red circle moves down"]
    frames = 4  # the clip length shapes_video_wan was trained on

    def independent(g: Graph) -> str:
        loader = load(g, "shapes_video_wan")
        empty = g.add("TL_EmptyDemoLatent", width=16, height=16, batch_size=1, frames=frames)
        clips = [ksample(g, loader, encode(g, p), encode(g, ""), empty, 20, 5.0, seed=i) for i, p in enumerate(prompts)]
        joined = g.add("LatentConcat", samples1=clips[0], samples2=clips[1], dim="t")
        return decode(g, joined, loader)

    def multitext(g: Graph) -> str:
        loader = load(g, "shapes_video_wan")
        seq = g.add("TL_DemoPromptSequence", text="\n".join(prompts))
        empty = g.add("TL_EmptyDemoLatent", width=16, height=16, batch_size=1, frames=frames)
        video = g.add("TL_MultiTextVideo", model=loader, vae=(loader, 1), prompts=seq, negative=encode(g, ""),
                      latent=empty, seed=0, steps=20, cfg=5.0)  # fmt: skip
        return decode(g, video, loader)

    return Row(
        "video", "Multi-text video", " then ".join(f"'{p}'" for p in prompts) + " (shapes_video_wan)",
        Variant("each prompt sampled alone", independent, frames=2 * frames),
        Variant("TL_MultiTextVideo", multitext, frames=2 * frames - 1),
    )  # fmt: skip


ROWS = {"pag": pag_row, "tstitch": tstitch_row, "fkc": fkc_row, "flowturbo": flowturbo_row, "cvsg": cvsg_row,
        "diffusehigh": diffusehigh_row}  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------
# Running and scoring
# ---------------------------------------------------------------------------------------------------------------


def run_variant(server: ServerHost, object_info: dict, variant: Variant, prefix: str) -> tuple[list, float]:
    """Queue the variant's workflow with a SaveImage; return its images (PIL) and wall time."""
    g = Graph(object_info)
    g.add("SaveImage", images=variant.build(g), filename_prefix=prefix)
    save_id = next(n for n in g.nodes if n.endswith("_SaveImage"))
    started = time.monotonic()
    entry = server.run(g.nodes)
    seconds = time.monotonic() - started
    files = entry["outputs"][save_id]["images"]
    images = [Image.open(server.base_dir / "output" / f["subfolder"] / f["filename"]).convert("RGB") for f in files]
    return images, seconds


class Judge:
    """The shapes attribute classifier, read directly from the pack's weights (pure torch)."""

    def __init__(self) -> None:
        classifier = _pack_module("demo.classifier")
        self.model = classifier.load_classifier(PACK_ROOT / "demo/weights/shapes_classifier.safetensors")
        self.vendi = _pack_module("guidance.vendi").vendi_score

    @staticmethod
    def tensor(images: list) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(i, np.float32) / 255.0 for i in images])).movedim(-1, 1)

    def hits(self, images: list, wanted: dict[str, str]) -> str:
        predicted = self.model.predict(self.tensor(images))
        right = sum(all(predicted[k][i] == v for k, v in wanted.items()) for i in range(len(images)))
        return f"{right}/{len(images)} as prompted"

    def diversity(self, images: list) -> str:
        with torch.no_grad():
            return f"Vendi {float(self.vendi(self.model.features(self.tensor(images)))):.2f}"


# ---------------------------------------------------------------------------------------------------------------
# The sheet
# ---------------------------------------------------------------------------------------------------------------

LABEL_WIDTH, GAP, PAD = 250, 4, 14
TEXT, MUTED, BACKGROUND = (20, 20, 20), (90, 90, 90), (250, 250, 248)


def _font(size: int):
    return ImageFont.load_default(size=size)


def _strip(images: list, cell: int, per_row: int) -> Image.Image:
    """Images side by side at `cell` px (nearest: the pixels the model made), wrapped after per_row."""
    rows = (len(images) + per_row - 1) // per_row
    width = min(len(images), per_row)
    strip = Image.new("RGB", (width * cell + (width - 1) * GAP, rows * cell + (rows - 1) * GAP), BACKGROUND)
    for i, image in enumerate(images):
        x, y = (i % per_row) * (cell + GAP), (i // per_row) * (cell + GAP)
        strip.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
    return strip


def render_sheet(rows: list[Row], elapsed: float) -> Image.Image:
    cell = 32 * SCALE
    group_width = BATCH * cell + (BATCH - 1) * GAP
    title_font, label_font, small_font = _font(22), _font(15), _font(12)
    blocks = []
    for row in rows:
        strips = []
        for side in ("baseline", "technique"):
            variant: Variant = getattr(row, side)
            images = row.results[side]["images"]
            if variant.frames > 1:  # a clip: its frames in reading order, at most 8 per line, fitted to the group
                per_row = min(8, len(images))
                strips.append(_strip(images, min(cell // 2, (group_width - (per_row - 1) * GAP) // per_row), per_row))
            else:
                strips.append(_strip(images, cell, BATCH))
        height = max(s.height for s in strips) + 44
        blocks.append((row, strips, max(height, 100)))
    width = PAD + LABEL_WIDTH + 2 * (group_width + PAD) + PAD
    height = PAD + 60 + sum(h + PAD for _, _, h in blocks) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), "Trajectory Lab: each technique vs its baseline on the demo models", TEXT, title_font)
    draw.text((PAD, PAD + 30), f"ComfyUI {comfy_version()} headless, CPU; seed 0; {elapsed:.0f} s in all. Left: "
              "baseline, right: technique.", MUTED, small_font)  # fmt: skip
    y = PAD + 60
    for row, strips, h in blocks:
        draw.line([(PAD, y - PAD // 2), (width - PAD, y - PAD // 2)], fill=(215, 215, 210))
        draw.text((PAD, y), row.title, TEXT, label_font)
        for i, line in enumerate(_wrap(row.note, 34)):
            draw.text((PAD, y + 22 + 16 * i), line, MUTED, small_font)
        for k, side in enumerate(("baseline", "technique")):
            x = PAD + LABEL_WIDTH + k * (group_width + PAD)
            result = row.results[side]
            sheet.paste(strips[k], (x, y))
            below = y + strips[k].height + 4
            draw.text((x, below), getattr(row, side).label, TEXT, small_font)
            draw.text((x, below + 15), "; ".join([f"{result['seconds']:.1f} s", *result["scores"]]), MUTED, small_font)
        y += h + PAD
    return sheet


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def comfy_version() -> str:
    from comfyui_tree import comfyui_tree

    version_file = comfyui_tree() / "comfyui_version.py"
    text = version_file.read_text() if version_file.is_file() else ""
    return text.split('"')[1] if '"' in text else "?"


def save_atomically(image: Image.Image, target: Path) -> None:
    with atomic_destination(target) as tmp:
        image.save(tmp, format="PNG")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACK_ROOT / "out", help="folder for the sheet")
    parser.add_argument("--only", default="", help=f"comma-separated rows to run (default: all): {', '.join(ROWS)}, "
                        "video")  # fmt: skip
    args = parser.parse_args()
    started = time.monotonic()
    judge = Judge()
    with ServerHost({"trajectory_lab": PACK_ROOT}) as server:
        print(f"ComfyUI server ready at {server.url} ({time.monotonic() - started:.1f} s)", flush=True)
        object_info = server.get_json("/object_info")
        rows = [make() for make in ROWS.values()]
        video = video_row(object_info)
        rows += [video] if video is not None else []
        if args.only:
            rows = [r for r in rows if r.key in args.only.split(",")]
        for row in rows:
            for side in ("baseline", "technique"):
                variant = getattr(row, side)
                images, seconds = run_variant(server, object_info, variant, f"{row.key}_{side}")
                scores = []
                if row.wanted:
                    scores.append(judge.hits(images, row.wanted))
                if row.vendi:
                    scores.append(judge.diversity(images))
                row.results[side] = {"images": images, "seconds": seconds, "scores": scores}
                print(f"{row.title:32s} {side:9s} {seconds:5.1f} s  {'; '.join(scores)}", flush=True)
        if video is None:
            print("multi-text video row left out: the demo video model (shapes_video_wan) is not there yet")
    elapsed = time.monotonic() - started
    target = args.out / SHEET_NAME
    save_atomically(render_sheet(rows, elapsed), target)
    print(f"wrote {target} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
