"""The main job: start ComfyUI's real HTTP server headless with the pack loaded, queue a workflow, keep its image.

Until the pack's demo models exist, the workflow runs a tiny SD1.5-style UNet and VAE with seeded random
weights (the test-only nodes in tests/tl_test_nodes), so the picture is structured noise: what this shows
is the whole path, server -> custom nodes -> KSampler -> VAE decode -> SaveImage -> file.

Usage: python scripts/demo.py [--out out/]   (run by `make demo`, which sets everything up first)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from comfy_host import PACK_ROOT, ServerHost

TESTS_DIR = PACK_ROOT / "tests"
sys.path.insert(0, str(TESTS_DIR))
from workflows import sd15_image_nodes  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACK_ROOT / "out", help="folder for the result image")
    args = parser.parse_args()
    started = time.monotonic()
    custom_nodes = {"trajectory_lab": PACK_ROOT, "tl_test_nodes": TESTS_DIR / "tl_test_nodes"}
    with ServerHost(custom_nodes, extra_pythonpath=[TESTS_DIR]) as server:
        print(f"ComfyUI server ready at {server.url} (base directory {server.base_dir})")
        entry = server.run(sd15_image_nodes(filename_prefix="trajectory_lab_demo"))
        image = entry["outputs"]["img_save"]["images"][0]
        produced = server.base_dir / "output" / image["subfolder"] / image["filename"]
        args.out.mkdir(parents=True, exist_ok=True)
        target = args.out / "trajectory_lab_demo.png"
        # Copy beside the target, then rename: a reader never sees a half-written file.
        fd, tmp = tempfile.mkstemp(dir=args.out, suffix=".png.partial")
        os.close(fd)
        shutil.copyfile(produced, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, target)
    print(f"wrote {target} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
