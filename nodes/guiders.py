"""What kind of guider a sampler runs under: the one question several nodes ask of ComfyUI's guider objects."""

from __future__ import annotations

import comfy.samplers


def is_plain_cfg_guider(guider) -> bool:
    """A CFGGuider (KSampler, SamplerCustom, CFGGuider, BasicGuider) that combines cond and uncond by ComfyUI's own
    sampling_function; False for guiders with their own predict_noise (DualCFG, PerpNeg, TL_FKCGuider, ...)."""
    return (
        isinstance(guider, comfy.samplers.CFGGuider)
        and type(guider).predict_noise is comfy.samplers.CFGGuider.predict_noise
    )
