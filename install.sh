#!/usr/bin/env bash
# Creates the virtualenv and installs vidbatch with its test extra.
# Torch: on a machine without an NVIDIA GPU (this one, CI) torch is pinned to the CPU build
# 2.13.0 *before* anything else, and every later install is constrained to it, so no CUDA wheels
# are ever downloaded. With an NVIDIA GPU (nvidia-smi works) the normal CUDA torch is installed.
# VIDBATCH_TORCH overrides the requirement, e.g. VIDBATCH_TORCH="torch==2.5.1".
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip setuptools wheel
if [ -n "${VIDBATCH_TORCH:-}" ]; then
  torch_req="$VIDBATCH_TORCH"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  torch_req="torch"
else
  torch_req="torch==2.13.0"
fi
$pip install -q "$torch_req"
installed=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
constraints=$(mktemp)
echo "torch==$installed" > "$constraints"
$pip install -q -c "$constraints" -e ".[dev]"
rm -f "$constraints"
"$venv/bin/python" -c 'import torch, diffusers, vidbatch; print("vidbatch ready: torch", torch.__version__)'
# Optional, best effort, never fatal: Chromium for the report's browser test (tests/test_report.py
# skips it without one). Only as root with apt-get, and only on CI or when asked with
# VIDBATCH_INSTALL_CHROMIUM=1.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && { [ -n "${CI:-}" ] || [ "${VIDBATCH_INSTALL_CHROMIUM:-}" = 1 ]; } \
    && ! command -v chromium >/dev/null 2>&1; then
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
    && echo "chromium installed (for the report test)" \
    || echo "note: chromium could not be installed; the report's browser test will be skipped"
fi
