#!/usr/bin/env bash
# The whole test suite under another Triton, in a throwaway virtual environment: the
# kernels must work on the GPU machine's Triton (3.6) as well as on the newest one the CPU
# lane installs. On a CPU the kernels run on that Triton's interpreter, which checks the
# language surface they use (and, in test_kernel_resources.py, its compiler's shared
# memory for sm_75 / sm_90), not its GPU code generation.
#
#   bash tests/triton_compat.sh            # triton 3.6.0
#   bash tests/triton_compat.sh 3.7.1 [pytest args...]
#   PYTHON=python3.12 TORCH=2.11.0 bash tests/triton_compat.sh 3.6.0
#       # the GPU machine's Python and torch too (torch from PyPI: the CUDA build, ~4 GB;
#       # it runs on the CPU)
#
# Triton < 3.7's interpreter fails under numpy >= 2.4 (backends.interpreter_numpy_conflict),
# so numpy < 2.4 is installed with it.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-3.6.0}"
shift || true
venv="${TRITON_COMPAT_VENV:-${TMPDIR:-/tmp}/unimrg-triton-${version}}"

"${PYTHON:-python3}" -m venv "${venv}"
"${venv}/bin/python" -m pip install --quiet --upgrade pip
"${venv}/bin/python" -m pip install --quiet "torch==${TORCH:-2.13.0}"
"${venv}/bin/python" -m pip install --quiet -e ".[dev]"
"${venv}/bin/python" -m pip install --quiet "triton==${version}" "numpy<2.4"
"${venv}/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
"${venv}/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
