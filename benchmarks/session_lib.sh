# Sourced (not run) by the GPU session scripts: the part every one of them starts with. The caller sets BUDGET (the
# wall time the whole script must fit, in seconds) and OUT (the results folder) first; this file makes OUT absolute,
# opens a scratch folder WORK and the log LOG, picks PY, and defines `left` (seconds of the budget left) and `step`
# (a timestamped line on stdout and in the log). SMOKE=1 asks the caller for toy sizes on the CPU.
set -u
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
LOG=$OUT/log.txt
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
left() { echo $((BUDGET - SECONDS)); }
step() { echo "== [${SECONDS}s, $(left)s left] $*" | tee -a "$LOG"; }
