#!/usr/bin/env bash
# Issue 25's GPU rows, prepared for a lent GPU machine (the workplace's `device` tool): one call
# of about 8 minutes, each benchmark under its own time limit so that one which hangs leaves the
# others' results. The machine's image has JAX (CUDA), PyTorch, transformers and peft and no
# network: nothing is installed, the package is read from src/, and the default corpus comes from
# a carried cache folder. Before the call, on this machine (any earlier run built the corpus):
#
#   mkdir -p .gpu_carry && cp ~/.cache/dantinox-eqx/shakespeare_gut.txt .gpu_carry/
#   device run: command "bash benchmarks/gpu_rows.sh", carry [".gpu_carry"], timeout_s 560
#
# Rows: GPT-2 small (124M, context 1024, batch 16) ms/step, tokens/s and MFU in bfloat16 and
# float32 (benchmarks/run.py's gpu entries), and SmolLM2-135M's shapes (random weights: the
# model's 98 MB file exceeds what a call carries) ours vs transformers + peft on the GPU: LoRA and
# full AdamW steps and greedy decoding (benchmarks/smollm2.py --random_init). Every results file
# and log is copied to $OUT. The variables below shorten it for a smoke test on a CPU
# (GPU_ROWS_TORCH_DEVICE=cpu GPU_ROWS_BATCH=1 GPU_ROWS_SEQ=64 GPU_ROWS_REPEATS=1).
set -u
out="${OUT:-/tmp/gpu_rows}"
mkdir -p "$out"
export PYTHONPATH=src WANDB_MODE=offline DANTINOX_EQX_NO_DOWNLOAD=1
[ -d .gpu_carry ] && export DANTINOX_EQX_CACHE="$PWD/.gpu_carry"
torch_device="${GPU_ROWS_TORCH_DEVICE:-cuda}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)" 2>&1
} > "$out/machine.txt"
timeout "${GPU_ROWS_RUN_S:-230}" python3 benchmarks/run.py --only gpt2-small-bf16 gpt2-small-f32 \
    --steps "${GPU_ROWS_STEPS:-20}" > "$out/run.log" 2>&1
echo "run.py exit $?" >> "$out/run.log"
cp benchmarks/results/gpu-*.json "$out/" 2>/dev/null
timeout "${GPU_ROWS_SMOLLM2_S:-250}" python3 benchmarks/smollm2.py --random_init --torch_device "$torch_device" \
    --batch_size "${GPU_ROWS_BATCH:-8}" --seq "${GPU_ROWS_SEQ:-1024}" --repeats "${GPU_ROWS_REPEATS:-5}" \
    --decode_tokens 64 --out "$out/smollm2_gpu.json" > "$out/smollm2.log" 2>&1
echo "smollm2.py exit $?" >> "$out/smollm2.log"
tail -n 3 "$out/run.log" "$out/smollm2.log"
