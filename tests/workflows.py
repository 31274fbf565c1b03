"""API-format prompts (what an exported workflow JSON holds) over the test-only tiny models.

Shared by the host tests and the demo script. Node ids are strings, links are [node_id, output_index].
"""

from __future__ import annotations

TINY_ARCHS = ("sd15", "sdxl", "sd3", "flux", "wan21")


def ksampler(model, positive, negative, latent, seed=0, steps=3, cfg=2.0, sampler="euler", scheduler="normal"):
    return {
        "class_type": "KSampler",
        "inputs": {
            "model": model, "positive": positive, "negative": negative, "latent_image": latent, "seed": seed,
            "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0,
        },
    }  # fmt: skip


def tiny_arch_nodes(arch: str, prefix: str, seed: int = 0, steps: int = 3) -> dict:
    """Model, conditioning, zeroed negative, latent and a KSampler for one tiny architecture."""
    return {
        f"{prefix}model": {"class_type": "TLTest_TinyModel", "inputs": {"arch": arch, "seed": 0}},
        f"{prefix}pos": {"class_type": "TLTest_TinyConditioning", "inputs": {"arch": arch, "seed": 1, "batch": 1}},
        f"{prefix}neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [f"{prefix}pos", 0]}},
        f"{prefix}latent": {"class_type": "TLTest_TinyLatent", "inputs": {"arch": arch, "batch": 1}},
        f"{prefix}sample": ksampler(
            [f"{prefix}model", 0], [f"{prefix}pos", 0], [f"{prefix}neg", 0], [f"{prefix}latent", 0], seed, steps
        ),
    }


def sd15_image_nodes(prefix: str = "img_", filename_prefix: str = "trajectory_lab_demo", seed: int = 0) -> dict:
    """Tiny SD1.5-style UNet at 64x64 through a tiny real VAE into SaveImage."""
    return {
        f"{prefix}model": {"class_type": "TLTest_TinyModel", "inputs": {"arch": "sd15", "seed": 0}},
        f"{prefix}pos": {"class_type": "TLTest_TinyConditioning", "inputs": {"arch": "sd15", "seed": 1, "batch": 1}},
        f"{prefix}neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [f"{prefix}pos", 0]}},
        f"{prefix}latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{prefix}sample": ksampler(
            [f"{prefix}model", 0], [f"{prefix}pos", 0], [f"{prefix}neg", 0], [f"{prefix}latent", 0], seed, 4
        ),
        f"{prefix}vae": {"class_type": "TLTest_TinyVAE", "inputs": {"latent_channels": 4, "seed": 0}},
        f"{prefix}decode": {
            "class_type": "VAEDecode",
            "inputs": {"samples": [f"{prefix}sample", 0], "vae": [f"{prefix}vae", 0]},
        },
        f"{prefix}save": {
            "class_type": "SaveImage",
            "inputs": {"images": [f"{prefix}decode", 0], "filename_prefix": filename_prefix},
        },
    }


def gmm_nodes(flavour: str, weights: str, batch: int, prefix: str, steps: int = 50, sampler: str = "euler") -> dict:
    """The exact GMM model sampled by ComfyUI's own KSampler (cfg 1: the conditional mixture itself)."""
    return {
        f"{prefix}model": {"class_type": "TLTest_GMMModel", "inputs": {"flavour": flavour, "preset": "four_modes"}},
        f"{prefix}pos": {"class_type": "TLTest_GMMConditioning", "inputs": {"weights": weights}},
        f"{prefix}neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": [f"{prefix}pos", 0]}},
        f"{prefix}latent": {"class_type": "TLTest_GMMLatent", "inputs": {"preset": "four_modes", "batch": batch}},
        f"{prefix}sample": ksampler(
            [f"{prefix}model", 0], [f"{prefix}pos", 0], [f"{prefix}neg", 0], [f"{prefix}latent", 0], 0, steps, 1.0,
            sampler,
        ),
    }  # fmt: skip


def every_model_prompt(filename_prefix: str = "every_model") -> dict:
    """One prompt touching every tiny model class, the GMM in both flavours and an image output."""
    prompt: dict = {}
    for arch in TINY_ARCHS:
        prompt.update(tiny_arch_nodes(arch, f"{arch}_"))
    for flavour in ("eps", "flow"):
        prompt.update(gmm_nodes(flavour, "0,0,0,1", 16, f"gmm_{flavour}_", steps=10))
    prompt.update(sd15_image_nodes(filename_prefix=filename_prefix))
    return prompt
