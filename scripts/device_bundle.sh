#!/usr/bin/env bash
# Prepare what the GPU machine lacks for the benchmarks' ComfyUI host (shared/HOST.md): the torchsde and
# trampoline wheels, and an import-only placeholder for `av` (its 34 MB wheel does not fit the carry limit; no
# benchmark reads or writes video files). Carry `.cache/comfyui-0.3.75` and `.cache/device` and run bench/gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/device
partial=$out.partial
rm -rf "$partial"
mkdir -p "$partial/wheels" "$partial/stubs/av/subtitles"
python3 -m pip download --quiet --no-deps --only-binary=:all: torchsde==0.2.6 trampoline==0.1.2 -d "$partial/wheels"
: > "$partial/stubs/av/__init__.py"
printf 'class InputContainer:\n    pass\n\n\nclass OutputContainer:\n    pass\n' > "$partial/stubs/av/container.py"
: > "$partial/stubs/av/subtitles/__init__.py"
printf 'class SubtitleStream:\n    pass\n' > "$partial/stubs/av/subtitles/stream.py"
rm -rf "$out" && mv "$partial" "$out"
.venv/bin/python scripts/comfyui_tree.py >/dev/null 2>&1 || python3 scripts/comfyui_tree.py >/dev/null
du -sh "$out" .cache/comfyui-0.3.75
