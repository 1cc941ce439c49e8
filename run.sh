#!/usr/bin/env bash
# Batch runs.
#   bash run.sh [--key value ...]           SD-LoRA and the shipped growth default (exps/gumbel_c100.json: adapters
#                                           at tasks 0, 3, 6, reuse between; docs/growth.md) on CIFAR-100 (published
#                                           setup), seeds 1993-1997
#   bash run.sh offline [--key value ...]   the growth table on the offline protocol (../shared CIFAR-100
#                                           npz and ViT-S/14, img 112, 10 tasks, 50 train / 20 test images per class,
#                                           5 epochs, batch 32): every method and variant of the table
#   bash run.sh inflora [--key value ...]   InfLoRA beside SD-LoRA on the offline protocol (10 tasks, SEEDS): its own
#                                           setup, Adam at 2e-3 constant, and the head-only floor (linear_probe)
#   bash run.sh inflora_causes [...]        InfLoRA rows that change one thing each (input normalisation, the plain
#                                           spectrum, a centred covariance, A's scale, the rate) on PROTOCOL (default
#                                           quick_unnormalised), SEEDS
#   bash run.sh need [--key value ...]      growth on need: SD-LoRA, the Gumbel rule, need_threshold at NEEDS (gain)
#                                           and FITS (need_signal fit), novelty_threshold at NOVELTIES (alone and
#                                           with max_share at each of SHARES; REFS "latest nearest": against
#                                           the latest adapter's tasks or the nearest adapter's; nearest_reopen:
#                                           reopening the nearest adapter too), the evenly
#                                           spaced schedules with 2-5 adapters (reuse), and on shifted streams the
#                                           oracle schedule, on PROTOCOL (default quick_unnormalised), SEEDS; STREAMS
#                                           "plain shifted", KINDS "grey_invert patch_shuffle", PLACEMENTS "3,4,8 2,5,7 1,6,9"
#   bash run.sh baselines [--key value ...] SD-LoRA, seq_lora and lora_task_id on the first 5 tasks of that protocol
#   bash run.sh subspace [--key value ...]  the SubLoRA grid on the first 5 tasks of that protocol: intrinsic_dim
#                                           DIMS (default 1000 2000 5000) x allocation uniform (and with SD-LoRA's
#                                           normalisation at subspace_lr 0.1) / fixed 0.8 (the shipped config), 0.5, 0.2
#                                           / learned with split_lr SPLIT_LR (10), subspace_lr 0.4 / 0.3 / 0.2 at d =
#                                           1000 / 2000 / 5000, with SD-LoRA's full rank-10 LoRA beside it (seed SEED,
#                                           default 1993)
#   bash run.sh curve [--key value ...]     the growth trade curve on that protocol: SD-LoRA, fixed schedules with
#                                           reuse at 2-5 adapters, the Gumbel rule, growth on drift (DRIFTS), over
#                                           SEEDS_CURVE (default "1993 1994 1995"); --report draws A vs adapters
#   bash run.sh shifted [--key value ...]   the same rows on a stream whose tasks SHIFT (default [3,4,8]) are shown
#                                           greyscale and inverted (shift_tasks); curve and shifted with FORK=1 train
#                                           SD-LoRA's task 0 once: the schedule and drift rows fork its run at task 1
#   bash run.sh quick [--key value ...]     the protocol check: SD-LoRA, the Gumbel rule, growth on drift (0.3), the
#                                           schedules [0,3,6] and [0,2,4,6,8] with reuse, seq_lora, the head-only
#                                           floor, InfLoRA (Adam 2e-3), SimpleCIL, RanPAC (and with first-session adaptation) on
#                                           exps/protocols/$PROTOCOL.json (default
#                                           quick; PROTOCOL=offline gives the same rows on the offline protocol)
#   bash run.sh scan [--key value ...]      the growth-rule scan on the offline protocol: gumbel_rule_c100.json with
#                                           other warm-up / selection lengths and growth costs
# SEEDS (default "1993 1994") are the seeds of the SD-LoRA and chosen-rule rows (offline) and of every scan row;
# ONLY=REGEX starts only the runs whose name matches (e.g. ONLY=holdout bash run.sh scan);
# SINGLE_SEED_ROWS=0 skips the offline rows that run on seed 1993 alone;
# SHARED (default ../shared) is where the npz and the weights are read from.
# Extra arguments are passed to every run as overrides, e.g.  bash run.sh --data_path /data/cifar100
# JOBS=2 runs two at a time with one thread each (on 2 CPU cores that is ~1.3x the throughput of one run
# on both cores); LOG_DIR (default logs) is where the run folders and the console logs go.
# At the end: python main.py --report over every run it started (figures, a table, mean +- std over seeds),
# printed and saved in LOG_DIR/report_<time>/ (runs.md, summary.md, summary.csv, comparison.png).
set -euo pipefail
cd "$(dirname "$0")"
MODES="quick offline inflora inflora_causes need baselines subspace curve shifted scan"
if [ -n "${1:-}" ] && [[ "$1" != --* ]] && [[ " $MODES " != *" $1 "* ]]; then  # a typo is not a default batch
  echo "error: run.sh: unknown mode '$1'; modes: $MODES (none: the default batch); overrides are written --key value" >&2
  exit 2
