#!/usr/bin/env bash
# Debian's Chromium for the browser tests (tests/test_browser.py). Playwright drives it by path and never
# downloads a browser of its own. Does nothing when a chromium is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium is missing: run as root (or: sudo apt-get install -y chromium fonts-liberation)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
chromium --version
