#!/usr/bin/env bash
# Bring a training run back from a GPU machine of the project's device tool, whose calls return at most 8 files of
# 16 MiB and 64 MiB together, so that it can be judged here or resumed on the next machine.
#   scripts/gpu_bring_back.sh pack RUN_DIR [FIRST_PART]    (there, in a call; $OUT set by the tool)
#       packs RUN_DIR's newest checkpoint (the one `latest` names, else the last step-*) with its optimizer.pt
#       (OPTIMIZER=0 leaves it out), the run's latest / metrics.jsonl / train_config.json and RUN_DIR.log if any, as
#       one tar cut into parts of PART_BYTES (default 15,000,000) kept on the machine, then puts parts FIRST_PART..
#       FIRST_PART+3 (default 0..3) and the manifest (the tar's sha256 and its number of parts) in $OUT; it says
#       which call brings the rest. Packed once per checkpoint, so every call cuts the same parts.
#   scripts/gpu_bring_back.sh unpack DEST DIR...            (here)
#       joins the parts found in the DIRs (the calls' files_at folders), checks them against the manifest and
#       unpacks them under DEST (paths as in the repository: RUN_DIR/checkpoints/step-N/...)
# e.g. a stage-2 run paused with STOP_AFTER: `scripts/gpu_bring_back.sh pack runs/r32/s2-long` (then `... 4` if it
# says so), here `scripts/gpu_bring_back.sh unpack /work/keep /work/.device/13 /work/.device/14`; to resume it on the
# next machine, carry the checkpoint folder and the run's small files in one call and optimizer.pt in another (each
# call carries at most 64 MiB), then run the same training command.
set -euo pipefail
PER_CALL=4  # parts a call brings back: 4 x 15 MB under the 64 MiB a call returns

usage() { echo "usage: scripts/gpu_bring_back.sh pack RUN_DIR [FIRST_PART] | unpack DEST DIR..." >&2; exit 2; }
fail() { echo "gpu_bring_back: $*" >&2; exit 2; }

newest_checkpoint() {  # RUN_DIR -> checkpoints/step-N (relative to RUN_DIR)
  local run=$1 name
  if [ -f "$run/latest" ]; then
    name=$(tr -d '[:space:]' < "$run/latest")
  else
    name=$(find "$run/checkpoints" -mindepth 1 -maxdepth 1 -type d -name 'step-*' 2>/dev/null | sort | tail -n 1)
    name=${name##*/}
  fi
  [ -n "$name" ] && [ -d "$run/checkpoints/$name" ] || fail "no checkpoint in $run"
  echo "checkpoints/$name"
}

pack() {
  local run=${1%/} first=${2:-0}
  [ -n "${OUT:-}" ] && [ -d "$OUT" ] || fail "pack runs on the device machine, where \$OUT is the folder that comes back"
  [ -d "$run" ] || fail "no run folder $run"
  [[ $first =~ ^[0-9]+$ ]] || fail "FIRST_PART must be a part number, got $first"
  local checkpoint; checkpoint=$(newest_checkpoint "$run")
  local stage="${GPU_HOME:-/root}/bring-back/$(echo "$run/$checkpoint" | tr '/' '_')-optimizer${OPTIMIZER:-1}"
  if [ ! -f "$stage/manifest" ]; then
    rm -rf "$stage" && mkdir -p "$stage"
    local items=("$run/$checkpoint") extra
    for extra in "$run/latest" "$run/metrics.jsonl" "$run/train_config.json" "$run.log"; do
      [ -f "$extra" ] && items+=("$extra")
    done
    local exclude=()
    [ "${OPTIMIZER:-1}" = 1 ] || exclude=(--exclude=optimizer.pt)
    tar cf "$stage/run.tar" "${exclude[@]}" "${items[@]}"
    split -b "${PART_BYTES:-15000000}" -d -a 2 "$stage/run.tar" "$stage/part"
    printf '%s parts %s checkpoint %s\n' "$(sha256sum "$stage/run.tar" | cut -d' ' -f1)" \
      "$(find "$stage" -name 'part*' | wc -l)" "$run/$checkpoint" > "$stage/manifest.tmp"
    rm "$stage/run.tar" && mv "$stage/manifest.tmp" "$stage/manifest"
  fi
  local parts; parts=$(cut -d' ' -f3 "$stage/manifest")
  (( first < parts )) || fail "there are only $parts parts (0..$(( parts - 1 )))"
  cp "$stage/manifest" "$OUT/bring-back.manifest"
  local i last=$(( first + PER_CALL - 1 < parts - 1 ? first + PER_CALL - 1 : parts - 1 ))
  for (( i = first; i <= last; i++ )); do cp "$stage/$(printf 'part%02d' "$i")" "$OUT/bring-back.$(printf 'part%02d' "$i")"; done
  echo "gpu_bring_back: $run/$checkpoint, parts $first-$last of 0-$(( parts - 1 )) in \$OUT"
  if (( last < parts - 1 )); then echo "gpu_bring_back: next call: scripts/gpu_bring_back.sh pack $run $(( last + 1 ))"; fi
}

unpack() {
  local dest=$1; shift
  [ $# -gt 0 ] || usage
  local manifest="" dir
  for dir in "$@"; do
    [ -d "$dir" ] || fail "no folder $dir"
    [ -f "$dir/bring-back.manifest" ] && manifest="$dir/bring-back.manifest"
  done
  [ -n "$manifest" ] || fail "no bring-back.manifest in $*"
  local sha parts; read -r sha _ parts _ < "$manifest"
  local i found part
  JOINED=$(mktemp)
  trap 'rm -f "$JOINED"' EXIT
  for (( i = 0; i < parts; i++ )); do
    found=""
    for dir in "$@"; do
      part="$dir/bring-back.$(printf 'part%02d' "$i")"
      [ -f "$part" ] && found=$part
    done
    [ -n "$found" ] || fail "part $i of $parts is missing from $*: bring it with pack's FIRST_PART"
    cat "$found" >> "$JOINED"
  done
  [ "$(sha256sum "$JOINED" | cut -d' ' -f1)" = "$sha" ] || fail "the joined parts do not match the manifest (parts of two packings mixed?)"
  mkdir -p "$dest" && tar xf "$JOINED" -C "$dest"
  echo "gpu_bring_back: unpacked $(cut -d' ' -f5 "$manifest") under $dest"
}

case "${1:-}" in
  pack) shift; [ $# -ge 1 ] && [ $# -le 2 ] || usage; pack "$@" ;;
  unpack) shift; [ $# -ge 2 ] || usage; unpack "$@" ;;
  *) usage ;;
esac
