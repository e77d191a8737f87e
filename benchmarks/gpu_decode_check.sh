#!/usr/bin/env bash
# The one device call that measures JPEG decoding on the GPU (docs/training.md, "Embedding throughput"),
# for a session lent a CUDA machine. Run from the repo root there, with the staged nyala copy carried
# (`python benchmarks/stage_for_gpu.py ../shared/datasets/nyala .stage/nyala --side 352 --quality 72`):
#   bash benchmarks/gpu_decode_check.sh "$OUT"
# First the nvJPEG path's pixels and embeddings against the CPU path's (tests that skip without CUDA),
# then each backbone's bare forward rate against the whole path with decoding in 15 worker processes and
# with decoding on the GPU, in one run per backbone so the ratios compare.
set -euo pipefail
OUT=${1:-docs/results}
export PYTHONPATH=${PYTHONPATH:-.}
python3 -m pytest -q -p no:cacheprovider tests/test_global.py -k "device_decoding or nvjpeg" 2>&1 | tee "$OUT/gpu_decode_tests.txt"
for backbone in efficientnet_lite2 convnext_small; do
  python3 benchmarks/bench_embed.py --images .stage/nyala/images --backbone "$backbone" --image-size 384 --batch-size 64 \
      --num-workers 15 --device cuda --limit 1213 --repeat 16 --decode-on-device --out "$OUT/bench_embed_gpu_decode_$backbone.md"
done
