"""c-VSG memory banks on disk (ComfyUI user directory, atomic writes), their web routes and TL_VendiClearBank."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from pathlib import Path

import folder_paths
import safetensors.torch
import torch
from comfy_api.latest import io

from ..atomic_files import write_atomically

# ---------------------------------------------------------------------------------------------------------
# Memory banks on disk
# ---------------------------------------------------------------------------------------------------------

_BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_BANK_LOCK = threading.Lock()  # prompts run on the worker thread, the web routes on the event loop thread
BANK_FORMAT = "trajectory_lab.vendi_bank/1"


def check_bank_name(name) -> str:
    """The bank name if it is safe as a file name on every OS; else a ValueError saying what is allowed."""
    ok = (
        isinstance(name, str)
        and _BANK_NAME.match(name) is not None
        and not name.endswith((".", " "))
        and name.split(".")[0].strip().lower() not in _RESERVED
    )
    if not ok:
        raise ValueError(
            f"memory_bank: {name!r} is not a valid bank name: use 1 to 64 letters, digits, spaces, '_', '-' or '.', "
            "starting with a letter or digit and not ending with '.' or a space"
        )
    return name


def bank_directory() -> Path:
    return Path(folder_paths.get_user_directory()) / "trajectory_lab" / "vendi_banks"


class MemoryBank:
    """Features of earlier generations under one name: {feature space key: [N, D] float32} in a safetensors
    file. Every operation re-reads the file under a lock, so a clear or another prompt in between is seen."""

    def __init__(self, name: str, directory: Path | None = None) -> None:
        self.name = check_bank_name(name)
        self.path = (directory or bank_directory()) / f"{self.name}.safetensors"

    def _read(self) -> dict[str, torch.Tensor]:
        if not self.path.exists():
            return {}
        try:
            return safetensors.torch.load(self.path.read_bytes())
        except Exception as e:
            raise RuntimeError(
                f"memory_bank {self.name!r}: {self.path} is unreadable ({e}); clear the bank to start it afresh"
            ) from e

    def read(self, key: str) -> torch.Tensor | None:
        with _BANK_LOCK:
            return self._read().get(key)

    def append(self, key: str, features: torch.Tensor) -> int:
        """Add rows under `key`; returns that feature space's new row count."""
        features = features.detach().to("cpu", torch.float32).contiguous()
        with _BANK_LOCK:
            tensors = self._read()
            old = tensors.get(key)
            if old is not None and old.shape[1] != features.shape[1]:
                raise ValueError(
                    f"memory_bank {self.name!r}: holds {old.shape[1]}-dim features for {key}, got {features.shape[1]}"
                )
            tensors[key] = features if old is None else torch.cat([old, features])
            write_atomically(self.path, safetensors.torch.save(tensors, metadata={"format": BANK_FORMAT}))
            return tensors[key].shape[0]

    def clear(self) -> int:
        """Remove the bank; returns the rows it held."""
        with _BANK_LOCK:
            rows = sum(t.shape[0] for t in self._read().values()) if self.path.exists() else 0
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return rows

    def sizes(self) -> dict[str, int]:
        with _BANK_LOCK:
            return {key: t.shape[0] for key, t in self._read().items()}

    def fingerprint(self) -> str:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return f"{self.name}:empty"
        return f"{self.name}:{stat.st_mtime_ns}:{stat.st_size}"


def list_banks(directory: Path | None = None) -> dict[str, dict[str, int]]:
    directory = directory or bank_directory()
    banks = {}
    for path in sorted(directory.glob("*.safetensors")) if directory.exists() else []:
        with contextlib.suppress(ValueError, RuntimeError):
            banks[path.stem] = MemoryBank(path.stem, directory).sizes()
    return banks


# ---------------------------------------------------------------------------------------------------------
# Web routes (only inside ComfyUI's server)
# ---------------------------------------------------------------------------------------------------------

ROUTE_PREFIX = "/trajectory_lab/vendi"


def register_routes() -> bool:
    """Add the bank routes to ComfyUI's PromptServer if one runs in this process (custom nodes load before the
    server adds its routes, so these get the /api mirror too). Idempotent."""
    server = sys.modules.get("server")
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None or getattr(prompt_server, "trajectory_lab_vendi_routes", False):
        return False
    from aiohttp import web

    routes = prompt_server.routes

    def error(message: str, status: int = 400):
        return web.json_response({"error": message}, status=status)

    @routes.get(ROUTE_PREFIX + "/banks")
    async def banks(request):
        return web.json_response({"banks": list_banks()})

    @routes.get(ROUTE_PREFIX + "/banks/{name}")
    async def bank_size(request):
        try:
            sizes = MemoryBank(request.match_info["name"]).sizes()
        except (ValueError, RuntimeError) as e:
            return error(str(e))
        return web.json_response({"name": request.match_info["name"], "sizes": sizes, "total": sum(sizes.values())})

    @routes.post(ROUTE_PREFIX + "/clear")
    async def clear(request):
        try:
            body = await request.json()
        except ValueError:
            return error('expected a JSON body {"name": "<bank name>"}')
        name = body.get("name") if isinstance(body, dict) else None
        try:
            bank = MemoryBank(check_bank_name(name))
        except ValueError as e:
            return error(str(e))
        return web.json_response({"name": name, "cleared": bank.clear()})

    prompt_server.trajectory_lab_vendi_routes = True
    logging.info("Trajectory Lab: Vendi memory bank routes under %s", ROUTE_PREFIX)
    return True


register_routes()


def bank_name_error(memory_bank) -> bool | str:
    if memory_bank is None:  # linked from another node: checked when it runs
        return True
    try:
        check_bank_name(memory_bank)
    except ValueError as e:
        return str(e)
    return True


BANK_TIP = (
    "Name of the memory bank: the features of every finished generation are appended to it (kept in ComfyUI's "
    "user directory, across restarts). Use one bank per prompt / object. Letters, digits, spaces, '_', '-', '.'."
)


class VendiClearBank(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_VendiClearBank",
            display_name="Clear Vendi Memory Bank (Trajectory Lab)",
            category="trajectory_lab/guidance",
            description="Empties a TL_VendiGuider memory bank each time the prompt runs. Link its output into the "
            "guider's memory_bank to clear before sampling.",
            inputs=[io.String.Input("memory_bank", default="default", tooltip=BANK_TIP)],
            outputs=[io.String.Output(display_name="memory_bank")],
            is_output_node=True,
            not_idempotent=True,
        )

    @classmethod
    def validate_inputs(cls, memory_bank=None):
        return bank_name_error(memory_bank)

    @classmethod
    def fingerprint_inputs(cls, memory_bank=None):
        return float("nan")  # never cached: clearing is the point of running it

    @classmethod
    def execute(cls, memory_bank) -> io.NodeOutput:
        rows = MemoryBank(memory_bank).clear()
        logging.info("Trajectory Lab: cleared Vendi memory bank %r (%d rows)", memory_bank, rows)
        return io.NodeOutput(memory_bank)
