#!/usr/bin/env bash
# make gpu-check, and the one command a lent device machine runs (docs/gpu-check.md). Where a GPU is present
# and TorchServe is not installed, it installs what `make gpu-pack GPU_PACK_ARGS=--served` put in .gpu-carry/
# (TorchServe's wheels into a throwaway venv over this python's packages, a Java runtime into /tmp), then runs
# python -m benchmarks.gpu_check with these arguments. Without a GPU it installs nothing and the check
# refuses in one line (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c '' 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
CARRY=.gpu-carry
if nvidia-smi -L >/dev/null 2>&1; then
  if compgen -G "$CARRY/wheels/*.whl" >/dev/null && ! "$PY" -c 'import ts' 2>/dev/null; then
    VENV=/tmp/gpu-check-venv  # torchserve's launcher must sit beside the interpreter (handlers.process)
    "$PY" -m venv --without-pip "$VENV"
    "$PY" -c 'import site; print("\n".join(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()))' \
      > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu-check-base.pth"
    PY=$VENV/bin/python
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check "$CARRY"/wheels/*.whl \
      || { echo "gpu-check: installing $CARRY/wheels failed" >&2; exit 2; }
  fi
  if [ -f "$CARRY/jre.tar.xz" ] && [ -z "${JAVA_HOME:-}" ] && ! command -v java >/dev/null; then
    mkdir -p /tmp/gpu-check-jre && tar -C /tmp/gpu-check-jre -xJf "$CARRY/jre.tar.xz"
    export JAVA_HOME=/tmp/gpu-check-jre/jre
  fi
fi
exec "$PY" -m benchmarks.gpu_check "$@"
