#!/usr/bin/env bash
# The issue-7 comparisons on one CUDA GPU, in about 5 minutes on a recent data-centre GPU.
#
#     bash benchmarks/gpu.sh            # writes benchmarks/results/gpu_*.json and gpu_scaling.png
#     python -m benchmarks.report       # folds them into benchmarks/RESULTS.md (a "GPU" section)
#
# Same model shapes, data, optimizer, LoRA settings and bf16 autocast as the CPU runs; batches are
# larger so that a GPU step is not dominated by kernel launches. Peak memory on a GPU is
# torch.cuda.max_memory_allocated of each fresh worker process. Every step is synchronised before
# its clock stops. Needs transformers, peft and bitsandbytes with CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=benchmarks/results
mkdir -p "$OUT"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to run")'

# 1. ours vs HF Trainer + PEFT (+ bitsandbytes), SmolLM2-135M shape, 4 x 1024 tokens (~2 min: 6 fresh processes)
"$PY" -m benchmarks.vs_hf --device cuda --shape smollm2-135m --seq 1024 --batch 4 --steps 6 --warmup 2 \
    --methods lora,qlora,full --json "$OUT/gpu_vs_hf_smollm2.json"
# 2. the same at the Qwen2.5-0.5B shape, LoRA and QLoRA, and ours with --quantize-embeddings (~2 min)
"$PY" -m benchmarks.vs_hf --device cuda --shape qwen2.5-0.5b --seq 1024 --batch 4 --steps 6 --warmup 2 \
    --methods lora,qlora,qlora+embed --json "$OUT/gpu_vs_hf_qwen05b.json"
# 3. step time and memory against length (with and without activation checkpointing) and size (~1 min)
"$PY" -m benchmarks.scaling --quick --device cuda --json "$OUT/gpu_scaling.json" --png "$OUT/gpu_scaling.png"
echo "wrote $OUT/gpu_vs_hf_smollm2.json $OUT/gpu_vs_hf_qwen05b.json $OUT/gpu_scaling.json $OUT/gpu_scaling.png"
