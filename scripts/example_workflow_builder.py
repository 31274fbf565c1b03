"""Write example_workflows/: every workflow built node by node by the real ComfyUI frontend in headless Chromium.

Each workflow below is a compact spec (node types, widget values by name, links by input name). The frontend
itself creates the nodes, sets the widgets, links them and saves the graph, so the files are exactly what a
user's ComfyUI saves (UI format, example_workflows/<name>.json) and exports for scripting (API format,
example_workflows/api/<name>.json; ComfyUI's template browser lists only the top folder). Thumbnails
(<name>.jpg): for demo workflows the images they make (so building them runs them; a second row with the
technique switched off where the workflow names a baseline), for the others a screenshot of the graph.

    .venv/bin/python scripts/example_workflow_builder.py            # rewrite every workflow
    .venv/bin/python scripts/example_workflow_builder.py pag_sdxl   # only these
    .venv/bin/python scripts/example_workflow_builder.py --graphs-only   # JSON only: no demo runs
"""

from __future__ import annotations

import io
import json
import math
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from atomic import write_atomically
from comfyui_tree import REPO_ROOT

EXAMPLES_DIR = REPO_ROOT / "example_workflows"
API_DIR = EXAMPLES_DIR / "api"
PACK_FOLDER = "Trajectory-Lab"
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}  # the frontend's own nodes: saved, never sent to the server
THUMBNAIL_SIZE = (512, 320)


@dataclass
class N:
    """One node: `inputs` maps an input name to (source node id, output slot)."""

    id: int
    type: str
    widgets: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    title: str | None = None


@dataclass
class Workflow:
    name: str
    note: str
    nodes: list[N]
    demo: bool = False  # runs on the pack's demo models (no download); the browser test queues these
    # Widget values that switch the technique off ({node id: {widget: value}}): the thumbnail's second row.
    baseline: dict = field(default_factory=dict)


def note(text: str) -> N:
    return N(99, "MarkdownNote", {"text": text}, title="About this workflow")


def seed(value: int = 0) -> dict:
    return {"seed": value, "control_after_generate": "fixed"}


NEGATIVE = "blurry, low quality, distorted, watermark, text"


def sdxl_text(loader: int, positive: str, first_id: int) -> list[N]:
    return [
        N(first_id, "CLIPTextEncode", {"text": positive}, {"clip": (loader, 1)}, title="Positive prompt"),
        N(first_id + 1, "CLIPTextEncode", {"text": NEGATIVE}, {"clip": (loader, 1)}, title="Negative prompt"),
    ]


def decode_and_save(id_: int, samples: tuple[int, int], vae: tuple[int, int], prefix: str) -> list[N]:
    return [
        N(id_, "VAEDecode", inputs={"samples": samples, "vae": vae}),
        N(id_ + 1, "SaveImage", {"filename_prefix": f"trajectory_lab/{prefix}"}, {"images": (id_, 0)}),
    ]


def custom_sampling(id_: int, noise: int, guider: int, sampler: int, sigmas: int, latent: int) -> N:
    sources = {"noise": noise, "guider": guider, "sampler": sampler, "sigmas": sigmas, "latent_image": latent}
    return N(id_, "SamplerCustomAdvanced", inputs={name: (source, 0) for name, source in sources.items()})


SDXL = "sd_xl_base_1.0.safetensors"


