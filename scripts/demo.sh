#!/usr/bin/env bash
# Fresh machine -> answer: set up, then ask a question over the bundled documents with GMSA compression.
#   scripts/demo.sh ["your question"] [gmsa-rag ask options...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
question=${1:-"who was the author of the art of war"}
shift || true
exec .venv/bin/gmsa-rag ask "$question" "$@"
