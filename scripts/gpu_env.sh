# Source from the repository root on a GPU machine of the project's device tool: `. scripts/gpu_env.sh`.
#
# Each call there carries at most 64 MiB and the copied tree loses, at every call, what the call's own tree
# lacks. So big inputs travel once, in separate calls, and are kept outside the tree under $GPU_HOME; this puts
# them in place again at the start of every call:
#   .gpu/pylib.tgz carried    -> unpacked to $GPU_HOME/pylib (gguf, rouge_score, nltk, diskcache, bm25s: the image
#                                lacks them; scripts/gpu_pack.sh builds it and the GGUF parts below)
#   .devmodel/a|b carried     -> the SmolLM2 GGUF assembled at $GPU_HOME/m/smollm2.gguf (shared/hooks/device-model-parts.sh)
#   data/<name>, checkpoints/<name> present in the tree -> kept under $GPU_HOME; absent -> linked back from there
# and exports the environment the trainer and benchmarks need.
GPU_HOME=${GPU_HOME:-/root}
mkdir -p "$GPU_HOME/m" "$GPU_HOME/data" "$GPU_HOME/checkpoints"
if [ -f .gpu/pylib.tgz ] && [ ! -d "$GPU_HOME/pylib/gguf" ]; then
  mkdir -p "$GPU_HOME/pylib" && tar xzf .gpu/pylib.tgz -C "$GPU_HOME/pylib"
  mkdir -p "$GPU_HOME/pylib/gguf-0.19.0.dist-info"  # transformers checks the installed gguf version
  printf 'Metadata-Version: 2.1\nName: gguf\nVersion: 0.19.0\n' > "$GPU_HOME/pylib/gguf-0.19.0.dist-info/METADATA"
fi
[ -f .devmodel/a/part_aa ] && cp .devmodel/a/part_aa "$GPU_HOME/m/"
if [ -f .devmodel/b/part_ab ] && [ -f "$GPU_HOME/m/part_aa" ]; then
  cat "$GPU_HOME/m/part_aa" .devmodel/b/part_ab > "$GPU_HOME/m/smollm2.gguf"
  echo "$(cat .devmodel/b/md5)  $GPU_HOME/m/smollm2.gguf" | md5sum -c --quiet || echo "gpu_env: the assembled GGUF is corrupt" >&2
fi
for kind in data checkpoints; do
  mkdir -p "$kind"
  for item in "$kind"/*/; do  # brought by this call: keep a copy for the next ones
    item=${item%/}
    [ -d "$item" ] && [ ! -L "$item" ] && [ -n "$(ls -A "$item")" ] || continue  # (an emptied folder: left behind)
    rm -rf "${GPU_HOME:?}/$kind/$(basename "$item")" && cp -r "$item" "$GPU_HOME/$kind/"
  done
  for kept in "$GPU_HOME/$kind"/*/; do  # brought by an earlier call: link it back
    kept=${kept%/}
    [ -d "$kept" ] || continue
    name=$(basename "$kept")
    if [ ! -e "$kind/$name" ] || [ -L "$kind/$name" ] || [ -z "$(ls -A "$kind/$name")" ]; then
      rm -rf "${kind:?}/$name" && ln -s "$kept" "$kind/$name"
    fi
  done
done
[ -f "$GPU_HOME/m/smollm2.gguf" ] && export GMSA_RAG_SMOLLM2_GGUF="$GPU_HOME/m/smollm2.gguf"
export PYTHONPATH="$GPU_HOME/pylib:$PWD${PYTHONPATH:+:$PYTHONPATH}" GMSA_RAG_HOME="$GPU_HOME/gh" \
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True XLA_PYTHON_CLIENT_PREALLOCATE=false
