"""The real ComfyUI host: the pack loaded by ComfyUI's own loader, prompts in-process and over HTTP."""

import math
import sys
from urllib.parse import quote

import numpy as np
import pytest
import tiny_models
import torch
from harness import PACK_FOLDER, pack
from PIL import Image
from workflows import TINY_ARCHS, every_model_prompt, gmm_nodes


def _saved_images(base_dir, ui_entry):
    return [base_dir / "output" / img["subfolder"] / img["filename"] for img in ui_entry["images"]]


def test_pack_is_loaded_by_comfyui_and_tests_share_its_modules(host):
    name = host.module_name(PACK_FOLDER)
    assert sys.modules[name] is pack()
    assert (
        name in {host.module_name(k) for k in host.nodes.LOADED_MODULE_DIRS}
        or PACK_FOLDER in host.nodes.LOADED_MODULE_DIRS
    )
    assert pack("samplers.basic") is sys.modules[f"{name}.samplers.basic"]
    nodes_module = pack("nodes")
    for node_cls in nodes_module.NODES:  # the classes ComfyUI registered are the very objects tests import
        assert host.nodes.NODE_CLASS_MAPPINGS[node_cls.GET_SCHEMA().node_id] is node_cls
    assert PACK_FOLDER in host.nodes.EXTENSION_WEB_DIRS  # WEB_DIRECTORY served


def test_every_tiny_model_class_runs_in_process(host):
    results = host.run(every_model_prompt(filename_prefix="in_process"))
    for arch in TINY_ARCHS:
        samples = results[f"{arch}_sample"][0]["samples"]
        assert tuple(samples.shape) == tiny_models.latent_shape(arch), arch
        assert torch.isfinite(samples).all(), arch
    for flavour in ("eps", "flow"):
        assert tuple(results[f"gmm_{flavour}_sample"][0]["samples"].shape) == (16, 2, 1, 1)
    (image_path,) = _saved_images(host.base_dir, host.last_ui["img_save"])
    assert Image.open(image_path).size == (64, 64)


def test_a_different_seed_changes_the_result(host):
    # The sampler really ran the model on seeded noise: different seeds, different latents; same seed, same.
    base = every_model_prompt()
    outs = []
    for seed in (0, 0, 1):
        prompt = {k: v for k, v in base.items() if k.startswith("sd15_")}
        prompt["sd15_sample"]["inputs"]["seed"] = seed
        outs.append(host.run(prompt)["sd15_sample"][0]["samples"])
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


@pytest.mark.parametrize("flavour", ["eps", "flow"])
@pytest.mark.parametrize("weights", ["0,0,0,0", "0.7,0,0.3,0"])
def test_gmm_sampled_by_comfyui_ksampler_matches_the_exact_mixture(host, flavour, weights):
    """Mode weights of 4000 samples (euler, 100 steps) within 4 binomial standard errors + 0.01.

    "0,0,0,0" is the zeroed (unconditional) conditioning: the mixture's own weights 0.1/0.2/0.3/0.4.
    """
    n = 4000
    results = host.run(gmm_nodes(flavour, weights, n, "g_", steps=100))
    x = results["g_sample"][0]["samples"].reshape(n, 2)
    gmm = tiny_models.gmm_preset("four_modes")
    target = np.array([float(w) for w in weights.split(",")])
    target = gmm.weights.numpy() if target.sum() == 0 else target / target.sum()
    counts = np.bincount(gmm.nearest_mode(x).numpy(), minlength=4) / n
    for k in range(4):
        tolerance = 4 * math.sqrt(max(target[k] * (1 - target[k]), 1e-4) / n) + 0.01
        assert abs(counts[k] - target[k]) < tolerance, (k, counts, target)
    # Within a mode the spread matches the component's std (0.25) too.
    mode3 = x[gmm.nearest_mode(x) == int(np.argmax(target))]
    assert abs(mode3.std(0).mean().item() - 0.25) < 0.03


@pytest.mark.server
def test_every_tiny_model_class_runs_through_the_http_server(server):
    from conftest import ODD_PACK_FOLDER

    entry = server.run(every_model_prompt(filename_prefix="server"))
    assert entry["status"]["status_str"] == "success"
    (image_path,) = _saved_images(server.base_dir, entry["outputs"]["img_save"])
    assert Image.open(image_path).size == (64, 64)
    # The pack loaded from an odd folder name: its web extension is served under that name.
    extensions = server.get_json("/extensions")
    assert f"/extensions/{quote(ODD_PACK_FOLDER)}/trajectory_lab.js" in extensions
    log = server.log_tail(1 << 20)
    assert not any("Cannot import" in line and ODD_PACK_FOLDER in line for line in log.splitlines()), log
