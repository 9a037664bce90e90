#!/usr/bin/env bash
# On this (CPU) machine, before a session on a GPU machine of the project's device tool: build what
# scripts/gpu_env.sh unpacks there, in git-ignored folders that each call carries.
#   .gpu/pylib.tgz   the pure-Python packages the GPU image lacks, from this repository's venv (scripts/setup.sh)
#   .devmodel/a|b    the SmolLM2 GGUF in two parts, one per call (shared/hooks/device-model-parts.sh)
# Then: call 1 carries [".devmodel/a", ".gpu"], call 2 [".devmodel/b"], each running `. scripts/gpu_env.sh` first,
# back to back (the machine is given back after ~30 s idle); later calls carry only what they need.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=${PACKAGES:-"gguf rouge_score nltk diskcache bm25s"}
python=.venv/bin/python
[ -x "$python" ] || { echo "gpu_pack: no venv at .venv: run scripts/setup.sh first" >&2; exit 2; }
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
items=()
for package in $PACKAGES; do
  [ -d "$site/$package" ] || { echo "gpu_pack: $package is not installed in .venv" >&2; exit 2; }
  items+=("$package")
  for info in "$site/$package"-*.dist-info; do  # (the names here have no dash, so pip's folder name is the same)
    [ -d "$info" ] && items+=("$(basename "$info")")
  done
done
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
tar czf .gpu/pylib.tgz -C "$site" --exclude=__pycache__ "${items[@]}"
echo "gpu_pack: .gpu/pylib.tgz ($(du -h .gpu/pylib.tgz | cut -f1)): ${items[*]}"
model_parts=../shared/hooks/device-model-parts.sh
if [ -f "$model_parts" ]; then
  PATH="$PWD/.venv/bin:$PATH" bash "$model_parts" > /dev/null && echo "gpu_pack: .devmodel/a and .devmodel/b ready"
else
  echo "gpu_pack: no $model_parts here: the GGUF parts were not made" >&2
fi
