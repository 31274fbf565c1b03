"""Probes the tests attach to real ComfyUI models."""

from __future__ import annotations


def count_calls(model, record: str = "batch"):
    """A clone of `model` that logs every diffusion-model call (an APPLY_MODEL wrapper, keyed, so other wrappers
    stay): the batch size of each call, or its sigma with record="sigma". Returns (clone, log)."""
    import comfy.patcher_extension

    log: list = []
    m = model.clone()

    def wrapper(executor, x, t, *args, **kwargs):
        log.append(x.shape[0] if record == "batch" else float(t.flatten()[0]))
        return executor(x, t, *args, **kwargs)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "tests.count_calls", wrapper)
    return m, log
