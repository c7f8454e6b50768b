#!/usr/bin/env bash
# GPU checks of issue 19 that the CPU cannot do (run from the repository root on a machine with an
# NVIDIA GPU; writes into ${OUT:-gpu_speed_check}). About 6-9 minutes on one H200:
#  1. cuDNN fused attention parity (bf16, vs a float64 reference; gradients where it trains) and
#     the FLOP/utilisation tests, on the GPU;
#  2. the benchmark in bf16 on one model per family: the 'attention' column must read cudnn for
#     ViT and the Swin inference, the 'counted by' column 'lowered' wherever XLA's count hides
#     cuBLAS calls, and no utilisation is negative or absurd;
#  3. the side-by-side against timm (flexvision alone where torch/timm are not installed).
set -euo pipefail
OUT="${OUT:-gpu_speed_check}"
mkdir -p "$OUT"
python -c "import jax; print(jax.devices())" | tee "$OUT/devices.txt"
python -m pytest -q -rs tests/test_attention_select.py tests/test_flops.py \
  -k "gpu or choose or utilization or datasheet or absurd or simulated" 2>&1 | tee "$OUT/pytest.txt"
python -m flexvision.benchmark --models vit_base_patch16_224,swin_tiny_patch4_window7_224,mvitv2_tiny,hrnet_w18_small \
  --batch_size 64 --resolutions 224 --dtype bfloat16 \
  --repeats 3 --json "$OUT/families_bf16.json" 2>&1 | tee "$OUT/families_bf16.txt"
python -m flexvision.benchmark.versus_timm --json "$OUT/versus_timm.json" 2>&1 \
  | tee "$OUT/versus_timm.txt"
