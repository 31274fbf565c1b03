"""Test-only ComfyUI nodes: tiny real models, tiny VAEs and the exact GMM model as graph nodes.

Loaded by ComfyUI from custom_nodes (a symlink to this folder) in test hosts only; never shipped.
"""

import os
import sys

import torch

# tests/ is on sys.path in test processes; keep the import working when a host forgets it.
_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _TESTS_DIR not in sys.path:
    sys.path.append(_TESTS_DIR)

import tiny_models  # noqa: E402

CATEGORY = "TLTest"


class TLTest_TinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "arch": (list(tiny_models.ARCHS),),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, arch, seed):
        return (tiny_models.build_tiny_model(arch, seed),)


class TLTest_TinyConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "arch": (list(tiny_models.ARCHS),),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, arch, seed, batch):
        return (tiny_models.tiny_conditioning(arch, seed, batch),)


class TLTest_TinyVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent_channels": ([4, 16],),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            }
        }

    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, latent_channels, seed):
        return (tiny_models.build_tiny_vae(int(latent_channels), seed),)


class TLTest_TinyLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "arch": (list(tiny_models.ARCHS),),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, arch, batch):
        return ({"samples": torch.zeros(tiny_models.latent_shape(arch, batch))},)


class TLTest_GMMModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "flavour": (list(tiny_models.GMM_FLAVOURS),),
                "preset": (list(tiny_models.GMM_PRESETS),),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, flavour, preset):
        return (tiny_models.build_gmm_model(flavour, preset),)


class TLTest_GMMLatent:
    """[batch, d, 1, 1] zeros: one mixture sample per row (EmptyLatentImage's 16x16 minimum gives 4 per row)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "preset": (list(tiny_models.GMM_PRESETS),),
                "batch": ("INT", {"default": 1, "min": 1, "max": 100000}),
            }
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, preset, batch):
        return ({"samples": torch.zeros(tiny_models.gmm_latent_shape(preset, batch))},)


class TLTest_GMMConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"weights": ("STRING", {"default": "0,0,0,1"})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, weights):
        try:
            _parse_weights(weights)
        except ValueError as e:
            return str(e)
        return True

    def build(self, weights):
        return (tiny_models.gmm_conditioning(_parse_weights(weights)),)


class TLTest_TinyControlNet:
    """A real SD1.5-style ControlNet matching TLTest_TinyModel("sd15"); hint: a 64x64 IMAGE (8x8 latent)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, seed):
        return (tiny_models.build_tiny_controlnet(seed),)


class TLTest_HintImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, seed):
        return (tiny_models.tiny_hint_image(seed),)


class TLTest_TinyLoRA:
    """Clone of `model` with a seeded tiny LoRA added through ComfyUI's own patching (add_patches)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, strength, seed):
        patches = tiny_models.tiny_lora_patches(tiny_models.tiny_arch_of(model), seed)
        patched = model.clone()
        # Patched even at strength 0 (LoraLoader skips it) so the patch path itself is exercised.
        applied = patched.add_patches(patches, strength)
        if len(applied) != len(patches):
            raise ValueError("TLTest_TinyLoRA: the MODEL lacks some tiny LoRA layers")
        return (patched,)


def _parse_weights(text: str) -> list:
    values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    if not values or any(v < 0 for v in values):
        raise ValueError(f"GMM weights must be non-negative numbers separated by commas, got {text!r}")
    return values


NODE_CLASS_MAPPINGS = {
    cls.__name__: cls
    for cls in (
        TLTest_TinyModel,
        TLTest_TinyConditioning,
        TLTest_TinyVAE,
        TLTest_TinyLatent,
        TLTest_GMMModel,
        TLTest_GMMConditioning,
        TLTest_GMMLatent,
        TLTest_TinyControlNet,
        TLTest_HintImage,
        TLTest_TinyLoRA,
    )
}
NODE_DISPLAY_NAME_MAPPINGS = {name: name.replace("TLTest_", "TLTest ") for name in NODE_CLASS_MAPPINGS}
