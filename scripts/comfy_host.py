"""Run a real ComfyUI with this pack loaded: in-process (PromptExecutor) or as its HTTP server.

Shared by the test fixtures and the demo script. Both hosts build a throw-away base directory whose
custom_nodes/ holds symlinks to the pack (and to any extra node folders, e.g. the test-only nodes),
so ComfyUI's own custom-node loader imports the pack exactly as it would for a user.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from comfyui_tree import REPO_ROOT, comfyui_tree

PACK_ROOT = REPO_ROOT


def make_base_dir(custom_nodes: dict[str, Path], base: Path | None = None) -> Path:
    """A ComfyUI base directory with `custom_nodes/<name>` symlinked to each given folder."""
    if base is None:
        base = Path(tempfile.mkdtemp(prefix="tl-comfy-"))
        atexit.register(shutil.rmtree, base, ignore_errors=True)  # throw-away: gone when the process ends
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    for name, target in custom_nodes.items():
        link = base / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(Path(target).resolve(), target_is_directory=True)
    return base


class InProcessHost:
    """ComfyUI imported into this interpreter; prompts run through execution.PromptExecutor."""

    def __init__(self, custom_nodes: dict[str, Path], base: Path | None = None) -> None:
        self.comfy_dir = comfyui_tree()
        self.base_dir = make_base_dir(custom_nodes, base)
        self.custom_node_names = list(custom_nodes)
        if str(self.comfy_dir) not in sys.path:
            sys.path.insert(0, str(self.comfy_dir))
        from comfy.cli_args import args

        args.cpu = True
        args.base_directory = str(self.base_dir)
        args.disable_api_nodes = True
        # Order matters, so no import statements a formatter could sort: model_management reads args on
        # import, and utils.extra_config must precede `nodes` (else `utils` resolves to comfy/utils.py).
        for name in ("comfy.model_management", "folder_paths", "utils.extra_config"):
            importlib.import_module(name)
        nodes = importlib.import_module("nodes")
        execution = importlib.import_module("execution")

        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.builtin_import_failures = failed
        self.nodes = nodes
        self.execution = execution
        self.executor = execution.PromptExecutor(_ServerStub(), cache_type=False, cache_args={"lru": 0, "ram": 0})

    def module_name(self, folder_name: str) -> str:
        """The sys.modules name ComfyUI's loader gave a custom-node folder."""
        return str(self.base_dir / "custom_nodes" / folder_name).replace(".", "_x_")

    def import_from(self, folder_name: str, submodule: str = ""):
        """A module of a loaded custom-node folder: the very object ComfyUI imported."""
        name = self.module_name(folder_name)
        if name not in sys.modules:
            raise RuntimeError(f"ComfyUI did not load custom node folder {folder_name!r}")
        return importlib.import_module(f"{name}.{submodule}" if submodule else name)

    def run(self, prompt: dict, outputs: list[str] | None = None) -> dict[str, list]:
        """Validate and execute an API-format prompt; return every node's output values.

        All nodes run (not only output nodes), so tests can read any node's result.

        Raises PromptError with ComfyUI's own validation or execution messages on failure.
        """
        prompt_id = str(uuid.uuid4())
        errors = asyncio.run(self._validate_every_node(prompt_id, prompt))
        if errors:
            raise PromptError(f"prompt invalid: {json.dumps(errors, default=str)[:4000]}")
        self.executor.reset()  # fresh caches: every run really executes
        self.executor.execute(prompt, prompt_id, {"client_id": "tests"}, outputs or list(prompt))
        if not self.executor.success:
            errors = [m for m in self.executor.status_messages if m[0] == "execution_error"]
            raise PromptError(f"prompt failed: {json.dumps(errors, default=str)[:4000]}")
        results = {}
        for node_id in prompt:
            entry = self.executor.caches.outputs.get(node_id)
            if entry is not None:  # one list per output slot (list-mode nodes give several items)
                results[node_id] = tuple(items[0] if len(items) == 1 else items for items in entry.outputs)
        self.last_ui = self.executor.history_result["outputs"]
        return results

    async def _validate_every_node(self, prompt_id: str, prompt: dict) -> dict:
        """ComfyUI's own input validation, applied to every node (the server's only reaches output nodes)."""
        validated: dict = {}
        errors = {}
        for node_id, node in prompt.items():
            if node.get("class_type") not in self.nodes.NODE_CLASS_MAPPINGS:
                errors[node_id] = f"unknown node type {node.get('class_type')!r}"
                continue
            ok, reasons, _ = await self.execution.validate_inputs(prompt_id, prompt, node_id, validated)
            if not ok:
                errors[node_id] = reasons
        return errors


class PromptError(RuntimeError):
    pass


class _ServerStub:
    """The part of PromptServer that PromptExecutor touches."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerHost:
    """ComfyUI's real HTTP server (main.py) in a subprocess on a free loopback port."""

    def __init__(self, custom_nodes: dict[str, Path], extra_pythonpath: list[Path] = (), base: Path | None = None):
        self.comfy_dir = comfyui_tree()
        self.base_dir = make_base_dir(custom_nodes, base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        paths = [str(p) for p in extra_pythonpath] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        cmd = [
            sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir), "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch",
        ]  # fmt: skip
        self.log_path = self.base_dir / "server.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, cwd=self.comfy_dir, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> ServerHost:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
        raise TimeoutError(f"ComfyUI server not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def post_json(self, path: str, payload: dict):
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise PromptError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')}") from None

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """POST an API-format prompt, poll /history until it finishes; return its history entry."""
        prompt_id = self.post_json("/prompt", {"prompt": prompt, "client_id": "tests"})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if (
                entry
                and entry.get("status", {}).get("completed") is not None
                and (entry["status"]["completed"] or entry["status"].get("status_str") == "error")
            ):
                if entry["status"].get("status_str") == "error":
                    raise PromptError(f"prompt failed: {json.dumps(entry['status'], default=str)[:4000]}")
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server died:\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout} s:\n{self.log_tail()}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def __enter__(self) -> ServerHost:
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.close()
