export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
A="--stage ae --base_model random:.gpu/l7b --batch_size 4 --min_chunk_tokens 384 --max_chunk_tokens 512 --log_every 4 --eval_every 100000 --eval_samples 0 --lr 1e-4 --warmup_steps 2 --seed 0"
L="accelerate launch --config_file configs/accelerate/2gpu.yaml -m gmsa_rag.train"
f() { grep -v "it/s\]\|Warning\|warn(\|clean_up" | grep -E "steps|final|rror|Traceback|limit" | tail -6; }
echo "== 2 GPUs"; timeout 110 $L $A --out_dir /root/ddp --steps 12 --save_every 8 2>&1 | f
echo "== 2 GPUs, resumed"; timeout 90 $L $A --out_dir /root/ddp --steps 16 --save_every 8 2>&1 | f
echo "== 1 GPU"; timeout 90 python3 -m gmsa_rag.train $A --out_dir /root/one --steps 12 --save_every 100 2>&1 | f
for d in ddp one; do echo "== $d"; cat /root/$d/metrics.jsonl; ls /root/$d/checkpoints; cp /root/$d/metrics.jsonl $OUT/$d-metrics.jsonl; done
cp /root/ddp/train_config.json $OUT/ddp-train_config.json
