"""Test-environment shim: lets PyPI's torchvision import beside the CPU build of torch.

PyPI's torchvision 0.28.0 links CUDA libraries, so its C extension does not load next to CPU torch
and its import fails with "operator torchvision::nms does not exist". Defining the two operator
schemas first lets it import (ComfyUI imports torchvision but never calls nms). The Makefile installs
this module into the test venv with a .pth hook; it runs lazily, the first time torchvision is
imported, and is never part of the pack.
"""

import importlib.abc
import sys

_libraries = []  # keep the Library objects alive: their definitions vanish when collected


def _define_missing_ops() -> None:
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _libraries.append(lib)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_missing_ops()
        return None  # the normal finders import it


def install() -> None:
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
