#!/usr/bin/env bash
# SafeT2I one-stop set-up. Creates ./.venv, installs PyTorch (a CPU build where there is
# no NVIDIA GPU), runs install.py (the same path ComfyUI-Manager and A1111 take), then:
#
#   bash tools/dev.sh demo          filter the sample pictures with the default model
#   bash tools/dev.sh test [ARGS]   run the whole test suite (extra ARGS go to pytest)
#
# Idempotent: a second run skips every install (stamp keyed on the dependency files).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${SAFET2I_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
step() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test|demo|setup) ;;
  *) echo "usage: bash tools/dev.sh {demo|test [pytest args]|setup}" >&2; exit 64 ;;
esac

command -v python3 >/dev/null || die "python3 is required"
if [ ! -x "$PY" ] || ! "$PY" -c 'import sys' 2>/dev/null; then
  step "creating virtual environment $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
# Quiet pip; keeps pip's exit status, drops only the machine's noisy find-links warnings.
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2); }

install_torch() {
  if "$PY" -c 'import torch' 2>/dev/null; then return 0; fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    step "installing torch (NVIDIA GPU found)"
    pip_q torch
  else
    step "installing a CPU build of torch"
    # (a) a wheel the machine provides locally (pip find-links / wheelhouse), then its deps;
    if "$PY" -m pip install -q --no-index --no-deps torch >/dev/null 2>&1; then
      ver="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
      pip_q "torch==${ver}"
    # (b) PyTorch's own CPU wheel index;
    elif timeout 300 "$PY" -m pip install -q --timeout 20 torch --index-url https://download.pytorch.org/whl/cpu >/dev/null 2>&1; then
      :
    else
      die "could not install a CPU build of torch. Install one into $VENV by hand (e.g. pip install torch --index-url https://download.pytorch.org/whl/cpu) and re-run."
    fi
  fi
  "$PY" -c 'import torch' 2>/dev/null || die "torch does not import after installation"
}

stamp="$VENV/.safet2i-stamp"
want="$(cat pyproject.toml install.py requirements.txt tools/dev.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c 'import torch, safet2i, onnxruntime, cv2, nudenet, pytest, skimage, onnx, diffusers, transformers' 2>/dev/null; then
  pip_q --upgrade pip
  install_torch
  step "installing SafeT2I requirements (requirements.txt, install.py)"
  pip_q -r requirements.txt
  "$PY" install.py
  pip_q --no-deps -e .
  step "installing test tools (pytest, scikit-image, matplotlib, onnx, diffusers, transformers)"
  pip_q pytest scikit-image matplotlib onnx diffusers transformers
  echo "$want" > "$stamp"
fi

case "$cmd" in
  setup)
    step "environment ready: $VENV" ;;
  test)
    step "running the test suite"
    set +e
    "$PY" -m pytest tests "$@"
    code=$?
    set -e
    [ "$code" -eq 5 ] && { echo "error: no tests were collected" >&2; exit 1; }
    exit "$code" ;;
  demo)
    OUT="${SAFET2I_DEMO_OUT:-$ROOT/safet2i-demo}"
    step "exporting benign sample pictures to $OUT/samples"
    "$PY" -m safet2i.cli samples "$OUT/samples"
    step "filtering them with NudeNet (policy face-only, action blur)"
    set +e
    "$PY" -m safet2i.cli filter "$OUT/samples" --out "$OUT/filtered" --policy face-only --action blur \
      --report "$OUT/report.json" --html "$OUT/report.html" --overwrite
    code=$?
    set -e
    # 0: nothing unsafe; 1: something flagged (faces are, under face-only) and censored.
    [ "$code" -le 1 ] || die "the filter failed (exit $code)"
    step "done: filtered copies in $OUT/filtered, report in $OUT/report.json and $OUT/report.html" ;;
esac