def _real_workflows() -> list[Workflow]:
    pag_sdxl = Workflow(
        "pag_sdxl",
        "**Perturbed-Attention Guidance on SDXL.** TL_PerturbedAttention patches the model; any sampler then "
        "adds `scale * (cond - perturbed cond)` on top of CFG. Use a lower CFG than usual (3-5): PAG supplies "
        "much of the structure CFG would. The timeline on the node shows the guided window "
        "(start_percent to end_percent). Put `sd_xl_base_1.0.safetensors` in models/checkpoints.",
        [
            N(1, "CheckpointLoaderSimple", {"ckpt_name": SDXL}),
            N(2, "TL_PerturbedAttention", {"scale": 3.0, "end_percent": 1.0}, {"model": (1, 0)}),
            *sdxl_text(1, "a red fox sitting in a snowy forest at golden hour, detailed fur, photograph", 3),
            N(5, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            N(
                6,
                "KSampler",
                {**seed(42), "steps": 25, "cfg": 4.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"},
                {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)},
            ),
            *decode_and_save(7, (6, 0), (1, 2), "pag_sdxl"),
        ],
    )
    sd35 = "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
    pag_sd3 = Workflow(
        "pag_sd3",
        "**Perturbed-Attention Guidance on a DiT (SD3.5 Medium).** On MMDiT, Flux and Wan the perturbed pass "
        "replaces the image-token self-attention of the chosen blocks (`layers`: auto picks block 1, diffusers' SD3 "
        "default) by the identity. Put the SD3.5 Medium checkpoint that includes its text encoders in "
        "models/checkpoints.",
        [
            N(1, "CheckpointLoaderSimple", {"ckpt_name": sd35}),
            N(2, "TL_PerturbedAttention", {"scale": 2.0}, {"model": (1, 0)}),
            *sdxl_text(1, "a lighthouse on a cliff above a stormy sea, dramatic clouds, oil painting", 3),
            N(5, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            N(
                6,
                "KSampler",
                {**seed(7), "steps": 28, "cfg": 3.5, "sampler_name": "euler", "scheduler": "sgm_uniform"},
                {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0)},
            ),
            *decode_and_save(7, (6, 0), (1, 2), "pag_sd3"),
        ],
    )
    tstitch = Workflow(
        "tstitch_ssd1b_sdxl",
        "**T-Stitch: SSD-1B then SDXL.** The small SSD-1B (same latent space and text encoders as SDXL) "
        "denoises the first 40% of the steps, where the image's layout forms and a small model suffices; "
        "SDXL finishes the details. An SSD-1B step costs about 0.6 of an SDXL step, so this takes about 15% less "
        "time than SDXL alone; raise small_fraction for more. The timeline on the node marks the switch. Put "
        "`SSD-1B.safetensors` and `sd_xl_base_1.0.safetensors` in models/checkpoints.",
        [
            N(1, "CheckpointLoaderSimple", {"ckpt_name": "SSD-1B.safetensors"}, title="Small model (SSD-1B)"),
            N(2, "CheckpointLoaderSimple", {"ckpt_name": SDXL}, title="Large model (SDXL)"),
            N(
                3,
                "TL_TStitchModel",
                {"small_fraction": 0.4, "switch_by": "steps"},
                {"small_model": (1, 0), "large_model": (2, 0)},
            ),  # fmt: skip
            *sdxl_text(2, "an isometric cutaway of a cozy library inside a tree, warm light, highly detailed", 4),
            N(6, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            N(
                7,
                "KSampler",
                {**seed(3), "steps": 30, "cfg": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"},
                {"model": (3, 0), "positive": (4, 0), "negative": (5, 0), "latent_image": (6, 0)},
            ),
            *decode_and_save(8, (7, 0), (2, 2), "tstitch_sdxl"),
        ],
    )
    fkc = Workflow(
        "fkc_sdxl",
        "**Feynman-Kac Correctors on SDXL.** TL_FKCSampler runs `particles` copies of each image along the SDE "
        "of the guider's target and resamples them by their weights, so the result follows the CFG (or "
        "prompt-product) distribution instead of plain CFG's approximation. Costs `particles` times a normal "
        "run. After a run the sampler node plots the effective sample size per step and marks resampling.",
        [
            N(1, "CheckpointLoaderSimple", {"ckpt_name": SDXL}),
            *sdxl_text(1, "a bowl of ramen with a soft-boiled egg, steam, studio food photography", 2),
            N(4, "TL_FKCGuider", {"cfg": 4.0, "beta": 1.0}, {"model": (1, 0), "positive": (2, 0), "negative": (3, 0)}),
            N(5, "TL_FKCSampler", {"particles": 4, "noise": "target", "resample": "ess", "ess_threshold": 0.5}),
            N(6, "RandomNoise", {"noise_seed": 11, "control_after_generate": "fixed"}),
            N(7, "BasicScheduler", {"scheduler": "karras", "steps": 25, "denoise": 1.0}, {"model": (1, 0)}),
            N(8, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            custom_sampling(9, noise=6, guider=4, sampler=5, sigmas=7, latent=8),
            *decode_and_save(10, (9, 0), (1, 2), "fkc_sdxl"),
        ],
    )
    cvsg = Workflow(
        "cvsg_sdxl",
        "**Contextualized Vendi Score Guidance on SDXL.** Every `every_n_steps` steps the guider pushes each "
        "image away from the earlier generations stored in the memory bank (CLIP-vision features here), so "
        "repeated runs of one prompt stay diverse. The Clear button on the node empties the bank. Needs a "
        "CLIP vision model (ViT-B/32 in the paper) in models/clip_vision.",
        [
            N(1, "CheckpointLoaderSimple", {"ckpt_name": SDXL}),
            *sdxl_text(1, "a photo of a dog in a park", 2),
            N(4, "CLIPVisionLoader", {"clip_name": "clip_vit_b32.safetensors"}),
            N(5, "TL_CLIPVisionFeatures", {"crop": True}, {"clip_vision": (4, 0)}),
            N(
                6,
                "TL_VendiGuider",
                {"cfg": 6.0, "scale": 0.05, "contextual_weight": 2.0, "every_n_steps": 5, "memory_bank": "dogs"},
                {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "vae": (1, 2), "features": (5, 0)},
            ),
            N(7, "KSamplerSelect", {"sampler_name": "euler"}),
            N(8, "BasicScheduler", {"scheduler": "normal", "steps": 25, "denoise": 1.0}, {"model": (1, 0)}),
            N(9, "RandomNoise", {"noise_seed": 5, "control_after_generate": "increment"}),
            N(10, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 4}),
            custom_sampling(11, noise=9, guider=6, sampler=7, sigmas=8, latent=10),
            *decode_and_save(12, (11, 0), (1, 2), "cvsg_sdxl"),
            N(14, "TL_VendiScore", inputs={"images": (12, 0)}),
            N(15, "PreviewAny", inputs={"source": (14, 0)}, title="Vendi score of the batch"),
        ],
    )
    diffusehigh = Workflow(
        "diffusehigh_sdxl",
        "**DiffuseHigh on SDXL: 1024 to 2048 without training.** Generate at the model's native size, then "
        "TL_DiffuseHigh upscales, sharpens, re-noises to `denoise` and denoises again, holding the layout by "
        "replacing the wavelet low band for the first `dwt_steps` steps. `stages` > 1 goes 2x per stage.",
        [
            N(1, "CheckpointLoaderSimple", {"ckpt_name": SDXL}),
            *sdxl_text(1, "a detailed watercolor map of an imaginary coastal city, many tiny buildings", 2),
            N(4, "EmptyLatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            N(
                5,
                "KSampler",
                {**seed(21), "steps": 25, "cfg": 6.0, "sampler_name": "dpmpp_2m", "scheduler": "karras"},
                {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)},
            ),
            N(
                6,
                "TL_DiffuseHigh",
                {
                    "scale_factor": 2.0,
                    "stages": 1,
                    "denoise": 0.3,
                    "dwt_steps": 5,
                    **seed(21),
                    "steps": 15,
                    "cfg": 6.0,
                    "sampler_name": "dpmpp_2m",
                    "scheduler": "karras",
                },
                {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "vae": (1, 2), "latent": (5, 0)},
            ),  # fmt: skip
            *decode_and_save(7, (6, 0), (1, 2), "diffusehigh_sdxl"),
        ],
    )
    flux_text = "a hummingbird drinking from a glass flower, macro photograph, shallow depth of field"
    flowturbo = Workflow(
        "flowturbo_flux",
        "**FlowTurbo on Flux.1-dev.** One Heun step, then pseudo-corrector steps that reuse the cached velocity "
        "(one model call each): 8 steps here at 9 model calls. A distilled velocity refiner "
        "(TL_TrainVelocityRefiner, then TL_LoadVelocityRefiner into `refiner`) adds `refine_steps` steps with "
        "no model call. Files: flux1-dev in models/diffusion_models, clip_l and t5xxl in models/text_encoders, "
        "ae in models/vae.",
        [
            N(1, "UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}),
            N(
                2,
                "DualCLIPLoader",
                {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"},
            ),  # fmt: skip
            N(3, "VAELoader", {"vae_name": "ae.safetensors"}),
            N(4, "CLIPTextEncode", {"text": flux_text}, {"clip": (2, 0)}, title="Prompt"),
            N(5, "FluxGuidance", {"guidance": 3.5}, {"conditioning": (4, 0)}),
            N(6, "BasicGuider", inputs={"model": (1, 0), "conditioning": (5, 0)}),
            N(7, "TL_FlowTurboSampler", {"heun_steps": 1, "refine_steps": 0}),
            N(8, "BasicScheduler", {"scheduler": "simple", "steps": 8, "denoise": 1.0}, {"model": (1, 0)}),
            N(9, "RandomNoise", {"noise_seed": 8, "control_after_generate": "fixed"}),
            N(10, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}),
            custom_sampling(11, noise=9, guider=6, sampler=7, sigmas=8, latent=10),
            *decode_and_save(12, (11, 0), (3, 0), "flowturbo_flux"),
        ],
    )
    wan = Workflow(
        "multitext_video_wan",
        "**Multi-text video on Wan 2.1 T2V 1.3B.** One prompt per line, one segment each: the first is sampled "
        "normally, each later one starts from the previous segment's last frame (last-frame-aware inversion, "
        "Dynamic Noise, structure guidance) so the scenes flow into each other. Files: the Wan 2.1 T2V 1.3B "
        "model in models/diffusion_models, umt5_xxl in models/text_encoders, the Wan 2.1 VAE in models/vae.",
        [
            N(1, "UNETLoader", {"unet_name": "wan2.1_t2v_1.3B_fp16.safetensors", "weight_dtype": "default"}),
            N(2, "CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"}),
            N(3, "VAELoader", {"vae_name": "wan_2.1_vae.safetensors"}),
            N(4, "ModelSamplingSD3", {"shift": 8.0}, {"model": (1, 0)}),
            N(
                5,
                "TL_PromptSequence",
                {
                    "text": "a paper boat floats on a calm pond\n"
                    "the paper boat drifts into a stream with small rapids\n"
                    "the paper boat sails out onto a wide lake at sunset"
                },
                {"clip": (2, 0)},
            ),  # fmt: skip
            N(6, "CLIPTextEncode", {"text": NEGATIVE + ", static, flicker"}, {"clip": (2, 0)}, title="Negative"),
            N(7, "EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33, "batch_size": 1}),
            N(
                8,
                "TL_MultiTextVideo",
                {
                    **seed(1),
                    "steps": 30,
                    "cfg": 6.0,
                    "last_frame_inversion": 0.5,
                    "dynamic_noise": True,
                    "structure_guidance": 7.0,
                },
                {"model": (4, 0), "vae": (3, 0), "prompts": (5, 0), "negative": (6, 0), "latent": (7, 0)},
            ),  # fmt: skip
            N(9, "VAEDecode", inputs={"samples": (8, 0), "vae": (3, 0)}),
            N(
                10,
                "SaveAnimatedWEBP",
                {"filename_prefix": "trajectory_lab/multitext_video_wan", "fps": 16.0},
                {"images": (9, 0)},
            ),  # fmt: skip
        ],
    )
    return [pag_sdxl, pag_sd3, tstitch, fkc, cvsg, diffusehigh, flowturbo, wan]


DEMO_NOTE = (
    "\n\nRuns anywhere in seconds on the pack's own demo models (32x32 shapes world, trained by the project; "
    "prompts use its words: small/large, red/green/blue/yellow, circle/square/triangle, left/center/right)."
)


def demo_loader(id_: int, model: str, title: str | None = None) -> N:
    return N(id_, "TL_LoadDemoModel", {"model_name": model}, title=title)


def demo_text(id_: int, text: str, title: str) -> N:
    return N(id_, "TL_DemoTextEncode", {"text": text}, title=title)


def demo_latent(id_: int, batch: int = 4, size: int = 32, frames: int = 0) -> N:
    return N(id_, "TL_EmptyDemoLatent", {"width": size, "height": size, "batch_size": batch, "frames": frames})


def ksampler(id_: int, model, positive, negative, latent, steps: int, cfg: float, sampler="euler", value=0) -> N:
    widgets = {**seed(value), "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "normal"}
    links = {"model": model, "positive": positive, "negative": negative, "latent_image": latent}
    return N(id_, "KSampler", widgets, links)


def _demo_workflows() -> list[Workflow]:
    pag = Workflow(
        "pag_demo",
        "**Perturbed-Attention Guidance, demo UNet.** Compare with scale 0: PAG sharpens the shapes and their "
        "edges at a low CFG." + DEMO_NOTE,
        [
            demo_loader(1, "shapes_unet_large"),
            N(2, "TL_PerturbedAttention", {"scale": 3.0}, {"model": (1, 0)}),
            demo_text(3, "large red circle left", "Positive prompt"),
            demo_text(4, "", "Negative prompt (empty: unconditional)"),
            demo_latent(5),
            ksampler(6, (2, 0), (3, 0), (4, 0), (5, 0), steps=20, cfg=3.0),
            *decode_and_save(7, (6, 0), (1, 1), "demo_pag"),
        ],
        demo=True,
        baseline={2: {"scale": 0.0}},
    )
    tstitch = Workflow(
        "tstitch_demo",
        "**T-Stitch, demo UNets.** The small UNet takes the first 40% of the steps, the large one the rest: "
        "nearly the large model's images at a lower cost." + DEMO_NOTE,
        [
            demo_loader(1, "shapes_unet_small", "Small model"),
            demo_loader(2, "shapes_unet_large", "Large model"),
            N(3, "TL_TStitchModel", {"small_fraction": 0.4}, {"small_model": (1, 0), "large_model": (2, 0)}),
            demo_text(4, "small blue square right", "Positive prompt"),
            demo_text(5, "", "Negative prompt (empty: unconditional)"),
            demo_latent(6),
            ksampler(7, (3, 0), (4, 0), (5, 0), (6, 0), steps=20, cfg=3.0),
            *decode_and_save(8, (7, 0), (2, 1), "demo_tstitch"),
        ],
        demo=True,
        baseline={3: {"small_fraction": 0.0}},
    )
    fkc = Workflow(
        "fkc_demo",
        "**Feynman-Kac Correctors, demo UNet.** Four particles per image follow the CFG target's SDE and are "
        "resampled when their effective sample size drops below half; the sampler node plots ESS per step "
        "after the run (red: steps that resampled)." + DEMO_NOTE,
        [
            demo_loader(1, "shapes_unet_large"),
            demo_text(2, "large yellow triangle center", "Positive prompt"),
            demo_text(3, "", "Negative prompt (empty: unconditional)"),
            N(4, "TL_FKCGuider", {"cfg": 3.0}, {"model": (1, 0), "positive": (2, 0), "negative": (3, 0)}),
            N(5, "TL_FKCSampler", {"particles": 4, "resample": "ess", "ess_threshold": 0.5}),
            N(6, "RandomNoise", {"noise_seed": 1, "control_after_generate": "fixed"}),
            N(7, "BasicScheduler", {"scheduler": "normal", "steps": 20, "denoise": 1.0}, {"model": (1, 0)}),
            demo_latent(8, batch=2),
            custom_sampling(9, noise=6, guider=4, sampler=5, sigmas=7, latent=8),
            *decode_and_save(10, (9, 0), (1, 1), "demo_fkc"),
        ],
        demo=True,
        baseline={5: {"particles": 1}},
    )
    flowturbo = Workflow(
        "flowturbo_demo",
        "**FlowTurbo, demo DiT (rectified flow).** One Heun step, then pseudo-corrector steps that reuse the "
        "cached velocity: 6 steps for 7 model calls." + DEMO_NOTE,
        [
            demo_loader(1, "shapes_dit_flow"),
            demo_text(2, "large green square left", "Positive prompt"),
            demo_text(3, "", "Negative prompt (empty: unconditional)"),
            N(4, "CFGGuider", {"cfg": 3.0}, {"model": (1, 0), "positive": (2, 0), "negative": (3, 0)}),
            N(5, "TL_FlowTurboSampler", {"heun_steps": 1, "refine_steps": 0}),
            N(6, "RandomNoise", {"noise_seed": 2, "control_after_generate": "fixed"}),
            N(7, "BasicScheduler", {"scheduler": "simple", "steps": 6, "denoise": 1.0}, {"model": (1, 0)}),
            demo_latent(8),
            custom_sampling(9, noise=6, guider=4, sampler=5, sigmas=7, latent=8),
            *decode_and_save(10, (9, 0), (1, 1), "demo_flowturbo"),
        ],
        demo=True,
    )
    cvsg = Workflow(
        "cvsg_demo",
        "**c-VSG, demo Fashion-MNIST DiT.** The guider pushes each new batch away from the garments already in "
        "the memory bank (features from the demo classifier). Queue it several times: the Vendi score stays high; "
        "the button on the guider shows and clears the bank." + DEMO_NOTE,
        [
            demo_loader(1, "fashion_dit_flow"),
            demo_text(2, "dress", "Positive prompt"),
            demo_text(3, "", "Negative prompt (empty: unconditional)"),
            N(4, "TL_DemoFeatures", {"features_name": "fashion_classes"}),
            N(
                5,
                "TL_VendiGuider",
                {"cfg": 3.0, "scale": 0.1, "every_n_steps": 2, "memory_bank": "demo_fashion"},
                {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "vae": (1, 1), "features": (4, 0)},
            ),
            N(6, "KSamplerSelect", {"sampler_name": "euler"}),
            N(7, "BasicScheduler", {"scheduler": "simple", "steps": 20, "denoise": 1.0}, {"model": (1, 0)}),
            N(8, "RandomNoise", {"noise_seed": 4, "control_after_generate": "increment"}),
            demo_latent(9),
            custom_sampling(10, noise=8, guider=5, sampler=6, sigmas=7, latent=9),
            *decode_and_save(11, (10, 0), (1, 1), "demo_cvsg"),
            N(13, "TL_VendiScore", inputs={"images": (11, 0), "features": (4, 0)}),
            N(14, "PreviewAny", inputs={"source": (13, 0)}, title="Vendi score of the batch"),
        ],
        demo=True,
        baseline={5: {"scale": 0.0}},
    )
    diffusehigh = Workflow(
        "diffusehigh_demo",
        "**DiffuseHigh, demo UNet: 32x32 to 64x64.** The model was trained at 32x32 only; DiffuseHigh keeps the "
        "layout of the 32x32 image while adding detail at 64x64." + DEMO_NOTE,
        [
            demo_loader(1, "shapes_unet_large"),
            demo_text(2, "large blue circle center", "Positive prompt"),
            demo_text(3, "", "Negative prompt (empty: unconditional)"),
            demo_latent(4, batch=2),
            ksampler(5, (1, 0), (2, 0), (3, 0), (4, 0), steps=20, cfg=3.0),
            N(
                6,
                "TL_DiffuseHigh",
                {"scale_factor": 2.0, "denoise": 0.5, "dwt_steps": 5, **seed(0), "steps": 20, "cfg": 3.0},
                {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "vae": (1, 1), "latent": (5, 0)},
            ),
            *decode_and_save(7, (6, 0), (1, 1), "demo_diffusehigh"),
        ],
        demo=True,
    )
    video = Workflow(
        "multitext_video_demo",
        "**Multi-text video, demo Wan-style DiT (16x16, 4 frames per segment).** One segment per line; each "
        "later segment continues from the previous last frame." + DEMO_NOTE,
        [
            demo_loader(1, "shapes_video_wan"),
            N(2, "TL_DemoPromptSequence", {"text": "red circle moves right\nred circle moves down"}),
            demo_text(3, "", "Negative prompt (empty: unconditional)"),
            demo_latent(4, batch=1, size=16, frames=4),
            N(
                5,
                "TL_MultiTextVideo",
                {**seed(0), "steps": 20, "cfg": 5.0},
                {"model": (1, 0), "vae": (1, 1), "prompts": (2, 0), "negative": (3, 0), "latent": (4, 0)},
            ),
            N(6, "VAEDecode", inputs={"samples": (5, 0), "vae": (1, 1)}),
            N(
                7, "SaveAnimatedWEBP", {"filename_prefix": "trajectory_lab/demo_video", "fps": 4.0}, {"images": (6, 0)}
            ),  # fmt: skip
        ],
        demo=True,
    )
    return [pag, tstitch, fkc, flowturbo, cvsg, diffusehigh, video]


def workflows() -> list[Workflow]:
    result = _real_workflows() + _demo_workflows()
    for w in result:
        w.nodes.append(note(w.note))
    return result


BUILD_JS = """
async (spec) => {
  const LG = window.LiteGraph, app = window.app;
  await app.loadGraphData({ last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], version: 0.4 });
  const graph = app.graph, byId = {};
  for (const n of spec.nodes) {
    const node = LG.createNode(n.type);
    if (!node) throw new Error(`unknown node type ${n.type}`);
    node.id = n.id;
    graph.add(node);
    for (const [name, value] of Object.entries(n.widgets)) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) throw new Error(`${n.type} has no widget ${name}: ${node.widgets?.map((w) => w.name)}`);
      widget.value = value;
    }
    if (n.title) node.title = n.title;
    byId[n.id] = node;
  }
  for (const n of spec.nodes) {
    for (const [name, [source, slot]] of Object.entries(n.inputs)) {
      const target = byId[n.id], index = target.findInputSlot(name);
      if (index < 0) throw new Error(`${n.type} has no input ${name}`);
      if (!byId[source].connect(slot, target, index))
        throw new Error(`cannot link ${source}:${slot} -> ${n.id}.${name}`);
    }
  }
  // Layout: one column per depth in the graph, columns as wide as their widest node.
  const depth = {};
  const depthOf = (n) =>
    depth[n.id] ??= Math.max(-1, ...Object.values(n.inputs).map(([s]) => depthOf(spec.byId[s]))) + 1;
  spec.byId = Object.fromEntries(spec.nodes.map((n) => [n.id, n]));
  for (const n of spec.nodes) depthOf(n);
  const columns = [];
  for (const n of spec.nodes) (columns[n.type.endsWith("Note") ? 0 : depth[n.id] + 1] ??= []).push(byId[n.id]);
  let x = 40;
  for (const column of columns.filter(Boolean)) {
    let y = 40, width = 0;
    for (const node of column) {
      if (node.type.endsWith("Note")) node.size = [340, 260];
      node.pos = [x, y];
      y += node.size[1] + 70;
      width = Math.max(width, node.size[0]);
    }
    x += width + 60;
  }
  graph.setDirtyCanvas(true, true);
  const prompt = await app.graphToPrompt();
  // As the frontend writes a file: JSON.stringify drops undefined fields (playwright would turn them into null).
  return JSON.stringify({ ui: graph.serialize(), api: prompt.output });
}
"""

# Queue the graph on the page as the Run button does; wait for it; report the FKC events and the images.
QUEUE_JS = """
async ([timeoutMs]) => {
  const app = window.app, api = app.api;
  const done = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no execution_success in time")), timeoutMs);
    api.addEventListener("execution_success", (e) => { clearTimeout(timer); resolve(e.detail); }, { once: true });
    api.addEventListener("execution_error", (e) => {
      clearTimeout(timer);
      reject(new Error(`execution_error: ${e.detail.exception_message}`));
    }, { once: true });
  });
  const raw = [];
  const record = (e) => raw.push(e.detail);
  api.addEventListener("trajectory_lab.fkc_step", record);
  await app.queuePrompt(0, 1);
  if (app.lastNodeErrors && Object.keys(app.lastNodeErrors).length)
    throw new Error(`prompt rejected: ${JSON.stringify(app.lastNodeErrors).slice(0, 2000)}`);
  try { await done; } finally { api.removeEventListener("trajectory_lab.fkc_step", record); }
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const outputs = {};
  for (const node of app.graph.nodes) {
    const images = app.nodeOutputs?.[String(node.id)]?.images;
    if (images) outputs[node.id] = images;
  }
  return { raw, outputs };
}
"""

# Zoom the canvas onto the given node ids (default: all nodes); return the screen rectangle they fill.
FIT_VIEW_JS = """
async (ids) => {
  const app = window.app, nodes = app.graph.nodes.filter((n) => !ids?.length || ids.includes(n.id));
  const x0 = Math.min(...nodes.map((n) => n.pos[0])) - 40, y0 = Math.min(...nodes.map((n) => n.pos[1])) - 60;
  const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 40;
  const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 40;
  const canvas = app.canvas, rect = canvas.canvas.getBoundingClientRect();
  const scale = Math.min(rect.width / (x1 - x0), rect.height / (y1 - y0), ids?.length ? 3 : 1.2);
  canvas.ds.scale = scale;
  canvas.ds.offset = [-x0 + (rect.width / scale - (x1 - x0)) / 2, -y0 + (rect.height / scale - (y1 - y0)) / 2];
  canvas.setDirty(true, true);
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const [left, top] = canvas.ds.convertOffsetToCanvas([x0, y0]);
  const [right, bottom] = canvas.ds.convertOffsetToCanvas([x1, y1]);
  const x = Math.max(left, 0), y = Math.max(top, 0);
  const width = Math.min(right, rect.width) - x, height = Math.min(bottom, rect.height) - y;
  return { x: rect.left + x, y: rect.top + y, width, height };
}
"""


def spec_json(w: Workflow) -> dict:
    return {
        "nodes": [
            {"id": n.id, "type": n.type, "widgets": n.widgets, "inputs": n.inputs, "title": n.title} for n in w.nodes
        ]
    }


def dumps(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def jpeg(image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=88)
    return out.getvalue()


def graph_thumbnail(page) -> bytes:
    """The laid-out graph, as the page draws it."""
    from PIL import Image

    clip = page.evaluate(FIT_VIEW_JS, [])
    shot = Image.open(io.BytesIO(page.screenshot(clip=clip)))
    shot.thumbnail(THUMBNAIL_SIZE)
    return jpeg(shot)


def fetch_frames(server_url: str, outputs: dict) -> list:
    """A run's saved images (every frame of an animation), in order."""
    import urllib.parse
    import urllib.request

    from PIL import Image, ImageSequence

    frames = []
    for image in [image for images in outputs.values() for image in images]:
        with urllib.request.urlopen(f"{server_url}/api/view?{urllib.parse.urlencode(image)}", timeout=30) as r:
            frames += [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(io.BytesIO(r.read())))]
    return frames


def result_thumbnail(rows: list[list]) -> bytes:
    """Rows of images (or a video's frames) side by side, enlarged without smoothing."""
    from PIL import Image

    if len(rows) == 1:  # one batch or one video: wrap it into a square-ish grid, read row by row
        columns = math.ceil(math.sqrt(len(rows[0])))
        rows = [rows[0][i : i + columns] for i in range(0, len(rows[0]), columns)]
    width, height = rows[0][0].size
    sheet = Image.new("RGB", (max(map(len, rows)) * (width + 2) - 2, len(rows) * (height + 2) - 2), (24, 24, 24))
    for r, row in enumerate(rows):
        for i, frame in enumerate(row):
            sheet.paste(frame, (i * (width + 2), r * (height + 2)))
    scale = max(1, min(THUMBNAIL_SIZE[0] // sheet.width, THUMBNAIL_SIZE[1] // sheet.height))
    return jpeg(sheet.resize((sheet.width * scale, sheet.height * scale), Image.Resampling.NEAREST))


SET_WIDGETS_JS = """
([overrides]) => {
  const previous = {};
  for (const [id, values] of Object.entries(overrides)) {
    const node = window.app.graph.getNodeById(Number(id));
    previous[id] = {};
    for (const [name, value] of Object.entries(values)) {
      const widget = node.widgets.find((w) => w.name === name);
      previous[id][name] = widget.value;
      widget.value = value;
    }
  }
  return previous;
}
"""


def demo_thumbnail(page, server_url: str, w: Workflow) -> bytes:
    """What a demo workflow makes; with a baseline, a second row made with the technique switched off."""
    rows = [fetch_frames(server_url, page.evaluate(QUEUE_JS, [300_000])["outputs"])]
    if w.baseline:
        previous = page.evaluate(SET_WIDGETS_JS, [w.baseline])
        rows.append(fetch_frames(server_url, page.evaluate(QUEUE_JS, [300_000])["outputs"]))
        page.evaluate(SET_WIDGETS_JS, [previous])
    return result_thumbnail(rows)


def build(selected: list[str], graphs_only: bool = False) -> None:
    from browser import launch, open_comfyui
    from comfy_host import PACK_ROOT, ServerHost
    from playwright.sync_api import sync_playwright

    chosen = [w for w in workflows() if not selected or w.name in selected]
    with ServerHost({PACK_FOLDER: PACK_ROOT}) as server, sync_playwright() as p:
        context = launch(p)
        page, _ = open_comfyui(context, server.url)
        for w in chosen:
            result = json.loads(page.evaluate(BUILD_JS, spec_json(w)))
            result["ui"]["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"trajectory-lab/{w.name}"))  # stable rebuilds
            picture = None
            if w.demo and not graphs_only:  # a demo workflow's thumbnail is what it makes (the README shows it)
                picture = demo_thumbnail(page, server.url, w)
            elif not w.demo:
                picture = graph_thumbnail(page)
            write_atomically(EXAMPLES_DIR / f"{w.name}.json", dumps(result["ui"]))
            write_atomically(API_DIR / f"{w.name}.json", dumps(result["api"]))
            if picture:
                write_atomically(EXAMPLES_DIR / f"{w.name}.jpg", picture)
            print(f"wrote {w.name}: {len(result['ui']['nodes'])} nodes")
        context.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    args = sys.argv[1:]
    # --graphs-only: rewrite the JSON files; keep the demo thumbnails (no demo run)
    build([a for a in args if not a.startswith("--")], graphs_only="--graphs-only" in args)
