#!/usr/bin/env bash
# Issue 8, item 3: `--compile blocks` against eager for SD3.5-M (full size, random weights) on one GPU, at the
# comparison's settings (batch 9, 512 px, seed 42, CFG 4.5 as one batched pass, eta 0.9, 4 steps, 10 fake
# updates per generator update, LoRA r32/a64) with activation checkpointing off. One device call per part:
#   bash benchmarks/compile_ab.sh s1 OUT_DIR     # stage-1 cycle: compiled (fills inductor's cache), then eager
#   bash benchmarks/compile_ab.sh infer OUT_DIR  # 4-step inference at batch 1 and 9: compiled, then eager
#   bash benchmarks/compile_ab.sh infer_klein OUT_DIR  # the same, then FLUX.2-klein-4B's eager stage-1 cycle
#   bash benchmarks/compile_ab.sh graphs OUT_DIR  # inference: eager, --compile model, then + --cuda-graphs
#   bash benchmarks/compile_ab.sh fit OUT_DIR  # with checkpointing: klein-4B stage 1 at 9, SD3.5-M stage 2 at 24
#   bash benchmarks/compile_ab.sh s1_model OUT_DIR  # stage-1 cycle: --compile model, then + --cuda-graphs
#   bash benchmarks/compile_ab.sh vae OUT_DIR  # inference on CUDA graphs with the VAE decoder compiled too:
#                                              # SD3.5-M, then FLUX.2-klein-4B (guards skipped after warm-up)
#   bash benchmarks/compile_ab.sh guard OUT_DIR  # stage-1 cycle, compiled blocks: the NaN/inf check after every
#                                                # update, then once per step (--nonfinite-check step)
#   bash benchmarks/compile_ab.sh bpchunk OUT_DIR  # stage 2 at groups of 24 with checkpointing and the reward
#                                                  # BP decoded 4 at a time: FLUX.2-klein-4B, then SD3.5-M
#   bash benchmarks/compile_ab.sh klein OUT_DIR  # FLUX.2-klein-4B: stage 2 at groups of 24 with checkpointing,
#                                                # then inference as `vae` (CUDA graphs, compiled VAE decoder)
# Inductor's cache lives in ./.inductor (git-ignored), so a second call on the same warm machine reuses it.
# Measured on an H200 (2026-12-03): the compiled stage-1 run, compiling included, about 300 s; the eager one
# 110 s on a fresh machine but over 125 s twice after a compiled run, so the two do not fit one 10-minute call
# with room to spare: run `s1` with S1_COMPILE_LIMIT=360 S1_EAGER_LIMIT=180 and nothing else in the call.
set -u
part=${1:?part: s1, infer, infer_klein, graphs, fit, s1_model, vae, klein, bpchunk or guard}
out=${2:?output folder}
mkdir -p "$out"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.inductor}
S="--arch sd35_medium --resolution 512 --batch 9 --seed 42 --guidance-scale 4.5 --eta 0.9 --num-steps 4
   --n-fake 10 --lora-rank 32 --lora-alpha 64 --batched-cfg --no-activation-checkpointing"
