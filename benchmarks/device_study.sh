#!/usr/bin/env bash
# One prepared script for a lent GPU (the `device` tool, about 15 minutes a session): the quality study's runs on
# the full amazon-games set that the CPU cannot train in a session (every model, 3 seeds, cold start) and the
# RecBole side by side on ml-100k (3 seeds a side), each run stored as it ends and brought back in $OUT.
#
#   bash benchmarks/device_study.sh prepare       # here: .device/ (prepared data, text embeddings, wheels; ~45 MB)
#   device run: command "bash benchmarks/device_study.sh run", carry [".device"], timeout_s 600
#   bash benchmarks/device_study.sh unpack DIR    # here: DIR is the reply's files_at; then commit the new runs
#
# A second `run` (after `unpack`, so the finished runs travel) trains only what is still missing. The device has no
# network: the data travels prepared, with its text embeddings in one file (no encoder there), and the packages its
# image lacks travel as wheels. Tables are rebuilt here from the stored runs with the study's command (README:
# Quality), which then trains nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE_DIR=.device
PY=${PY:-python3}
BUDGET=${BUDGET:-500}  # seconds of training in one `run` call before the runs still going are stopped
AMAZON=../shared/datasets/amazon-games
ML100K=../shared/datasets/ml-100k
STUDY=(--dataset "$AMAZON" --seeds 3 --grid none --batch-size 512 --epochs 40)
# the device image has torch, numpy, pyarrow, matplotlib, tensorboard, tabulate, psutil; these travel as wheels
M2REC_WHEELS=(pandas==2.3.3 pytz tzdata annotated-types)
RECBOLE_WHEELS=(recbole==1.2.1 colorlog==4.7.2 colorama==0.4.4 thop texttable)

prepare() {
    rm -rf "$DEVICE_DIR" && mkdir -p "$DEVICE_DIR/data" "$DEVICE_DIR/wheels"
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quality.py --dataset "$AMAZON" --prepare-only
    cp -r benchmarks/.cache/data/amazon-games "$DEVICE_DIR/data/"
    cp -r "$ML100K" "$DEVICE_DIR/ml-100k"
    for group in m2rec recbole; do
        local wanted="${group^^}_WHEELS[@]"
        .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$DEVICE_DIR/wheels/$group" "${!wanted}"
    done
    du -sh "$DEVICE_DIR"
}

run() {
    : "${OUT:?run this on the device machine, where OUT is set}"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$DEVICE_DIR"/wheels/m2rec/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    mkdir -p benchmarks/.cache/data && cp -r "$DEVICE_DIR"/data/. benchmarks/.cache/data/
    nvidia-smi -L > "$OUT/device.txt" 2>&1 || true
    for seed in 42 43 44; do  # the side by side beside the study, two CPU threads a run; stored runs are skipped,
        for side in recbole m2rec; do  # and a RecBole run continues from its committed progress, pausing in time
            OMP_NUM_THREADS=2 timeout "$BUDGET" $PY benchmarks/recbole_side_by_side.py --only "$side" \
                --seed "$seed" --seeds 1 --device cuda --wheels "$DEVICE_DIR/wheels/recbole" \
                --time-budget "$((BUDGET * 4 / 5))" --dataset "$DEVICE_DIR/ml-100k" >> "$OUT/recbole.log" 2>&1 &
        done
    done
    {  # one open log for the study, its workers and the note (a second opening would overwrite lines)
        timeout "$BUDGET" $PY benchmarks/quality.py "${STUDY[@]}" --jobs 8 --output /tmp/quality_device.json ||
            echo "quality.py stopped (exit $?); the runs that ended are stored"
    } > "$OUT/quality.log" 2>&1
    wait || true
    tar -czf "$OUT/quality_runs.tar.gz" -C benchmarks/results quality_runs/amazon-games
    cp benchmarks/results/recbole_side_by_side.json "$OUT/" 2>/dev/null || true
    mkdir -p benchmarks/results/recbole_progress  # the unfinished RecBole runs, as they stand now
    tar -czf "$OUT/recbole_progress.tar.gz" -C benchmarks/results recbole_progress
    ls -la "$OUT"
}

unpack() {
    local from=${1:?give the folder where the device run put its files (files_at)}
    tar -xzf "$from/quality_runs.tar.gz" -C benchmarks/results --skip-old-files
    if [ -f "$from/recbole_side_by_side.json" ]; then cp "$from/recbole_side_by_side.json" benchmarks/results/; fi
    if [ -f "$from/recbole_progress.tar.gz" ]; then  # the device carried the committed progress further
        rm -rf benchmarks/results/recbole_progress
        tar -xzf "$from/recbole_progress.tar.gz" -C benchmarks/results
    fi
    git status --short benchmarks/results
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    unpack) unpack "${2:-}" ;;
    *) echo "usage: $0 prepare | run | unpack DIR" >&2; exit 2 ;;
esac
