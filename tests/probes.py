"""Probes the tests attach to real ComfyUI models."""

from __future__ import annotations

import contextlib


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


@contextlib.contextmanager
def progress_reports(cancel_at: int | None = None):
    """Collect every ComfyUI progress report as (value, total) while inside; with cancel_at, press Cancel (ComfyUI's
    interrupt flag) when the bar reaches that value. The previous hook is restored and the flag cleared after."""
    import comfy.model_management
    import comfy.utils

    reports: list[tuple[int, int]] = []
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        reports.append((value, total))
        if value == cancel_at:
            comfy.model_management.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield reports
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
