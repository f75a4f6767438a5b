#!/usr/bin/env bash
# Create .venv and install grng into it (editable), once. Re-running skips finished work.
#
# Two modes:
#  - registry mode (default): a plain venv, torch pinned to 2.13.0 through constraints.txt so the
#    local CPU wheel is used, then grng with the extras named by GRNG_EXTRAS (default: dev, what
#    `make test` needs; `make demo` passes demo, so the demo's set-up skips the test frameworks).
#  - system mode: the host python3 already has torch (e.g. a GPU machine with CUDA torch and no
#    package registry). The venv sees the host's packages through a .pth file (this also works
#    when python3 is itself a venv, where --system-site-packages would not) and nothing is
#    downloaded.
# The compiled extension (grng.ops._C) is built against the venv's torch unless GRNG_EXT=0
# (`make demo` skips it on purpose: grng then runs its reference ops, and the demo runs with
# GRNG_EXT_COMPILE=0 so that nothing compiles it on first use either).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=python3
mode_file=$VENV/.grng-mode

if [ ! -x "$VENV/bin/python" ]; then
  if [ "${GRNG_SYSTEM_TORCH:-auto}" != 0 ] && $PY -c "import torch" >/dev/null 2>&1; then
    mode=system
  else
    mode=registry
  fi
  echo "[bootstrap] creating $VENV ($mode mode)"
  $PY -m venv "$VENV"
  if [ "$mode" = system ]; then
    host_site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    venv_site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$host_site" > "$venv_site/_grng_host_site.pth"
  fi
  echo "$mode" > "$mode_file"
fi
mode=$(cat "$mode_file")
extras=${GRNG_EXTRAS:-dev}
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if [ "$mode" = registry ]; then
  # Build requirements first: the extension is built with --no-build-isolation against this torch.
  "${PIP[@]}" install -q -c constraints.txt "torch==2.13.0" "setuptools>=64" ninja
  "${PIP[@]}" install -q -c constraints.txt --no-build-isolation -e ".[$extras]"
else
  "${PIP[@]}" install -q --no-deps --no-index --no-build-isolation -e .
fi
if [ "${GRNG_EXT:-1}" = 0 ]; then
  "$VENV/bin/python" -c "import grng, torch; print('[bootstrap] grng', grng.__version__, 'torch', torch.__version__, 'backends', {k: v for k, v in grng.backends().items() if k != 'ext'})"
  echo "[bootstrap] the C++ extension is skipped on purpose (GRNG_EXT=0): grng runs its reference ops; GRNG_EXT=1 builds it"
else
  "$VENV/bin/python" -c "import grng, torch; print('[bootstrap] grng', grng.__version__, 'torch', torch.__version__, 'backends', grng.backends())"
fi
