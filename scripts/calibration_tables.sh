#!/usr/bin/env bash
# Re-runs every `spotmatch calibrate` whose table is quoted in docs/fusion.md and the README, and copies
# each calibration.md to docs/results/. Needs the checkpoints the docs' training commands write under
# runs/ (and the U-Net of docs/segmentation.md); embeddings, keypoints and each pair's local evidence
# come from .cache/spotmatch, so a re-run takes minutes once they are cached (the two ALIKED + LightGlue
# rows: 28 and 53 minutes on 2 CPU cores the first time, most of it LightGlue; the runs that measured
# them predate the pair cache). Usage: bash scripts/calibration_tables.sh [NAME ...]
set -euo pipefail
cd "$(dirname "$0")/.."
SNOW=../shared/datasets/snowleopard/labels.csv
NYALA=../shared/datasets/nyala/labels.csv
# The U-Net from docs/segmentation.md's CPU command; UNET=unet:runs/seg-lite0-gpu/unet.pt for the GPU one.
UNET=${UNET:-unet:runs/seg-lite0-cpu/unet.pt}

# The -rerun tables: the 512-px nyala embedder re-trained by docs/training.md's command on 2026-12-07 and
# calibrated with that day's code (matching and k-reciprocal fixes since the first run); the first run's tables stay.
# The -searched tables are the same calibrations run again after the report gained the views searched on
# their own, on checkpoints re-trained by the docs' commands on 2026-11-24; on one machine the two share a checkpoint.
# name | data | checkpoint | out dir | extra flags | reliability diagram kept in docs/img
TABLES="
snow-calibration|$SNOW|runs/snow-cpu/best.pt|runs/snow-cpu||snow-reliability.png
snow-calibration-unweighted|$SNOW|runs/snow-cpu/best.pt|runs/snow-cpu/unweighted|--balance none
snow-calibration-top100|$SNOW|runs/snow-cpu/best.pt|runs/snow-cpu/top100|--top-k 100
snow-calibration-free-signs|$SNOW|runs/snow-cpu/best.pt|runs/snow-cpu/free-signs|--free-signs
snow-calibration-qe|$SNOW|runs/snow-cpu/best.pt|runs/snow-cpu/qe|--rerank qe
snow-seed1-calibration|$SNOW|runs/snow-cpu-seed1/best.pt|runs/snow-cpu-seed1|
snow-seed2-calibration|$SNOW|runs/snow-cpu-seed2/best.pt|runs/snow-cpu-seed2|
snow-20ep-calibration|$SNOW|runs/snow-cpu-20ep/best.pt|runs/snow-cpu-20ep|
snow-20ep-calibration-unweighted|$SNOW|runs/snow-cpu-20ep/best.pt|runs/snow-cpu-20ep/unweighted|--balance none
snow-20ep-calibration-free-signs|$SNOW|runs/snow-cpu-20ep/best.pt|runs/snow-cpu-20ep/free-signs|--free-signs
snow-20ep-calibration-qe|$SNOW|runs/snow-cpu-20ep/best.pt|runs/snow-cpu-20ep/qe|--rerank qe
snow-20ep-calibration-aliked|$SNOW|runs/snow-cpu-20ep/best.pt|runs/snow-cpu-20ep/aliked|--extractor aliked
snow-calibration-unet-local|$SNOW|runs/snow-cpu-masked/best.pt|runs/snow-cpu-masked|--local-masks $UNET
snow-calibration-unet-embedder|$SNOW|runs/snow-cpu-unet/best.pt|runs/snow-cpu-unet|
snow-calibration-unet-embedder-unweighted|$SNOW|runs/snow-cpu-unet/best.pt|runs/snow-cpu-unet/unweighted|--balance none
nyala-calibration|$NYALA|runs/nyala-cpu/best.pt|runs/nyala-cpu||nyala-reliability.png
nyala-calibration-unweighted|$NYALA|runs/nyala-cpu/best.pt|runs/nyala-cpu/unweighted|--balance none
nyala-10ep-calibration|$NYALA|runs/nyala-cpu-10ep/best.pt|runs/nyala-cpu-10ep|
nyala-10ep-calibration-unweighted|$NYALA|runs/nyala-cpu-10ep/best.pt|runs/nyala-cpu-10ep/unweighted|--balance none
nyala-10ep-calibration-top100|$NYALA|runs/nyala-cpu-10ep/best.pt|runs/nyala-cpu-10ep/top100|--top-k 100
nyala-20ep-calibration|$NYALA|runs/nyala-cpu-20ep/best.pt|runs/nyala-cpu-20ep|
nyala-20ep-calibration-unweighted|$NYALA|runs/nyala-cpu-20ep/best.pt|runs/nyala-cpu-20ep/unweighted|--balance none
nyala-20ep-calibration-free-signs|$NYALA|runs/nyala-cpu-20ep/best.pt|runs/nyala-cpu-20ep/free-signs|--free-signs
nyala-20ep-calibration-qe|$NYALA|runs/nyala-cpu-20ep/best.pt|runs/nyala-cpu-20ep/qe|--rerank qe
nyala-20ep-calibration-top100|$NYALA|runs/nyala-cpu-20ep/best.pt|runs/nyala-cpu-20ep/top100|--top-k 100
nyala-lite2-cpu-calibration|$NYALA|runs/nyala-cpu-lite2/best.pt|runs/nyala-cpu-lite2|
snow-lite2-cpu-calibration|$SNOW|runs/snow-cpu-lite2/best.pt|runs/snow-cpu-lite2|
snow-lite2-gpu-calibration|$SNOW|runs/snow-lite2-gpu/best.pt|runs/snow-lite2-gpu|
snow-lite2-gpu-calibration-top100|$SNOW|runs/snow-lite2-gpu/best.pt|runs/snow-lite2-gpu/top100|--top-k 100
nyala-lite2-gpu-calibration|$NYALA|runs/nyala-lite2-gpu/best.pt|runs/nyala-lite2-gpu|
nyala-lite2-gpu-calibration-top100|$NYALA|runs/nyala-lite2-gpu/best.pt|runs/nyala-lite2-gpu/top100|--top-k 100
nyala-lite2-gpu-calibration-top100-kr|$NYALA|runs/nyala-lite2-gpu/best.pt|runs/nyala-lite2-gpu/top100-kr|--top-k 100 --rerank k-reciprocal
nyala-lite2-gpu-calibration-kr|$NYALA|runs/nyala-lite2-gpu/best.pt|runs/nyala-lite2-gpu/kr|--rerank k-reciprocal
nyala-20ep-calibration-aliked|$NYALA|runs/nyala-cpu-20ep/best.pt|runs/nyala-cpu-20ep/aliked|--extractor aliked --no-compare-rerankers
snow-searched|$SNOW|runs/snow-cpu/best.pt|runs/snow-cpu/searched|
snow-20ep-searched|$SNOW|runs/snow-cpu-20ep/best.pt|runs/snow-cpu-20ep/searched|
nyala-searched|$NYALA|runs/nyala-cpu/best.pt|runs/nyala-cpu/searched|
nyala-20ep-searched|$NYALA|runs/nyala-cpu-20ep/best.pt|runs/nyala-cpu-20ep/searched|
nyala-20ep-searched-top100|$NYALA|runs/nyala-cpu-20ep/best.pt|runs/nyala-cpu-20ep/searched-top100|--top-k 100
nyala-20ep-select-view|$NYALA|runs/nyala-cpu-20ep-select/best.pt|runs/nyala-cpu-20ep-select|
nyala-20ep-select-view-top100|$NYALA|runs/nyala-cpu-20ep-select/best.pt|runs/nyala-cpu-20ep-select/top100|--top-k 100
snow-extra-nyala-half|$SNOW|runs/snow-cpu-extra-nyala-half/best.pt|runs/snow-cpu-extra-nyala-half|
nyala-extra-snow|$NYALA|runs/nyala-cpu-20ep-extra-snow/best.pt|runs/nyala-cpu-20ep-extra-snow|
nyala-20ep-384|$NYALA|runs/nyala-cpu-20ep-384/best.pt|runs/nyala-cpu-20ep-384|
nyala-20ep-384-kr|$NYALA|runs/nyala-cpu-20ep-384/best.pt|runs/nyala-cpu-20ep-384/kr|--rerank k-reciprocal
nyala-20ep-384-top100|$NYALA|runs/nyala-cpu-20ep-384/best.pt|runs/nyala-cpu-20ep-384/top100|--top-k 100
nyala-20ep-384-top100-kr|$NYALA|runs/nyala-cpu-20ep-384/best.pt|runs/nyala-cpu-20ep-384/top100-kr|--top-k 100 --rerank k-reciprocal
snow-20ep-384|$SNOW|runs/snow-cpu-20ep-384/best.pt|runs/snow-cpu-20ep-384|
nyala-20ep-512|$NYALA|runs/nyala-cpu-20ep-512/best.pt|runs/nyala-cpu-20ep-512|
nyala-20ep-512-top100|$NYALA|runs/nyala-cpu-20ep-512/best.pt|runs/nyala-cpu-20ep-512/top100|--top-k 100
nyala-20ep-512-top100-kr|$NYALA|runs/nyala-cpu-20ep-512/best.pt|runs/nyala-cpu-20ep-512/top100-kr|--top-k 100 --rerank k-reciprocal
nyala-20ep-512-qe|$NYALA|runs/nyala-cpu-20ep-512/best.pt|runs/nyala-cpu-20ep-512/qe|--rerank qe
nyala-20ep-512-top100-qe|$NYALA|runs/nyala-cpu-20ep-512/best.pt|runs/nyala-cpu-20ep-512/top100-qe|--top-k 100 --rerank qe
nyala-20ep-512-top200|$NYALA|runs/nyala-cpu-20ep-512/best.pt|runs/nyala-cpu-20ep-512/top200|--top-k 200
snow-20ep-top300|$SNOW|runs/snow-cpu-20ep/best.pt|runs/snow-cpu-20ep/top300|--top-k 300
nyala-20ep-512-rerun|$NYALA|runs/nyala-cpu-20ep-512/best.pt|runs/nyala-cpu-20ep-512/rerun|
nyala-20ep-512-top100-rerun|$NYALA|runs/nyala-cpu-20ep-512/best.pt|runs/nyala-cpu-20ep-512/rerun-top100|--top-k 100
nyala-20ep-512-top100-kr-rerun|$NYALA|runs/nyala-cpu-20ep-512/best.pt|runs/nyala-cpu-20ep-512/rerun-top100-kr|--top-k 100 --rerank k-reciprocal
"
wanted=" $* "
while IFS='|' read -r name data checkpoint out_dir extra diagram; do
    [[ -z "$name" ]] && continue
    [[ $# -gt 0 && "$wanted" != *" $name "* ]] && continue
    echo "== $name"
    # shellcheck disable=SC2086  # extra holds several flags
    .venv/bin/spotmatch calibrate --data "$data" --checkpoint "$checkpoint" --out-dir "$out_dir" $extra >/dev/null
    cp "$out_dir/calibration.md" "docs/results/$name.md"
    if [[ -n "$diagram" ]]; then cp "$out_dir/reliability.png" "docs/img/$diagram"; fi
done <<< "$TABLES"
