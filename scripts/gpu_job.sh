#!/usr/bin/env bash
# Jobs that outlive one call of the project's device tool (each call: at most 10 minutes; the machine stays held
# for up to 30 minutes while calls follow each other within ~30 s). Source scripts/gpu_env.sh first.
#   scripts/gpu_job.sh start NAME COMMAND...   run COMMAND in the background (log: $GPU_HOME/jobs/NAME/log)
#   scripts/gpu_job.sh wait NAME [SECONDS]     follow its log until it ends or SECONDS pass (default 540), then the
#                                              last lines, `nvidia-smi` and whether it still runs; exit 0 once ended
#   scripts/gpu_job.sh status                  every job: running or its exit code
# (POLL: seconds between looks at a running job, default 10)
# e.g. a stage-2 run chained over calls (each call `. scripts/gpu_env.sh && scripts/gpu_job.sh wait s2`):
#   scripts/gpu_job.sh start s2 env INIT=checkpoints/smollm2-gmsa COMPILE=true ... scripts/stage2_recipe.sh long
set -euo pipefail
JOBS=${GPU_HOME:-/root}/jobs
command=${1:-}; shift || true
case "$command" in
  start)
    name=${1:?a job name}; shift
    [ $# -gt 0 ] || { echo "gpu_job: start $name needs a command" >&2; exit 2; }
    dir=$JOBS/$name
    if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "gpu_job: $name is already running (pid $(cat "$dir/pid"))" >&2; exit 2
    fi
    mkdir -p "$dir" && rm -f "$dir/rc"
    printf '%q ' "$@" > "$dir/command"
    nohup setsid bash -c '"$@" > "$0/log" 2>&1; echo $? > "$0/rc"' "$dir" "$@" > /dev/null 2>&1 &
    echo $! > "$dir/pid"
    echo "gpu_job: $name started (pid $!): $(cat "$dir/command")" ;;
  wait)
    name=${1:?a job name}; seconds=${2:-540}; dir=$JOBS/$name
    [ -f "$dir/pid" ] || { echo "gpu_job: no job $name" >&2; exit 2; }
    end=$(( SECONDS + seconds ))
    while [ ! -f "$dir/rc" ] && (( SECONDS < end )); do sleep "${POLL:-10}"; done
    tail -n 25 "$dir/log" 2>/dev/null || true
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null || true
    if [ -f "$dir/rc" ]; then echo "gpu_job: $name ended with exit code $(cat "$dir/rc")"; exit 0; fi
    echo "gpu_job: $name still running after ${seconds}s"; exit 1 ;;
  status)
    for dir in "$JOBS"/*/; do
      [ -d "$dir" ] || continue
      name=$(basename "$dir")
      if [ -f "$dir/rc" ]; then echo "$name: ended, exit code $(cat "$dir/rc")"; else echo "$name: running"; fi
    done ;;
  *) echo "usage: scripts/gpu_job.sh start NAME COMMAND... | wait NAME [SECONDS] | status" >&2; exit 2 ;;
esac
