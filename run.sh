#!/usr/bin/env bash
# Batch runs: each mode is a sweep file, exps/sweeps/MODE.json (its rows, seeds and variables; the default batch is
# exps/sweeps/default.json), run by python -m utils.sweep (docs/sweeps.md). Every row is checked before any starts;
# each row's state is read from its run folder: a finished row is not run again, a stopped one is resumed
# (main.py --resume), a row that forks a parent at task K waits for the parent's task K. Running the same command
# again finishes a batch.
#   bash run.sh [MODE] [--key value ...]
#     (none)          sdlora_c100 and schedule_c100, seeds 1993-1997
#     quick           the protocol check (11 rows) on PROTOCOL (default quick)
#     offline | scan  the growth table and every growth variant (docs/growth.md)
#     curve | shifted schedules at 2-5 adapters against the rules, plain and shifted (SHIFT) streams
#     inflora | baselines | inflora_causes | need | subspace    the tables of docs/inflora.md, baselines.md,
#                     growth.md and sublora.md
#     long            the long-stream table (issue 42) on PROTOCOL quick_50 (50 tasks of 2) or quick_20 (20 of 5)
#   Each file's "description" says what it runs; python -m utils.sweep MODE --executor dry lists its runs.
# Environment:
#   JOBS            runs at once (default 1; one thread each when more, one GPU each where GPUs are found)
#   ONLY=REGEX      only the runs whose name (ROW_SEED) matches, e.g. ONLY=holdout bash run.sh scan
#   LOG_DIR         (default logs) LOG_DIR/ROW_SEED/ holds a run's folder, LOG_DIR/ROW_SEED.out its output
#   EXECUTOR        local (default), dry (print the commands), or slurm (jobs through submitit: pip install -e
#                   ".[cluster]"; SLURM_ARGS="--slurm partition=gpu --slurm time=240" adds resources)
#   PYTHON          the interpreter (default python); PROGRESS_EVERY seconds between progress lines (60)
#   and the variables a mode's file declares ("vars"): SEEDS, SHARED (where the npz and weights are), PROTOCOL,
#   FORK, SEEDS_CURVE, DRIFTS, SHIFT, NEEDS, FITS, NOVELTIES, SHARES, KINDS, REOPEN, SINGLE_SEED_ROWS, SEED, SPLIT_LR.
# Extra arguments are overrides given to every new run, e.g. bash run.sh --data_path /data/cifar100
# At the end: python main.py --report over every finished run, saved in LOG_DIR/report_<time>/.
set -euo pipefail
cd "$(dirname "$0")"
MODES=""
for f in exps/sweeps/*.json; do m=${f##*/}; m=${m%.json}; [ "$m" = default ] || MODES+="${MODES:+ }$m"; done
MODE=default
if [ -n "${1:-}" ] && [[ "$1" != --* ]]; then  # a typo is not a default batch
  if [[ " $MODES " != *" $1 "* ]]; then
    echo "error: run.sh: unknown mode '$1'; modes: $MODES (none: the default batch); overrides are written --key value" >&2
    exit 2
  fi
  MODE=$1; shift
fi
if [ "${RERUN:-0}" = 1 ]; then  # a row's state is its run folder now, not its console log
  echo "error: run.sh: RERUN=1 is gone: a finished row is found by its run folder; to start rows afresh use another LOG_DIR or move LOG_DIR/ROW_SEED/ away" >&2
  exit 2
fi
for v in STREAMS PLACEMENTS EVENS REFS DIMS STALE_S; do  # read by the old run.sh: ignoring them would start other rows
  if [ -n "${!v+x}" ]; then
    echo "error: run.sh: $v is no longer read (the rows are exps/sweeps/$MODE.json; docs/sweeps.md says what replaces it); unset it and pick rows with ONLY" >&2
    exit 2
  fi
done
if [ "$MODE" = quick ] && [ "${PROTOCOL:-quick}" != quick ]; then export TAG="${PROTOCOL}_"; fi  # rows offline_sdlora_1993, ...
PY=${PYTHON:-python}
# shellcheck disable=SC2086  # SLURM_ARGS is a list of options
exec "$PY" -m utils.sweep "exps/sweeps/$MODE.json" --env --executor "${EXECUTOR:-local}" ${JOBS:+--jobs "$JOBS"} \
  --only "${ONLY:-.}" --log_dir "${LOG_DIR:-logs}" --python "$PY" --progress_every "${PROGRESS_EVERY:-60}" \
  ${SLURM_ARGS:-} "$@"
