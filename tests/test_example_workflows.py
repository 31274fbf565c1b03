"""example_workflows/: every saved workflow is complete, type-checks against the nodes ComfyUI really has, and
its API copy passes ComfyUI's own prompt validation once the model files it names exist."""

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from conftest import ODD_PACK_FOLDER
from example_workflow_builder import API_DIR, EXAMPLES_DIR, FRONTEND_ONLY_NODES, workflows
from PIL import Image

NAMES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.json"))
# Loader inputs that name a model file, and the models/ folder each lists (the files do not exist here).
MODEL_FILE_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("TL_LoadVelocityRefiner", "refiner_name"): "velocity_refiners",
}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def node_info(class_type: str) -> dict:
    """What /object_info says about a node (the server's own conversion for V1 and V3 nodes)."""
    from comfy_api.internal import _ComfyNodeInternal

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    return {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES)}


def accepts(input_type: str, link_type: str) -> bool:
    """ComfyUI's type rule for a link: equal, a wildcard, or one of a comma-separated list."""
    if "*" in (input_type, link_type):
        return True
    return bool(set(input_type.split(",")) & set(link_type.split(",")))


def validation_errors(host, prompt: dict) -> dict[str, list[dict]]:
    """ComfyUI's validate_inputs on every node (as the server does for the nodes an output needs)."""

    async def run():
        validated: dict = {}
        found = {}
        for node_id in prompt:
            ok, reasons, _ = await host.execution.validate_inputs(str(uuid.uuid4()), prompt, node_id, validated)
            if not ok:
                found[node_id] = reasons
        return found

    return asyncio.run(run())


def test_the_generator_and_the_folder_agree():
    assert NAMES == sorted(w.name for w in workflows())
    for name in NAMES:
        assert (API_DIR / f"{name}.json").is_file(), f"{name}: no API-format copy"
        with Image.open(EXAMPLES_DIR / f"{name}.jpg") as thumbnail:
            assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 100, name
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_nodes_exist_and_links_type_check(host, name):
    import nodes

    ui = load(EXAMPLES_DIR / f"{name}.json")
    by_id = {n["id"]: n for n in ui["nodes"]}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY_NODES:
            continue
        assert node["type"] in nodes.NODE_CLASS_MAPPINGS, f"{name}: unknown node {node['type']}"
        info = node_info(node["type"])
        assert [o["type"] for o in node.get("outputs", [])] == list(info["output"]), f"{name}: {node['type']}"
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for slot in node.get("inputs", []):
            assert slot["name"] in declared, f"{name}: {node['type']} has no input {slot['name']}"
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for input_name, spec in info["input"].get("required", {}).items():
            if not isinstance(spec[0], list) and spec[0] not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                assert input_name in linked, f"{name}: {node['type']}.{input_name} ({spec[0]}) is not connected"
    for link_id, source, source_slot, target, target_slot, link_type in ui["links"]:
        source_node, target_node = by_id[source], by_id[target]
        source_type = source_node["outputs"][source_slot]["type"]
        target_input = target_node["inputs"][target_slot]
        target_type = node_info(target_node["type"])["input"]
        target_type = {**target_type.get("required", {}), **target_type.get("optional", {})}[target_input["name"]][0]
        # The frontend saves a link into a wildcard input with the wildcard type.
        assert link_type in {source_type, target_type} and accepts(target_type, source_type), (
            f"{name}: link {link_id} {source_node['type']}:{source_type} -> "
            f"{target_node['type']}.{target_input['name']}:{target_type}"
        )
        assert target_input["link"] == link_id and link_id in source_node["outputs"][source_slot]["links"]


@pytest.fixture()
def placeholder_model_files(tmp_path):
    """Empty files under the names the workflows use, in a models folder ComfyUI lists (removed afterwards)."""
    import folder_paths

    added = []

    def place(prompt: dict) -> None:
        for node in prompt.values():
            for input_name, value in node["inputs"].items():
                folder = MODEL_FILE_INPUTS.get((node["class_type"], input_name))
                if folder:
                    (tmp_path / folder).mkdir(exist_ok=True)
                    (tmp_path / folder / value).write_bytes(b"")
                    if (folder, tmp_path / folder) not in added:
                        folder_paths.add_model_folder_path(folder, str(tmp_path / folder))
                        added.append((folder, tmp_path / folder))
        folder_paths.filename_list_cache.clear()

    yield place
    for folder, path in added:
        folder_paths.folder_names_and_paths[folder][0].remove(str(path))
    folder_paths.filename_list_cache.clear()


@pytest.mark.parametrize("name", NAMES)
def test_api_copy_passes_comfyui_validation_but_for_absent_model_files(host, name, placeholder_model_files):
    prompt = load(API_DIR / f"{name}.json")
    ui = load(EXAMPLES_DIR / f"{name}.json")
    sent_to_server = {str(n["id"]) for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY_NODES}
    assert set(prompt) == sent_to_server
    # Without the model files, the only complaints are about the model file names.
    for node_id, reasons in validation_errors(host, prompt).items():
        for reason in reasons:
            key = (prompt[node_id]["class_type"], reason["extra_info"]["input_name"])
            assert reason["type"] == "value_not_in_list" and key in MODEL_FILE_INPUTS, (name, node_id, reason)
    placeholder_model_files(prompt)
    assert validation_errors(host, prompt) == {}


def test_validation_catches_a_bad_widget_value(host, placeholder_model_files):
    # The check above can fail: the same prompt with an unknown sampler is rejected.
    prompt = load(API_DIR / "pag_sdxl.json")
    placeholder_model_files(prompt)
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "KSampler")
    prompt[sampler]["inputs"]["sampler_name"] = "no_such_sampler"
    errors = validation_errors(host, prompt)
    assert [r["extra_info"]["input_name"] for r in errors[sampler]] == ["sampler_name"]


def test_template_browser_lists_and_serves_them(server):
    import urllib.parse
    import urllib.request

    listed = server.get_json("/api/workflow_templates")
    assert sorted(listed[ODD_PACK_FOLDER]) == NAMES
    name = NAMES[0]
    url = f"{server.url}/api/workflow_templates/{urllib.parse.quote(ODD_PACK_FOLDER)}/{name}.json"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert json.loads(r.read()) == load(EXAMPLES_DIR / f"{name}.json")


@pytest.mark.parametrize("workflow", workflows(), ids=lambda w: w.name)
def test_saved_files_are_the_builder_specs(workflow):
    # The committed files are rebuilt from the specs (`make workflows`): a spec edited without a rebuild fails.
    prompt = load(API_DIR / f"{workflow.name}.json")
    for node in workflow.nodes:
        if node.type in FRONTEND_ONLY_NODES:
            continue
        saved = prompt[str(node.id)]
        assert saved["class_type"] == node.type
        for name, value in node.widgets.items():
            if name != "control_after_generate":
                assert saved["inputs"][name] == value, (workflow.name, node.id, name)
        for name, (source, slot) in node.inputs.items():
            assert saved["inputs"][name] == [str(source), slot], (workflow.name, node.id, name)
