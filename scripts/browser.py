"""Headless Chromium (Debian's package) on the real ComfyUI frontend, through Python playwright.

Playwright never downloads a browser here: it drives the system chromium by path. `scripts/browser_setup.sh`
installs it on a fresh machine (`.ci/run` calls it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Without the background-networking flags Chromium floods a closed network with refused connections.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}
# A first visit opens the template browser over the canvas, and the minimap covers a corner of it.
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def chromium_path() -> str:
    """The system Chromium, or an error that says how to install it."""
    for name in (os.environ.get("TL_CHROMIUM", ""), "chromium", "chromium-browser"):
        path = shutil.which(name) if name else None
        if path:
            return path
    raise RuntimeError(
        "Chromium is not installed: the browser tests drive Debian's `chromium` package. "
        "Run `bash scripts/browser_setup.sh` (apt-get install -y chromium), or set TL_CHROMIUM to a Chromium binary."
    )


def launch(playwright):
    """A headless Chromium with a fresh profile (removed when the browser closes its temporary dir)."""
    profile = Path(tempfile.mkdtemp(prefix="tl-chromium-"))
    context = playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=chromium_path(),
        headless=True,
        args=CHROMIUM_FLAGS,
        viewport=VIEWPORT,
    )
    context.on("close", lambda _: shutil.rmtree(profile, ignore_errors=True))
    return context


def open_comfyui(context, url: str, timeout_ms: int = 60_000):
    """Open the ComfyUI page; return it with a list collecting console errors and page errors."""
    page = context.pages[0] if context.pages else context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    response = context.request.post(f"{url}/api/settings", data=QUIET_SETTINGS)
    assert response.ok, f"POST /api/settings -> {response.status}"
    page.goto(url)
    page.wait_for_function(
        "() => window.app?.graph && window.app.extensionManager && window.LiteGraph?.registered_node_types?.KSampler",
        timeout=timeout_ms,
    )
    return page, errors
