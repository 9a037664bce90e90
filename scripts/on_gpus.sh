# Sourced by the recipe scripts: run a Python module on the GPUs listed, as one process, or one per GPU through
# accelerate (DDP) when there are several.
#   on_gpus GPUS PORT -m module args...     GPUS: comma-separated ids; PORT: accelerate's main process port
on_gpus() {
  local gpus=$1 port=$2; shift 2
  local n; n=$(echo "$gpus" | tr ',' '\n' | grep -c .)
  local launch=(python3)
  [ "$n" -gt 1 ] && launch=(accelerate launch --multi_gpu --num_processes "$n" --mixed_precision bf16 --main_process_port "$port")
  CUDA_VISIBLE_DEVICES=$gpus "${launch[@]}" "$@"
}
