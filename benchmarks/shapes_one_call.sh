#!/usr/bin/env bash
# Issue 9: the shapes world's stage 1 and stage 2 in ONE device call, so that stage 2 finds stage 1's weights
# (a machine is released after about 30 s idle, and its disk with it; full-fine-tuning checkpoints are too big
# to carry back between calls). Stage 1: full fine-tuning, then every stage-2 method of STAGE2 as a fresh r16
# LoRA on it, side by side, each exported where its time ran out and evaluated at EVAL_PER_PROMPT samples per
# test prompt. Weights stay on the machine; everything else is archived to $OUT/shapes_one_call.tgz. KEEP_WEIGHTS=1
# also brings back each finished run's student (export_transformer/, fp16, 15.6 MB: under $OUT's 16 MiB a file).
#   bash benchmarks/shapes_one_call.sh ROOT
# Settings by environment: SEEDS ("0 1"), S1_METHODS ("ac_dmd"; "ac_dmd dmd2" adds the DMD2-style baseline),
# S1_LIMIT (235 s), S2_LIMIT (215 s), STAGE2 ("rtdmd_balanced grpo_only bp_only"), EVAL_PER_PROMPT (16), EXTRA
# (more overrides for every run, e.g. "device=cpu" for a smoke test), S2_EXTRA (more overrides for the stage-2
# runs only, e.g. "stage2.num_prompts=16 stage2.group_size=16"). To give stage 2 more than one call on a machine
# that stays warm: PHASES="stage1 stage2" S2_FINISH=0 in the first call (stage 2 pauses at S2_LIMIT without
# exporting), then PHASES=stage2 with the same settings in the next call (the paused runs resume, then export).
# The 2026-12-04 call (benchmarks/results/shapes_runs_balanced/) ran the defaults in 535 s on an H200 (the
# balanced weights then given as overrides; rtdmd_balanced is that config).
# The headline runs (benchmarks/results/shapes_runs_long/, three calls on one warm machine; PROVENANCE.json there):
# STAGE2=rtdmd_partial S2_EXTRA="stage2.num_prompts=16 stage2.group_size=16" with S1_LIMIT=300 S2_LIMIT=170
# S2_FINISH=0, then PHASES=stage2 S2_LIMIT=520 S2_FINISH=0, then PHASES=stage2 S2_LIMIT=290.
set -u
root=${1:?root folder for the runs (outside the repository, e.g. ../runs)}
seeds=${SEEDS:-0 1}
stage1=${S1_METHODS:-ac_dmd}
stage2=${STAGE2:-rtdmd_balanced grpo_only bp_only}
phases=${PHASES:-stage1 stage2}
per_prompt=${EVAL_PER_PROMPT:-16}
S1="stage1.num_iters=2000 eval.every=100 checkpoint_every=50 lora.finetune=full lora.layout=separate"
S2="stage2.num_iters=1000 stage2.lr=1e-4 stage2.fake.lr=1e-4 eval.every=50 checkpoint_every=50 lora.layout=separate"
S1="$S1 ${EXTRA:-}"
S2="$S2 ${EXTRA:-} ${S2_EXTRA:-}"
if [[ " $phases " == *" stage2 "* && " $phases " != *" stage1 "* ]]; then
  for seed in $seeds; do  # a stage-2-only call needs the earlier call's stage 1 on this machine
    [ -f "$root/stage1/ac_dmd_s$seed/final_metrics.json" ] || { echo "no stage 1 at $root/stage1/ac_dmd_s$seed" \
      "(the machine was released since the first call?)"; exit 2; }
  done
fi
date -u
# shellcheck disable=SC2086  # the settings are word lists on purpose
{
  if [[ " $phases " == *" stage1 "* ]]; then
    OMP_NUM_THREADS=4 python3 benchmarks/shapes_distill.py --phase stage1 --methods $stage1 --seeds $seeds \
      --root "$root/stage1" --time-limit "${S1_LIMIT:-235}" $S1
    OMP_NUM_THREADS=4 python3 benchmarks/shapes_distill.py --phase stage1 --methods $stage1 --seeds $seeds \
      --root "$root/stage1" --finish $S1 "eval.num_per_prompt=$per_prompt"
    date -u
  fi
  if [[ " $phases " == *" stage2 "* ]]; then
    OMP_NUM_THREADS=2 python3 benchmarks/shapes_distill.py --phase stage2 --methods $stage2 --seeds $seeds \
      --root "$root/stage2" --init-root "$root/stage1" --time-limit "${S2_LIMIT:-215}" $S2
    if [ "${S2_FINISH:-1}" = 1 ]; then
      OMP_NUM_THREADS=2 python3 benchmarks/shapes_distill.py --phase stage2 --methods $stage2 --seeds $seeds \
        --root "$root/stage2" --init-root "$root/stage1" --finish $S2 "eval.num_per_prompt=$per_prompt"
    fi
  fi
} 2>&1 | grep -E "exit|FAILED|finished|paused" || true
date -u
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/shapes_one_call.tgz" --exclude='*.safetensors' --exclude='*.pt' -C "$(dirname "$root")" \
    "$(basename "$root")"
  if [ "${KEEP_WEIGHTS:-0}" = 1 ]; then
    (cd "$(dirname "$root")" && find "$(basename "$root")" -path '*/export_transformer/*' -type f \
      -exec cp --parents {} "$OUT/" \;)
  fi
fi
