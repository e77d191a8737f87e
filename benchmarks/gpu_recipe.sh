#!/usr/bin/env bash
# The GPU training recipe behind docs/training.md. Run from the repo root on a CUDA machine with
# spotmatch importable; DATA is a dataset folder (labels.csv + images/), NAME a run name, SPLIT
# `encounter` (snow leopards, closed set) or `identity` (nyala, open set).
#   bash benchmarks/gpu_recipe.sh ../shared/datasets/snowleopard snow encounter OUTDIR
# Both backbones train at once on one GPU (each is small next to an H100), then both are evaluated
# with the untrained ImageNet baseline on the run's own held-out split, using last.pt (the final
# epoch, no checkpoint picked on the validation figures it is reported on).
set -euo pipefail
DATA=$1 NAME=$2 SPLIT=$3 OUT=${4:-runs}
mkdir -p "$OUT"
common=(--data "$DATA/labels.csv" --split-by "$SPLIT" --device cuda --num-workers 6 --eval-every 5)
python3 -m spotmatch train "${common[@]}" --preset lite2 --out "runs/$NAME-lite2" > "$OUT/$NAME-lite2.log" 2>&1 &
python3 -m spotmatch train "${common[@]}" --preset convnext_small --pretrained none --out "runs/$NAME-convnext" > "$OUT/$NAME-convnext.log" 2>&1 &
wait
cp "runs/$NAME-lite2/history.csv" "$OUT/$NAME-lite2-history.csv"
cp "runs/$NAME-convnext/history.csv" "$OUT/$NAME-convnext-history.csv"
python3 -m spotmatch evaluate --data "$DATA/labels.csv" --checkpoint "runs/$NAME-lite2/last.pt" \
    --checkpoint "runs/$NAME-convnext/last.pt" --baseline efficientnet_lite2 --device cuda --num-workers 8 \
    --batch-size 64 --out "$OUT/$NAME-eval.md"
