"""One ComfyUI per test session: the pack and the test-only nodes loaded by ComfyUI's own loader.

Tests import pack modules through `pack(...)`, which returns the very module objects ComfyUI loaded
(ComfyUI names a custom-node package after its folder path), so there is never a second copy of a
class with a different identity.
"""

from __future__ import annotations

from pathlib import Path

from comfy_host import PACK_ROOT, InProcessHost

TESTS_DIR = Path(__file__).resolve().parent
PACK_FOLDER = "trajectory_lab"
TEST_NODES_FOLDER = "tl_test_nodes"
CUSTOM_NODES = {PACK_FOLDER: PACK_ROOT, TEST_NODES_FOLDER: TESTS_DIR / TEST_NODES_FOLDER}

_host: InProcessHost | None = None


def in_process_host() -> InProcessHost:
    global _host
    if _host is None:
        _host = InProcessHost(CUSTOM_NODES)
    return _host


def pack(submodule: str = ""):
    """A module of the pack as ComfyUI loaded it, e.g. pack("samplers.steppers")."""
    return in_process_host().import_from(PACK_FOLDER, submodule)
