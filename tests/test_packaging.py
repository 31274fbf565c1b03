"""Registry metadata, what a publish ships, and the pure-core import boundary."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import tomllib
from comfy_host import PACK_ROOT
from harness import PACK_FOLDER, in_process_host

PYPROJECT = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
HOST_MODULES = {
    "comfy", "comfy_extras", "comfy_api", "comfy_execution", "nodes", "folder_paths", "server", "execution",
    "latent_preview", "node_helpers",
}  # fmt: skip


def absolute_imports(source: str) -> list[str]:
    """Every module named by an absolute import statement in the source."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def host_imports(source: str) -> list[str]:
    return [n for n in absolute_imports(source) if n.split(".")[0] in HOST_MODULES]


def test_registry_metadata():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert project["name"] and len(project["name"]) < 100 and "comfyui" not in project["name"].lower()
    assert SEMVER.match(project["version"]), project["version"]
    assert len(project["description"]) > 20
    license_ = project["license"]
    assert (PACK_ROOT / license_["file"]).is_file() if "file" in license_ else license_.get("text")
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith("web/icon.svg")
    assert (PACK_ROOT / "web" / "icon.svg").is_file()
    assert re.match(r"^>=\s*\d+\.\d+\.\d+$", comfy["requires-comfyui"])


def test_dependencies_are_only_what_the_pack_imports_beyond_comfyui():
    # Every third-party module imported by shipped code must be ComfyUI's own (torch, ...) or declared.
    declared = {re.split(r"[<>=!~\[ ]", d)[0].lower().replace("-", "_") for d in PYPROJECT["project"]["dependencies"]}
    comfy_provided = {"torch", "numpy", "safetensors", "einops", "PIL", "aiohttp", "yaml", "scipy", "tqdm"}
    stdlib = set(sys.stdlib_module_names)
    for path in shipped_python_files():
        for name in absolute_imports(path.read_text()):
            top = name.split(".")[0]
            assert top in stdlib | HOST_MODULES | comfy_provided | declared, f"{path}: undeclared import {name}"


def git_tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=PACK_ROOT, capture_output=True, text=True, check=True).stdout
    return set(out.split())


def shipped_files() -> set[str]:
    """What `comfy node publish` would ship: git-tracked files minus .comfyignore, plus [tool.comfy] includes."""
    ignored = subprocess.run(
        ["git", "ls-files", "--cached", "--ignored", "--exclude-from=.comfyignore"],
        cwd=PACK_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    shipped = git_tracked() - set(ignored)
    for pattern in PYPROJECT["tool"]["comfy"].get("includes", []):
        shipped |= {str(p.relative_to(PACK_ROOT)) for p in PACK_ROOT.glob(pattern) if p.is_file()}
    return shipped


def shipped_python_files() -> list[Path]:
    return [PACK_ROOT / f for f in sorted(shipped_files()) if f.endswith(".py")]


def test_every_runtime_file_is_shipped_and_tests_are_not():
    host = in_process_host()
    root = Path(host.import_from(PACK_FOLDER).__file__).parent
    prefix = host.module_name(PACK_FOLDER)
    loaded = {
        str(Path(m.__file__).resolve().relative_to(PACK_ROOT))
        for name, m in list(sys.modules.items())
        if (name == prefix or name.startswith(prefix + ".")) and getattr(m, "__file__", None)
    }
    web = {str(p.relative_to(root)) for p in (root / "web").rglob("*") if p.is_file()}
    needed = loaded | web | {"pyproject.toml", "LICENSE", "README.md"}
    assert {"__init__.py", "nodes/__init__.py"} <= loaded
    shipped = shipped_files()
    assert needed <= shipped, f"needed at run time but not shipped (untracked or .comfyignore'd): {needed - shipped}"
    assert not any(f.startswith(("tests/", "scripts/", ".ci/")) for f in shipped)


def test_pure_cores_never_import_the_host():
    offenders = [
        f"{path.relative_to(PACK_ROOT)}: {name}"
        for folder in ("samplers", "guidance")
        for path in sorted((PACK_ROOT / folder).rglob("*.py"))
        for name in host_imports(path.read_text())
    ]
    assert not offenders, offenders


def test_boundary_check_catches_a_host_import():
    # The checker itself must be able to fail: a core module importing the host is flagged.
    source = "import comfy.samplers\nimport torch\nfrom folder_paths import get_folder_paths\nfrom .x import y\n"
    assert host_imports(source) == ["comfy.samplers", "folder_paths"]


def comfy_node_validate(cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """The registry's own pre-publish check (comfy-cli), offline, with its settings kept in a scratch HOME."""
    comfy = Path(sys.executable).parent / "comfy"
    env = {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "NO_COLOR": "1"}
    return subprocess.run(
        [str(comfy), "--skip-prompt", "--no-json", "node", "validate"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_comfy_node_validate_passes(tmp_path):
    result = comfy_node_validate(PACK_ROOT, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # No security warnings either (exec/eval, several statements on one line): they are not fatal yet.
    assert "All validation checks passed" in result.stdout, result.stdout


def test_comfy_node_validate_can_fail(tmp_path):
    # The same check rejects metadata without a version.
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "pyproject.toml").write_text(
        (PACK_ROOT / "pyproject.toml").read_text().replace('version = "', 'version = "" # was "', 1)
    )
    result = comfy_node_validate(pack, tmp_path)
    assert result.returncode != 0 and "version" in result.stdout + result.stderr, result.stdout + result.stderr