fi
PY=${PYTHON:-python}
JOBS=${JOBS:-1}
ONLY=${ONLY:-.}   # a regular expression: only the runs whose name matches it
LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"

OUTS=()
declare -A STARTED=()
PROGRESS_EVERY=${PROGRESS_EVERY:-60}  # seconds between progress lines while runs are in the background
progress() {  # one line per background run still going: its task and the seconds since it started
  local f name task
  for f in "${OUTS[@]}"; do
    name=$(basename "$f" .out)
    grep -q -E "^error:|Done:|all [0-9]+ tasks are already done" "$f" 2>/dev/null && continue
    task=$(grep -o "(task [0-9]*/[0-9]*)" "$f" 2>/dev/null | tail -n 1 | tr -d '()')
    echo "... $name: ${task:-starting}, $((SECONDS - STARTED[$name])) s"
  done
}
wait_below() {  # wait until fewer than $1 background runs are going, with a progress line every PROGRESS_EVERY s
  local last=$SECONDS
  while [ "$(jobs -rp | wc -l)" -ge "$1" ]; do
    sleep 2
    if [ $((SECONDS - last)) -ge "$PROGRESS_EVERY" ]; then progress; last=$SECONDS; fi
  done
}
run() {  # run NAME ARGS...: one main.py run, its console output in $LOG_DIR/NAME.out
  # A row whose console log says it finished is not run again, and one that stopped part-way (killed, machine
  # gone) is resumed from its last saved task (main.py --resume): rerunning a batch finishes it. RERUN=1 starts
  # every row afresh.
  local name=$1 out="$LOG_DIR/$1.out" d=""; shift
  [[ $name =~ $ONLY ]] || return 0
  OUTS+=("$out")
  STARTED[$name]=$SECONDS
  local args=("$@" --log_dir "$LOG_DIR") mode=">"
  if [ "${RERUN:-0}" != 1 ] && [ -f "$out" ]; then
    if grep -q -E "Done:|all [0-9]+ tasks are already done" "$out"; then
      echo "=== $name: finished before ($out), not run again (RERUN=1 reruns it)"; return 0
    fi
    d=$(grep -m1 -o "Run folder: [^,]*" "$out" | sed 's/^Run folder: //') || true
    if [ -n "$d" ] && [ -f "$d/config.json" ] && ! grep -q "^error:" "$out"; then
      args=(--resume "$d"); mode=">>"
    fi
  fi
  echo "=== $name: $PY main.py ${args[*]}"
  if [ "$JOBS" -gt 1 ]; then
    if [ "$mode" = ">>" ]; then
      OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" main.py "${args[@]}" >> "$out" 2>&1 &
    else
      OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" main.py "${args[@]}" > "$out" 2>&1 &
    fi
    wait_below "$JOBS"
  elif [ "$mode" = ">>" ]; then
    "$PY" main.py "${args[@]}" 2>&1 | tee -a "$out"
  else
    "$PY" main.py "${args[@]}" 2>&1 | tee "$out"
  fi
}

