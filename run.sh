#!/usr/bin/env bash
# Batch runs: SD-LoRA and Gumbel CL-LoRA on CIFAR-100 over seeds 1993-1997.
# Extra arguments are passed to every run as overrides, e.g.  bash run.sh --data_path /data/cifar100
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
for cfg in exps/sdlora_c100.json exps/gumbel_c100.json; do
  for seed in 1993 1994 1995 1996 1997; do
    echo "=== $cfg seed $seed"
    "$PY" main.py --config="$cfg" --seed "$seed" "$@"
  done
done
