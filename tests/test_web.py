"""The frontend extension as the real server serves it: valid JavaScript, and every route it calls answers."""

import re
import shutil
import subprocess
from urllib.parse import quote

from comfy_host import PACK_ROOT
from conftest import ODD_PACK_FOLDER

SCRIPT = PACK_ROOT / "web" / "trajectory_lab.js"


def test_extension_is_valid_javascript(tmp_path):
    node = shutil.which("node")
    assert node, "Node.js is needed to check the frontend extension's syntax"
    module = tmp_path / "extension.mjs"  # checked as an ES module, as the frontend imports it
    module.write_text(SCRIPT.read_text())
    result = subprocess.run([node, "--check", str(module)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_served_extension_calls_routes_that_exist(server):
    import urllib.request

    url = f"{server.url}/extensions/{quote(ODD_PACK_FOLDER)}/trajectory_lab.js"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read().decode() == SCRIPT.read_text()
    source = SCRIPT.read_text()
    routes = dict(re.findall(r'const (\w+_ROUTE) = "([^"]+)"', source))
    assert set(routes) == {"BANK_ROUTE", "CLEAR_ROUTE"}
    # The frontend's api.fetchApi prefixes /api: the routes must answer there.
    size = server.get_json("/api" + routes["BANK_ROUTE"] + "web_test")
    assert size["total"] == 0
    assert server.post_json("/api" + routes["CLEAR_ROUTE"], {"name": "web_test"})["name"] == "web_test"


def test_every_node_has_a_description_and_every_input_a_tooltip(host):
    # The frontend shows these on hover; they are the in-app documentation.
    from comfy_api.internal import _ComfyNodeInternal

    import nodes

    missing = []
    for name, cls in sorted(nodes.NODE_CLASS_MAPPINGS.items()):
        if not name.startswith("TL_"):
            continue
        assert issubclass(cls, _ComfyNodeInternal), f"{name} is not a V3 node"
        info = cls.GET_NODE_INFO_V1()
        if len(info.get("description", "")) < 20:
            missing.append(f"{name}: description")
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                if not options.get("tooltip"):
                    missing.append(f"{name}.{input_name}: tooltip")
    assert not missing, missing