summarize() {  # the report over the run folders named in the console logs (runs that finished a task)
  local dirs=() d f
  for f in "${OUTS[@]}"; do
    d=$(grep -m1 -o "Run folder: [^,]*" "$f" 2>/dev/null | sed 's/^Run folder: //') || true
    if [ -n "$d" ] && grep -q '"til_A"' "$d/metrics.json" 2>/dev/null; then
      echo "(task-incremental run, til_* metrics, not in the report: $d)"
    elif [ -n "$d" ] && [ -f "$d/metrics.json" ]; then dirs+=("$d"); else echo "(no finished task in $f)"; fi
  done
  if [ ${#dirs[@]} -gt 0 ]; then
    "$PY" main.py --report "${dirs[@]}" --report_out "$LOG_DIR/report_$(date +%Y%m%d-%H%M%S)"
  fi
}

after_task() {  # after_task LOG K: the run folder of console log LOG once its tasks 0..K-1 are saved (waits for them)
  local d n
  while :; do
    d=$(grep -m1 -o "Run folder: [^,]*" "$1" 2>/dev/null | sed 's/^Run folder: //') || true
    n=0
    if [ -n "$d" ] && [ -f "$d/metrics.json" ]; then
      n=$("$PY" -c 'import json, sys; print(len(json.load(open(sys.argv[1])).get("A", [])))' "$d/metrics.json")
    fi
    if [ "$n" -ge "$2" ]; then echo "$d"; return 0; fi
    # the parent stopped short (an error, or it ended), or its console log has been silent for STALE_S (1800) s
    if grep -q -E "^error:|Done:|already done" "$1" 2>/dev/null || [ ! -f "$1" ] ||
       [ $(($(date +%s) - $(stat -c %Y "$1"))) -gt "${STALE_S:-1800}" ]; then
      echo "run.sh: $1 has no finished task $(($2 - 1)) to fork from" >&2; return 1
    fi
    sleep 5
  done
}
after_task0() { after_task "$1" 1; }

SEEDS=${SEEDS:-1993 1994}
SHARED=${SHARED:-../shared}
P=(--protocol exps/protocols/offline_unnormalised.json --data_path "$SHARED/data/cifar100/cifar100.npz"
   --pretrained_path "$SHARED/weights/vit_small_patch14_dinov2.imgfocus.fp16.safetensors")  # the protocol of docs/' tables (unnormalised) on the files in SHARED

if [ "${1:-}" = "quick" ]; then
  # the protocol check (docs/protocols.md): the rows on PROTOCOL (default quick: exps/protocols/quick.json; PROTOCOL=offline
  # runs the same rows on the offline protocol; the validation table used quick_unnormalised / offline_unnormalised), SEEDS
  shift
  PROTO=${PROTOCOL:-quick}
  Q=(--protocol "exps/protocols/$PROTO.json" --data_path "$SHARED/data/cifar100/cifar100.npz"
     --pretrained_path "$SHARED/weights/vit_small_patch14_dinov2.imgfocus.fp16.safetensors")
  tag=$([ "$PROTO" = quick ] && echo "" || echo "${PROTO}_")
  for seed in $SEEDS; do
    row() { local name=$1; shift; run "${tag}${name}_$seed" "$@" "${Q[@]}" --prefix "${PROTO}_$name" --seed "$seed" "${EXTRA[@]}"; }
    EXTRA=("$@")
    row sdlora --config=exps/sdlora_c100.json
    row gumbel --config=exps/gumbel_rule_c100.json
    row drift0.3 --config=exps/sdlora_c100.json --skip_mode reuse --drift_threshold 0.3
    row sched036 --config=exps/sdlora_c100.json --growth_schedule "[0,3,6]" --skip_mode reuse
    row sched02468 --config=exps/sdlora_c100.json --growth_schedule "[0,2,4,6,8]" --skip_mode reuse
    row seq_lora --config=exps/seq_lora_c100.json
    row linear_probe --config=exps/linear_probe_c100.json
    row inflora_lr2e-3 --config=exps/inflora_c100.json --shuffle true --lrate 0.002 --scheduler constant
    row simplecil --config=exps/simplecil_c100.json   # the training-free peers: prototypes, and RanPAC (M 10,000)
    row ranpac --config=exps/ranpac_c100.json
    row ranpac_fsa --config=exps/ranpac_c100.json --first_session_adapt true   # with one adapter trained on task 0
  done
  wait_below 1; wait
  summarize
  exit 0
fi

if [ "${1:-}" = "scan" ]; then
  shift
  G=(--config=exps/gumbel_rule_c100.json "${P[@]}")
  for seed in $SEEDS; do   # name: w = warm-up fraction, p = selection (phase 1) fraction, c = growth cost
    run "scan_w8_c02_$seed"    "${G[@]}" --growth_cost 0.02 --prefix scan_w8_c02 --seed $seed "$@"
    run "scan_w8_c04_$seed"    "${G[@]}" --growth_cost 0.04 --prefix scan_w8_c04 --seed $seed "$@"
    run "scan_w8_c12_$seed"    "${G[@]}" --growth_cost 0.12 --prefix scan_w8_c12 --seed $seed "$@"
    run "scan_w6_c04_$seed"    "${G[@]}" --warmup_fraction 0.6 --growth_cost 0.04 --prefix scan_w6_c04 --seed $seed "$@"
    run "scan_w6_c08_$seed"    "${G[@]}" --warmup_fraction 0.6 --prefix scan_w6_c08 --seed $seed "$@"
    run "scan_w6_c12_$seed"    "${G[@]}" --warmup_fraction 0.6 --growth_cost 0.12 --prefix scan_w6_c12 --seed $seed "$@"
    run "scan_w4_c08_$seed"    "${G[@]}" --warmup_fraction 0.4 --prefix scan_w4_c08 --seed $seed "$@"
    run "scan_w6p4_c04_$seed"  "${G[@]}" --warmup_fraction 0.6 --phase1_fraction 0.4 --growth_cost 0.04 \
                               --prefix scan_w6p4_c04 --seed $seed "$@"
    run "scan_w6p4_c08_$seed"  "${G[@]}" --warmup_fraction 0.6 --phase1_fraction 0.4 --prefix scan_w6p4_c08 \
                               --seed $seed "$@"
    # reuse: a pruned new adapter's task trains the latest kept adapter in phase 2 (skip_mode reuse)
    for wc in "2 04" "2 08" "4 04" "4 06" "4 08" "4 12" "6 04" "6 06" "6 08" "6 12"; do w=${wc% *}; c=${wc#* }
      run "scan_reuse_w${w}_c${c}_$seed" "${G[@]}" --skip_mode reuse --warmup_fraction 0.$w --growth_cost 0.$c \
          --prefix "scan_reuse_w${w}_c${c}" --seed $seed "$@"
    done
    # share: as reuse, growth_cost divided by the number of tasks the adapter a skip would reopen serves
    for wc in "4 06" "4 08" "4 12" "4 16" "6 08" "6 12"; do w=${wc% *}; c=${wc#* }
      run "scan_share_w${w}_c${c}_$seed" "${G[@]}" --skip_mode reuse --cost_by_share true --warmup_fraction 0.$w \
          --growth_cost 0.$c --prefix "scan_share_w${w}_c${c}" --seed $seed "$@"
    done
    # retrain: after the decision the task restarts from its start state and trains the chosen structure
    for rswc in "skip share 2 08" "skip share 2 12" "skip share 4 08" "skip share 4 12" "all share 2 08" \
                "all share 2 12" "skip plain 2 08" "skip plain 4 08"; do
      read -r r sh w c <<< "$rswc"
      share=$([ "$sh" = share ] && echo true || echo false)
      run "scan_retrain_${r}_${sh}_w${w}_c${c}_$seed" "${G[@]}" --skip_mode reuse --retrain $r --cost_by_share $share \
          --warmup_fraction 0.$w --growth_cost 0.$c --prefix "scan_retrain_${r}_${sh}_w${w}_c${c}" --seed $seed "$@"
    done
    # fixed growth schedules (SD-LoRA, no gate): the baseline any conditional rule has to beat
    for sm in "0,1,2,3,4,5 none" "0,1,2,3,4,5 reuse" "0,1,3,5,7,9 none" "0,1,3,5,7,9 reuse" "0,2,4,6,8 none" "0,2,4,6,8 reuse" \
              "0,3,6,9 reuse" "0 reuse"; do
      sched=${sm% *}; mode=${sm#* }; tag=$(echo "$sched" | tr -d ,)
      run "sched_${tag}_${mode}_$seed" --config=exps/sdlora_c100.json "${P[@]}" --growth_schedule "[$sched]" \
          --skip_mode $mode --prefix "sched_${tag}_${mode}" --seed $seed "$@"
    done
    # h = selection_holdout: phase 1 judges on that share of the images, kept out of the warm-up
    for w in 6 8; do for c in 04 08 12 20; do
      run "scan_holdout_h2_w${w}_c${c}_$seed" "${G[@]}" --selection_holdout 0.2 --warmup_fraction 0.$w \
          --growth_cost 0.$c --prefix "scan_holdout_h2_w${w}_c${c}" --seed $seed "$@"
    done; done
  done
  wait_below 1; wait
  summarize
  exit 0
fi

if [ "${1:-}" = "curve" ] || [ "${1:-}" = "shifted" ]; then
  # the growth trade curve (issue: growth that earns its place). Per seed: SD-LoRA; fixed schedules with reuse at
  # 2, 3, 4 and 5 adapters, evenly spaced (floor(i * 10 / k)); the Gumbel rule (gumbel_rule_c100.json); growth on drift
  # at DRIFTS thresholds. "shifted": the same rows on the stream whose tasks SHIFT (default [3,4,8]) are
  # greyscale and inverted.
  mode=$1; shift
  SEEDS=${SEEDS_CURVE:-1993 1994 1995}
  DRIFTS=${DRIFTS:-0.1 0.2}
  X=()
  tag=$mode
  if [ "$mode" = shifted ]; then SHIFT=${SHIFT:-[3,4,8]}; X=(--shift_tasks "$SHIFT"); tag="shifted$(echo "$SHIFT" | tr -d '[], ')"; fi
  for seed in $SEEDS; do
    run "${tag}_sdlora_$seed" --config=exps/sdlora_c100.json "${P[@]}" "${X[@]}" --prefix "${tag}_sdlora" --seed $seed "$@"
    # the schedules' and the drift rule's task 0 is SD-LoRA's: FORK=1 trains it once and forks the SD-LoRA run at
    # task 1 (bit for bit the same runs: tests/test_fork.py), waiting for its task 0 when it runs in the background
    S=(--config=exps/sdlora_c100.json "${P[@]}" "${X[@]}")
    if [ "${FORK:-0}" = 1 ] && [[ "${tag}_sdlora_$seed" =~ $ONLY ]]; then
      S=(--fork_from "$(after_task0 "$LOG_DIR/${tag}_sdlora_$seed.out")" --fork_task 1)
    fi
    for sched in "0,5" "0,3,6" "0,2,5,7" "0,2,4,6,8"; do
      st=$(echo "$sched" | tr -d ,)
      run "${tag}_sched${st}_$seed" "${S[@]}" --growth_schedule "[$sched]" --skip_mode reuse --prefix "${tag}_sched${st}" \
          --seed $seed "$@"
    done
    run "${tag}_gumbel_$seed" --config=exps/gumbel_rule_c100.json "${P[@]}" "${X[@]}" --prefix "${tag}_gumbel" --seed $seed "$@"
    for th in $DRIFTS; do
      run "${tag}_drift${th}_$seed" "${S[@]}" --skip_mode reuse --drift_threshold "$th" --prefix "${tag}_drift${th}" \
          --seed $seed "$@"
    done
  done
  wait_below 1; wait
  summarize
  exit 0
fi

if [ "${1:-}" = "subspace" ]; then  # SubLoRA (exps/sublora_c100.json) on the first 5 tasks of the protocol
  shift
  S=(--config=exps/sublora_c100.json "${P[@]}" --max_tasks 5 --seed "${SEED:-1993}")
  run sdlora_5tasks --config=exps/sdlora_c100.json "${P[@]}" --max_tasks 5 --seed "${SEED:-1993}" --prefix sdlora_5tasks "$@"
  for d in ${DIMS:-1000 2000 5000}; do
    # the rate for z at budget d: 0.3 sqrt(2000 / d), to one decimal (0.4, 0.3, 0.2 at d = 1000, 2000, 5000; each beat
    # 0.3 where it differs, README): a step on z moves the factors by ~ lr sqrt(d / n) |gradient|, the same at every d
    R=(--subspace_lr "$(awk -v d="$d" 'BEGIN { printf "%.1f", 0.3 * sqrt(2000 / d) }')")
    # uniform at that rate and the shipped normalisation (none), and as the first grid ran it
    # (SD-LoRA's normalise-at-freeze, subspace_lr 0.1); allocation_ratio back to its default, which uniform needs
    U=(--allocation_mode uniform --allocation_ratio 0.5)
    run "sublora_d${d}_uniform" "${S[@]}" --intrinsic_dim $d "${R[@]}" "${U[@]}" --prefix "sublora_d${d}_uniform" "$@"
    run "sublora_d${d}_uniform_sdnorm" "${S[@]}" --intrinsic_dim $d "${U[@]}" --subspace_norm direction_norm \
        --subspace_lr 0.1 --prefix "sublora_d${d}_uniform_sdnorm" "$@"
    for r in 80 50 20; do   # allocation_ratio = d_B / d (0.8: the notes' "B-heavy", the shipped setting)
      run "sublora_d${d}_fixed$r" "${S[@]}" --intrinsic_dim $d "${R[@]}" --allocation_mode fixed --allocation_ratio 0.$r \
          --prefix "sublora_d${d}_fixed$r" "$@"
    done
    # the learned split with a rate of its own (SPLIT_LR)
    run "sublora_d${d}_learned_slr" "${S[@]}" --intrinsic_dim $d "${R[@]}" --allocation_mode learned --allocation_ratio 0.5 \
        --split_lr "${SPLIT_LR:-10}" --prefix "sublora_d${d}_learned_slr" "$@"
  done
  wait_below 1; wait
  summarize
  exit 0
fi

if [ "${1:-}" = "inflora" ]; then  # InfLoRA beside SD-LoRA on the offline protocol (10 tasks), SEEDS
  shift
  for seed in $SEEDS; do
    run "sdlora_$seed" --config=exps/sdlora_c100.json "${P[@]}" --prefix sdlora --seed $seed "$@"
    # InfLoRA's own setup (Adam 5e-4, coda_cosine, k/v, crop scale 0.08) on the same classes and order
    run "inflora_$seed" --config=exps/inflora_c100.json "${P[@]}" --shuffle true --prefix inflora --seed $seed "$@"
    # the same InfLoRA with Adam at a rate for the protocol's 80 steps per task (2e-3, constant; SGD at 8e-3
    # diverges: InfLoRA's A sends ~10x more of the input through than a LoRA init), and the head-only floor
    run "inflora_lr2e-3_$seed" --config=exps/inflora_c100.json "${P[@]}" --shuffle true --lrate 0.002 \
        --scheduler constant --prefix inflora_lr2e-3 --seed $seed "$@"
    run "linear_probe_$seed" --config=exps/linear_probe_c100.json "${P[@]}" --prefix linear_probe --seed $seed "$@"
    # the setting a careful user would pick on this backbone (docs/inflora.md): A at 0.12 x U, Adam 2e-3 constant
    # (the protocol sets normalize: false here, as for every row of the table)
    run "inflora_tuned_$seed" --config=exps/inflora_tuned_c100.json "${P[@]}" --shuffle true --prefix inflora_tuned \
        --seed $seed "$@"
  done
  wait_below 1; wait
  summarize
  exit 0
fi

if [ "${1:-}" = "inflora_causes" ]; then  # the rows that separate the causes of InfLoRA's gap (docs/inflora.md)
  # on exps/protocols/$PROTOCOL.json (default quick_unnormalised), SEEDS; each row changes one thing of the base
  # (Adam 2e-3 constant, unnormalised input, squared spectrum, uncentred covariance, A = U / sqrt(3))
  shift
  PROTO=${PROTOCOL:-quick_unnormalised}
  Q=(--protocol "exps/protocols/$PROTO.json" --data_path "$SHARED/data/cifar100/cifar100.npz"
     --pretrained_path "$SHARED/weights/vit_small_patch14_dinov2.imgfocus.fp16.safetensors")
  for seed in $SEEDS; do
    EXTRA=("$@")
    row() { local name=$1; shift; run "${PROTO}_${name}_$seed" "$@" "${Q[@]}" --prefix "${PROTO}_$name" --seed "$seed" "${EXTRA[@]}"; }
    B=(--config=exps/inflora_c100.json --shuffle true --lrate 0.002 --scheduler constant)
    row inflora_lr2e-3 "${B[@]}"
    row inflora_norm "${B[@]}" --normalize true          # the backbone's own mean / std on the input
    row inflora_plain "${B[@]}" --inflora_energy plain   # DualGPM's threshold on the eigenvalues, not their squares
    row inflora_centre "${B[@]}" --inflora_centre true   # the covariance of centred tokens
    row inflora_ascale0.12 "${B[@]}" --inflora_a_scale 0.12   # A about the size of a LoRA init (4.4-5.9x smaller)
    row inflora_lr1e-3 "${B[@]}" --lrate 0.001
    row inflora_lr5e-3 "${B[@]}" --lrate 0.005
    row inflora_lr5e-4 "${B[@]}" --lrate 0.0005   # the published rate, constant: A's step without the head's
    row inflora_ascale0.06 "${B[@]}" --inflora_a_scale 0.06
    # what helps, together: normalised input and A's scale, and with the plain spectrum as well
    row inflora_norm_ascale0.12 "${B[@]}" --normalize true --inflora_a_scale 0.12
    row inflora_norm_ascale0.12_plain "${B[@]}" --normalize true --inflora_a_scale 0.12 --inflora_energy plain
  done
  wait_below 1; wait
  summarize
  exit 0
fi

if [ "${1:-}" = "need" ]; then  # growth on need (docs/growth.md): the rules against SD-LoRA and the schedules
  # on exps/protocols/$PROTOCOL.json (default quick_unnormalised), SEEDS; streams: unshifted CIFAR (STREAMS has
  # "plain") and, per shift kind of KINDS, the placements of PLACEMENTS; the need rule at each of NEEDS (nats).
  # FORK=1 (the default) trains each shared prefix once, bit for bit the runs from scratch (tests/test_fork.py):
  # a plain-stream rule or schedule forks SD-LoRA's run at task 1 (their task 0 is SD-LoRA's), and each row of a
  # shifted stream forks the same row of the plain stream at the stream's first shifted task (the tasks before it
  # are the plain stream's); the oracle forks the plain [0,5] schedule there. FORK=0 runs every row from scratch.
  shift
  PROTO=${PROTOCOL:-quick_unnormalised}
  STREAMS=${STREAMS:-plain shifted}
  KINDS=${KINDS:-grey_invert patch_shuffle}
  PLACEMENTS=${PLACEMENTS:-3,4,8 2,5,7 1,6,9}
  NEEDS=${NEEDS-0}
  FITS=${FITS-0.8}  # need_signal "fit": the reuse trial's held-out loss over ln(classes), 0.8 from plain CIFAR
  NOVELTIES=${NOVELTIES-0.045}  # growth on novelty (novelty_threshold), and with max_share at each of SHARES
  SHARES=${SHARES-5}
  REFS=${REFS-latest nearest}  # novelty_reference of the novelty rows (nearest_reopen: nearest, novelty_reopen nearest)
  EVENS=${EVENS-2 3 4 5}  # the evenly spaced schedules, by adapter count
  FORK=${FORK:-1}
  Q=(--protocol "exps/protocols/$PROTO.json" --data_path "$SHARED/data/cifar100/cifar100.npz"
     --pretrained_path "$SHARED/weights/vit_small_patch14_dinov2.imgfocus.fp16.safetensors")
  even() { local i out=""; for ((i = 0; i < $1; i++)); do out+="${out:+,}$((i * 10 / $1))"; done; echo "[$out]"; }  # n of 10 tasks
  rows() {  # rows TAG SHIFTED SHIFT_ARGS...: every row of one stream (SHIFTED: its shifted tasks, or "")
    local tag=$1 shifted=$2; shift 2
    local S=("$@") sd=(--config=exps/sdlora_c100.json) name k=${shifted%%,*}
    # row NAME PLAIN SHIFTED ARGS...: with FORK=1 a plain-stream row forks the plain row PLAIN at task 1, a shifted
    # stream's row forks the plain row SHIFTED at the stream's first shifted task k; "-" runs it from scratch
    row() {
      name=$1; local parent=$2 at=1 from=(); shift 2
      if [ -n "$shifted" ]; then parent=$1; at=$k; fi
      shift
      [[ "${PROTO}_${tag}_${name}_$seed" =~ $ONLY ]] || return 0
      if [ "$FORK" = 1 ] && [ "$parent" != - ]; then
        from=(--fork_from "$(after_task "$LOG_DIR/${PROTO}_plain_${parent}_$seed.out" "$at")" --fork_task "$at") || return 0  # after_task said why
      fi
      run "${PROTO}_${tag}_${name}_$seed" "${from[@]}" "$@" "${S[@]}" "${Q[@]}" \
          --prefix "${PROTO}_${tag}_$name" --seed "$seed" "${EXTRA[@]}"
    }
    row sdlora - sdlora "${sd[@]}"
    row gumbel - gumbel --config=exps/gumbel_rule_c100.json
    for t in $NEEDS; do row "need$t" sdlora "need$t" "${sd[@]}" --skip_mode reuse --need_threshold "$t"; done
    for t in $FITS; do
      row "fit$t" sdlora "fit$t" "${sd[@]}" --skip_mode reuse --need_threshold "$t" --need_signal fit
    done
    for t in $NOVELTIES; do
      for r in $REFS; do  # rows novelty$t (latest), novelty${t}_nearest, novelty${t}_nearest_reopen
        local sfx=$([ "$r" = latest ] || echo "_$r") R=(--novelty_reference "${r%_reopen}") up=""
        # nearest_reopen: a task that does not grow reopens the nearest adapter (novelty_reopen). Its shifted rows
        # fork the plain "nearest" row when the first shift k <= 5: before task 5 only adapter 0 exists, so
        # the two made the same decisions on tasks 0..k-1
        if [ "$r" = nearest_reopen ]; then
          R+=(--novelty_reopen nearest)
          if [ -n "$shifted" ] && [ "$k" -le 5 ]; then up=_nearest; fi
        fi
        row "novelty$t$sfx" sdlora "novelty$t${up:-$sfx}" "${sd[@]}" --skip_mode reuse --novelty_threshold "$t" "${R[@]}"
        for s in $SHARES; do
          row "novelty${t}_share$s$sfx" sdlora "novelty${t}_share$s${up:-$sfx}" "${sd[@]}" --skip_mode reuse \
              --novelty_threshold "$t" --max_share "$s" "${R[@]}"
        done
      done
    done
    for n in $EVENS; do row "even$n" sdlora "even$n" "${sd[@]}" --skip_mode reuse --growth_schedule "$(even $n)"; done
    if [ -n "$shifted" ]; then  # the oracle grows at task 0 and exactly at the shifts; before them it is [0,5]
      row oracle - "$([ "$k" -le 5 ] && echo even2 || echo -)" "${sd[@]}" --skip_mode reuse --growth_schedule "[0,$shifted]"
    fi
  }
  EXTRA=("$@")
  for seed in $SEEDS; do
    if [[ " $STREAMS " == *" plain "* ]]; then rows plain ""; fi
    if [[ " $STREAMS " == *" shifted "* ]]; then
      for kind in $KINDS; do
        for pl in $PLACEMENTS; do
          rows "${kind}_${pl//,/}" "$pl" --shift_tasks "[$pl]" --shift_kind "$kind"
        done
      done
    fi
  done
  wait_below 1; wait
  summarize
  exit 0
fi

if [ "${1:-}" = "baselines" ]; then  # the explainer's references beside SD-LoRA, first 5 tasks of the protocol
  shift
  for cfg in sdlora seq_lora lora_task_id; do
    run "${cfg}_5tasks" --config=exps/${cfg}_c100.json "${P[@]}" --max_tasks 5 --prefix "${cfg}_5tasks" "$@"
  done
  wait_below 1; wait
  summarize
  exit 0
fi

if [ "${1:-}" = "offline" ]; then
  shift
  for seed in $SEEDS; do
    run "sdlora_$seed"         --config=exps/sdlora_c100.json "${P[@]}" --seed $seed "$@"
    run "gumbel_chosen_$seed"  --config=exps/gumbel_rule_c100.json "${P[@]}" --seed $seed "$@"
    run "growth_$seed"         --config=exps/gumbel_c100.json "${P[@]}" --seed $seed "$@"  # the shipped default
    run "novelty_$seed"        --config=exps/novelty_c100.json "${P[@]}" --seed $seed "$@"  # growth on novelty
  done
  if [ "${SINGLE_SEED_ROWS:-1}" = 1 ]; then  # the rows run on seed 1993 alone (SINGLE_SEED_ROWS=0 skips them)
    OLD=(--skip_mode none --retrain none --cost_by_share false --growth_cost 0.08)  # the rules before reuse
    run gumbel_v2_1993           --config=exps/gumbel_rule_c100.json "${P[@]}" "${OLD[@]}" --warmup_fraction 0.6 \
                                 --growth_threshold 1e-6 --prefix gumbel_v2 --seed 1993 "$@"
    run gumbel_v3_1993           --config=exps/gumbel_rule_c100.json "${P[@]}" "${OLD[@]}" --warmup_fraction 0.8 \
                                 --prefix gumbel_v3 --seed 1993 "$@"
    run sdlora_rr                --config=exps/sdlora_c100.json "${P[@]}" --model_name sdlora_rr --prefix sdlora_rr "$@"
    run sdlora_kd                --config=exps/sdlora_c100.json "${P[@]}" --model_name sdlora_kd --prefix sdlora_kd \
                                 --kd_threshold 1.0 "$@"
    run gumbel_seed_threshold    --config=exps/gumbel_seed.json "${P[@]}" --prune_rule threshold "$@"
    run gumbel_seed_frequency    --config=exps/gumbel_seed.json "${P[@]}" "$@"
  fi
  wait_below 1; wait
  summarize
  exit 0
fi

for cfg in exps/sdlora_c100.json exps/gumbel_c100.json; do
  for seed in 1993 1994 1995 1996 1997; do
    run "$(basename "$cfg" .json)_$seed" --config="$cfg" --seed "$seed" "$@"
  done
done
wait
summarize
