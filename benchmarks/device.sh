#!/usr/bin/env bash
# One prepared accelerator benchmark (benchmarks/device.py): SmolLM2-135M and Llama-3.2-1B shapes (random
# weights) x LoRA, QLoRA, full fine-tuning in bf16; tokens/s, MFU and peak device memory per cell, then the
# same cells in torch + peft + bitsandbytes when their CUDA wheels install. Meant for a fresh GPU machine:
# under 8 minutes including the install.
#
#   bash benchmarks/device.sh             # install what is missing, run, print the table
#   bash benchmarks/device.sh --dry-run   # build every cell's step abstractly on any backend and stop (CI)
#   bash benchmarks/device.sh --no-torch  # jft's cells only
#
# Environment: PYTHON (default .venv/bin/python, created if missing), JFT_WHEELS=DIR (install from local wheels,
# no index: for machines without network), OUT=FILE (append the table there).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0; torch_side=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --no-torch) torch_side=0 ;;
    *) echo "device.sh: unknown argument $arg (expected --dry-run, --no-torch)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-.venv/bin/python}
pip_install() {  # pip_install PYTHON ARGS...: from JFT_WHEELS when set, else the index
  local py=$1; shift
  if [ -n "${JFT_WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --find-links "$JFT_WHEELS" "$@"
  else
    "$py" -m pip install -q "$@"
  fi
}

if [ "$dry_run" = 1 ]; then
  [ -x "$PY" ] || PY=python3
  exec "$PY" benchmarks/device.py --dry-run
fi

start=$(date +%s)
if [ ! -x "$PY" ]; then
  echo "device.sh: creating .venv"
  python3 -m venv .venv && PY=.venv/bin/python
  pip_install "$PY" -e ".[cuda12]"
fi
backend=$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none)
if [ "$backend" != gpu ]; then
  echo "device.sh: jax backend is $backend; installing jft[cuda12] (JAX's CUDA 12 plugin)"
  pip_install "$PY" -e ".[cuda12]" || true
  backend=$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none)
  if [ "$backend" != gpu ]; then
    echo "device.sh: error: still no GPU backend after installing jft[cuda12] (backend: $backend); is there an" \
         "NVIDIA driver (nvidia-smi) and network or JFT_WHEELS?" >&2
    exit 1
  fi
fi
"$PY" -c 'import jax; print("jax", jax.__version__, jax.default_backend(), jax.devices())'

args=()
if [ "$torch_side" = 1 ]; then
  # The peer in its own venv, so jft's stays as it is: torch's CUDA build, transformers, peft, bitsandbytes.
  TVENV=${TMPDIR:-/tmp}/jft-device-torch-venv; TPY=$TVENV/bin/python
  if [ ! -x "$TPY" ]; then
    python3 -m venv "$TVENV" >/dev/null 2>&1 || true
  fi
  install="$(declare -f pip_install); pip_install $TPY torch transformers peft bitsandbytes"
  if [ -x "$TPY" ] && JFT_WHEELS=${JFT_WHEELS:-} timeout 150 bash -c "$install" \
      && "$TPY" -c 'import torch, bitsandbytes; assert torch.cuda.is_available()' 2>/dev/null; then
    args+=(--torch --torch-python "$TPY")
  else
    echo "device.sh: torch + peft + bitsandbytes with CUDA did not install; jft's cells only"
  fi
fi
spent=$(( $(date +%s) - start ))
budget=$(( 470 - spent ))
echo "device.sh: setup took ${spent} s; ${budget} s left for the cells"
exec "$PY" benchmarks/device.py --deadline "$budget" ${OUT:+--out "$OUT"} ${args[@]+"${args[@]}"}
