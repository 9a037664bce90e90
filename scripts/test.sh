#!/usr/bin/env bash
# Fresh machine -> test results: set up, then run the whole suite (tiny random models + real SmolLM2 tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
