import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core machines: threads make small convs ~100x slower

import pytest
import torch

torch.set_num_threads(1)

from comfy_host import PACK_ROOT, ServerHost  # noqa: E402
from harness import TEST_NODES_FOLDER, TESTS_DIR, in_process_host  # noqa: E402

# ComfyUI is started (and made importable) before any test module is collected: tests import `comfy` directly.
in_process_host()

# The server loads the pack from a folder name with a dot and a dash: relative imports must hold. (Not a space:
# ComfyUI 0.3.75 lists web extensions under the URL-quoted name but serves them under the raw one, so a folder
# name with a space gets its JavaScript 404ed.)
ODD_PACK_FOLDER = "Trajectory-Lab.v0.dev"


@pytest.fixture(scope="session")
def host():
    return in_process_host()


@pytest.fixture(autouse=True)
def forget_dropped_clones():
    """After each test, drop ComfyUI's load records of patchers that are gone while their network lives on.

    tiny_models caches one base patcher per model, so a dropped clone (a graph's LoRA or PAG patcher) leaves a
    record whose network is still alive: ComfyUI calls that a potential leak and runs a full gc.collect on every
    later load (0.2 s each: sampling 10x slower for the rest of the session)."""
    yield
    import comfy.model_management as mm

    mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if not m.is_dead()]


@pytest.fixture(scope="session")
def server():
    custom_nodes = {ODD_PACK_FOLDER: PACK_ROOT, TEST_NODES_FOLDER: TESTS_DIR / TEST_NODES_FOLDER}
    srv = ServerHost(custom_nodes, extra_pythonpath=[TESTS_DIR])
    try:
        yield srv.wait_ready()
    finally:
        srv.close()


def pytest_sessionfinish(session, exitstatus):
    # Drop cached ModelPatchers while ComfyUI's modules still exist (their __del__ needs them at exit).
    import gc

    import tiny_models

    for cached in (
        tiny_models._base_patcher,
        tiny_models.build_tiny_vae,
        tiny_models.build_pixel_space_vae,
        tiny_models.build_tiny_controlnet,
    ):
        cached.cache_clear()
    gc.collect()
