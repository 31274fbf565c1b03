"""The pack's atomic file writes (atomic_files.py) for scripts and benchmarks, which run outside the pack's package.

Loaded by path: putting the pack folder itself on sys.path would shadow ComfyUI's own `nodes` module.
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "trajectory_lab_atomic_files", Path(__file__).parents[1] / "atomic_files.py"
)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
atomic_destination = _module.atomic_destination
write_atomically = _module.write_atomically
