#!/usr/bin/env bash
# The style benchmark (train/configs/style_cpu_shufflenetv2*.yaml) at a GPU budget in one command: bigger crops and
# more iterations than the CPU design, 3 paired seeds of arms P (plain), I (InstanceNorm layers only) and F (all
# four losses), all warm-started from one plain one-view trunk, every run scored on the report split (val) and the
# selection split (select).
#
#   OUT=outputs/evidence_gpu bash benchmarks/evidence_gpu.sh [BUDGET_S]
#
# Run it from the repository root on a machine with one CUDA GPU. BUDGET_S (default 480) is the wall time the whole
# script must fit: every step runs under `timeout`, three runs share the GPU at a time. Results land in $OUT: log.txt
# and runs.tgz (every run's small files and float16 weights; the summary tables). SMOKE=1 runs the same steps at toy
# sizes on the CPU (checks the script itself).
BUDGET=${1:-480}
OUT=${OUT:-outputs/evidence_gpu}
# shellcheck source=benchmarks/session_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/session_lib.sh"

if [ "$SMOKE" = 1 ]; then
    DEV=cpu; CROP="[64, 128]"; BATCH=2; WARM_ITERS=2; ITERS=2; SCENES=6; VAL=2; SIZE="[64, 128]"; WORKERS=0; THREADS=1
else
    DEV=cuda; CROP="[256, 512]"; BATCH=16; WARM_ITERS=400; ITERS=600; SCENES=500; VAL=50; SIZE="[256, 512]"; WORKERS=4
    THREADS=4
fi
ROOT=$WORK/data/style
SEEDS="1 2 3"
# 3x as many cells at layer 4 as the CPU design's 128x256 crops (16x32 = 512 of the original's 2304): 50 * 512 / 2304.
CWCL_MIN=11
[ "$SMOKE" = 1 ] && CWCL_MIN=1
COMMON=(--set "data.crop_size=$CROP" --set optim.batch_size=$BATCH --set runtime.device=$DEV
    --set runtime.threads=$THREADS --set data.num_workers=$WORKERS --set eval.num_workers=$WORKERS
    --set runtime.ckpt_interval=100000 --set runtime.progress=false --set runtime.log_interval=50
    --set data.synthetic.train_scenes=$SCENES --set data.synthetic.val_scenes=$VAL
    --set "data.synthetic.height=$(echo "$SIZE" | tr -d '[],' | cut -d' ' -f1)"
    --set "data.synthetic.width=$(echo "$SIZE" | tr -d '[],' | cut -d' ' -f2)"
    --set "data.train=[{dataset: aligned, root: '$ROOT', split: train, options: {appearances: [noon, sunset]}}]")
# Every evaluation target of the report (val) and selection (select) presets, moved to this script's data folder.
TARGETS=$($PY -c "
from blindnet.train.config import load_config
ts = [t for p in ('style_cpu_shufflenetv2', 'style_cpu_shufflenetv2_select') for t in load_config(p, []).eval.targets]
print('[' + ', '.join('{dataset: aligned, root: \'$ROOT\', split: %s, name: \'%s\', options: {appearance: %s}}' % (t.split, t.label, t.options['appearance']) for t in ts) + ']')")

step "setup"
{ nvidia-smi -L 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"; } \
    >>"$LOG" 2>&1

# 1. The warm start (plain, one view): its encoder initialises every arm.
step "warm start, $WARM_ITERS iterations"
timeout $(($(left) - 60)) $PY -m blindnet.train --config style_warmstart_shufflenetv2 --out "$WORK/runs/warmstart" \
    "${COMMON[@]}" --set "eval.targets=$TARGETS" --set optim.max_iter=$WARM_ITERS >>"$LOG" 2>&1
echo "   rc=$?" | tee -a "$LOG"

# 2. Arms P, I, F for each seed, three runs at a time on the one GPU (a ShuffleNetV2 step leaves most of it idle).
for seed in $SEEDS; do
    step "seed $seed: P, I, F, $ITERS iterations"
    pids=()
    for arm in plain in f; do
        preset=style_cpu_shufflenetv2
        [ "$arm" != f ] && preset=${preset}_$arm
        timeout $(($(left) - 20)) $PY -m blindnet.train --config "$preset" --out "$WORK/runs/${arm}_s$seed" \
            "${COMMON[@]}" --set "eval.targets=$TARGETS" --set optim.max_iter=$ITERS --set eval.interval=$((ITERS / 3)) \
            --set "init.checkpoint=$WORK/runs/warmstart/model.safetensors" --set loss.cwcl_min_pixels=$CWCL_MIN \
            --set data.seed=$seed --set runtime.seed=$seed >"$WORK/${arm}_s$seed.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; echo "   rc=$?" | tee -a "$LOG"; done
done

# 3. Keep the small files and float16 weights; the runs' own eval.csv rows hold every score.
$PY -c "import sys, pathlib; from blindnet.checkpoint import load_model, save_model
for f in pathlib.Path(sys.argv[1]).glob('*/model.safetensors'): save_model(load_model(f), f, half=True)" \
    "$WORK/runs" >>"$LOG" 2>&1
rm -rf "$WORK"/runs/*/checkpoints "$WORK"/runs/*/tensorboard
cp "$WORK"/*.log "$WORK/runs/" 2>/dev/null
tar czf "$OUT/runs.tgz" -C "$WORK" runs
step "done: $(ls -d "$WORK"/runs/*_s*/ 2>/dev/null | wc -l) arm runs"
