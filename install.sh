#!/usr/bin/env bash
# Creates the virtualenv and installs vidbatch with its test extra, saying what it does at each step.
# Torch: on a machine without an NVIDIA GPU (this one, CI) torch is pinned to the CPU build
# 2.13.0 *before* anything else, and every later install is constrained to it, so no CUDA wheels
# are ever downloaded. With an NVIDIA GPU (nvidia-smi works) the normal CUDA torch is installed.
# VIDBATCH_TORCH overrides the requirement, e.g. VIDBATCH_TORCH="torch==2.5.1".
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
started=$SECONDS
step() { echo "[install $((SECONDS - started))s] $*"; }
# pip's own lines are kept short (-q) but its progress bars stay on where there is a terminal.
pip="$venv/bin/python -m pip --disable-pip-version-check"
if [ ! -x "$venv/bin/python" ]; then
  step "creating the virtualenv $venv"
  "$python" -m venv "$venv"
fi
step "updating pip, setuptools, wheel"
$pip install -q --upgrade pip 'setuptools>=77' wheel
if [ -n "${VIDBATCH_TORCH:-}" ]; then
  torch_req="$VIDBATCH_TORCH"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  torch_req="torch"
else
  torch_req="torch==2.13.0"
fi
step "installing $torch_req (the largest download; a few minutes on a slow link)"
$pip install -q "$torch_req"
# The version from the package metadata: importing torch before numpy is installed would print
# torch's "Failed to initialize NumPy" warning.
installed=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch").split("+")[0])')
constraints=$(mktemp)
echo "torch==$installed" > "$constraints"
step "installing vidbatch and its dependencies (diffusers, transformers, lightning, ray, ...) against torch $installed"
# setuptools' notice that an editable install is one (a UserWarning of its build backend) is noise here.
PYTHONWARNINGS=ignore::UserWarning $pip install -q -c "$constraints" -e ".[dev]"
rm -f "$constraints"
step "checking the install"
"$venv/bin/python" -c 'import torch, diffusers, vidbatch; print("vidbatch", vidbatch.__version__, "ready: torch", torch.__version__)'
# Optional, best effort, never fatal: Chromium for the report's browser test (tests/test_report.py
# skips it without one). Only as root with apt-get, and only on CI or when asked with
# VIDBATCH_INSTALL_CHROMIUM=1.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && { [ -n "${CI:-}" ] || [ "${VIDBATCH_INSTALL_CHROMIUM:-}" = 1 ]; } \
    && ! command -v chromium >/dev/null 2>&1; then
  step "installing chromium (for the report's browser test)"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; } >/dev/null 2>&1 \
    && echo "chromium installed (for the report test)" \
    || echo "note: chromium could not be installed; the report's browser test will be skipped"
fi
step "done"