# 4-step inference with the transformer and the VAE decoder compiled, replayed as CUDA graphs (parts vae, klein)
VAE_G="--stage infer --compile model --cuda-graphs --skip-guard-eval --compile-vae --warmup 3 --repeats 5 --profile"
run() {  # name, time limit (s), bench arguments...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" python3 -m tiltflow.cli bench $S "$@" --out "$out/$name.json" >"$out/$name.log" 2>&1
  echo "$name: rc=$? wall=$((SECONDS - t0)) s"
  pkill -f compile_worker 2>/dev/null  # a run stopped by timeout leaves inductor's workers behind
  tail -4 "$out/$name.log"
}
case $part in
  s1)
    run s1_compile "${S1_COMPILE_LIMIT:-360}" --stage 1 --compile blocks --warmup 1 --repeats 2 --profile
    run s1_eager "${S1_EAGER_LIMIT:-180}" --stage 1 --compile none --warmup 1 --repeats 2 ;;
  infer|infer_klein)
    run infer_compile "${INFER_COMPILE_LIMIT:-250}" --stage infer --compile blocks --warmup 2 --repeats 5 --profile
    run infer_eager "${INFER_EAGER_LIMIT:-100}" --stage infer --compile none --warmup 2 --repeats 5
    if [ "$part" = infer_klein ]; then
      S=${S/sd35_medium/flux2_klein_4b}
      run klein_s1_eager "${KLEIN_LIMIT:-150}" --stage 1 --compile none --warmup 1 --repeats 2
    fi ;;
  graphs)  # 4-step inference: eager, the whole transformer compiled, then that as CUDA graphs
    run infer_eager "${INFER_EAGER_LIMIT:-100}" --stage infer --compile none --warmup 2 --repeats 5
    run infer_model "${INFER_MODEL_LIMIT:-150}" --stage infer --compile model --warmup 2 --repeats 5
    TORCH_LOGS=perf_hints run infer_graphs "${INFER_GRAPHS_LIMIT:-150}" --stage infer --compile model --cuda-graphs \
      --warmup 3 --repeats 5 --profile ;;
  fit)  # memory at the reference batches with activation checkpointing: FLUX.2-klein-4B stage 1 (batch 9), then
    # SD3.5-M stage 2 with one rollout batch of a group of 24 (the reference group size)
    S=${S/sd35_medium/flux2_klein_4b}
    run klein_s1_ac "${KLEIN_LIMIT:-150}" --stage 1 --compile none --activation-checkpointing --warmup 1 --repeats 2
    S=${S/flux2_klein_4b/sd35_medium}
    S=${S/--batch 9/--batch 24}
    run s2_b24_ac "${S2_LIMIT:-250}" --stage 2 --compile none --activation-checkpointing --warmup 1 --repeats 1 ;;
  s1_model)  # stage-1 cycle: the whole transformer compiled, without CUDA graphs, then with
    run s1_model "${S1_MODEL_LIMIT:-280}" --stage 1 --compile model --warmup 1 --repeats 2
    TORCH_LOGS=perf_hints run s1_graphs "${S1_GRAPHS_LIMIT:-280}" --stage 1 --compile model --cuda-graphs \
      --warmup 2 --repeats 2 --profile ;;
  vae)  # 4-step inference, the transformer and the VAE decoder compiled and replayed as CUDA graphs
    run infer_vae "${INFER_VAE_LIMIT:-300}" $VAE_G
    S=${S/sd35_medium/flux2_klein_4b}
    run klein_infer_vae "${KLEIN_LIMIT:-240}" $VAE_G ;;
  klein)
    S=${S/sd35_medium/flux2_klein_4b}
    S=${S/--batch 9/--batch 24}
    run klein_s2_b24_ac "${S2_LIMIT:-250}" --stage 2 --compile none --activation-checkpointing --warmup 1 --repeats 1
    S=${S/--batch 24/--batch 9}
    run klein_infer_vae "${KLEIN_LIMIT:-240}" $VAE_G ;;
  bpchunk)
    S=${S/--batch 9/--batch 24}
    S=${S/sd35_medium/flux2_klein_4b}
    run klein_s2_b24_ac_bp4 "${KLEIN_LIMIT:-240}" --stage 2 --compile none --activation-checkpointing --bp-chunk 4 \
      --warmup 1 --repeats 1
    S=${S/flux2_klein_4b/sd35_medium}
    run s2_b24_ac_bp4 "${S2_LIMIT:-170}" --stage 2 --compile none --activation-checkpointing --bp-chunk 4 \
      --warmup 1 --repeats 1 ;;
  guard)  # the second run reuses the first one's compiled kernels (inductor's cache)
    run s1_check_update "${S1_COMPILE_LIMIT:-330}" --stage 1 --compile blocks --warmup 1 --repeats 3 --profile
    run s1_check_step "${S1_STEP_LIMIT:-200}" --stage 1 --compile blocks --warmup 1 --repeats 3 --profile \
      --nonfinite-check step ;;
  *) echo "unknown part $part (s1, infer, infer_klein, graphs, fit, s1_model, vae, klein, bpchunk or guard)" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
