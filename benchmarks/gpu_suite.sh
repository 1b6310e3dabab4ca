#!/usr/bin/env bash
# The GPU benchmark suite (issue 7's table) in one command, on a machine with an accelerator:
#
#   bash benchmarks/gpu_suite.sh                 # 197m and 810m, sequence 1024, bfloat16
#   TINY=1 bash benchmarks/gpu_suite.sh          # the tiny preset, short sequences: shows it runs (CPU)
#
# Runs from the repository root with the project's .venv (make setup). Writes, into $OUT
# (default benchmarks/gpu_suite_<device-kind>): results.jsonl (one JSON line per measurement) and
# results.md (the table). Measured:
#   - LM train step tokens/s and MFU, against a matmul peak measured in the same run;
#   - decode tokens/s at batch 1 / 16 / 64 / 256 and its fraction of the bandwidth roofline
#     (bandwidth measured in the same run; bytes = parameters + KV cache per step);
#   - one whole PPO iteration (generation, scoring, updates) at $PPO_PRESET.
# Targets (issue 7): MFU >= 45% at 810m on an H100; decode >= 60% of the roofline at batch 64.
# Not included: TRL's PPO iteration on the same GPU (needs a separate TRL venv; issue 15 part 3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
if [[ "${TINY:-0}" == "1" ]]; then
  PRESETS=${PRESETS:-tiny}; SEQ=${SEQ:-128}; BATCH=${BATCH:-8}; DTYPE=${DTYPE:-float32}
  DECODE_BATCHES=${DECODE_BATCHES:-"1 16"}; PPO_PRESET=${PPO_PRESET:-tiny}; PPO_ARGS=${PPO_ARGS:-"--rollout_batch=16"}
  MATMUL_N=${MATMUL_N:-512}; BANDWIDTH_MB=${BANDWIDTH_MB:-32}; NEW_TOKENS=${NEW_TOKENS:-16}
else
  PRESETS=${PRESETS:-"197m 810m"}; SEQ=${SEQ:-1024}; BATCH=${BATCH:-16}; DTYPE=${DTYPE:-bfloat16}
  DECODE_BATCHES=${DECODE_BATCHES:-"1 16 64 256"}; PPO_PRESET=${PPO_PRESET:-197m}
  PPO_ARGS=${PPO_ARGS:-"--rollout_batch=512 --prompt_len=256 --new_tokens=256 --epochs=4 --num_minibatches=8"}
  MATMUL_N=${MATMUL_N:-8192}; BANDWIDTH_MB=${BANDWIDTH_MB:-2048}; NEW_TOKENS=${NEW_TOKENS:-128}
fi
KIND=$($PY -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
OUT=${OUT:-benchmarks/gpu_suite_${KIND}}
mkdir -p "$OUT"
RESULTS="$(cd "$OUT" && pwd)/results.jsonl"
: > "$RESULTS"
cd benchmarks
for preset in $PRESETS; do
  echo "== train step and decode: $preset"
  $PY bench_model.py --preset="$preset" --dtype="$DTYPE" --batch="$BATCH" --seq="$SEQ" --matmul_n="$MATMUL_N" \
      --bandwidth_mb="$BANDWIDTH_MB" --new_tokens="$NEW_TOKENS" --json="$RESULTS"
  for b in $DECODE_BATCHES; do
    echo "== decode: $preset batch $b"
    $PY bench_model.py --preset="$preset" --dtype="$DTYPE" --skip_train --decode_batch="$b" \
        --bandwidth_mb="$BANDWIDTH_MB" --new_tokens="$NEW_TOKENS" --json="$RESULTS"
  done
done
echo "== PPO iteration: $PPO_PRESET"
# shellcheck disable=SC2086
$PY bench_ppo.py --preset="$PPO_PRESET" --dtype="$DTYPE" $PPO_ARGS --json="$RESULTS"
cd ..
$PY benchmarks/suite_table.py "$RESULTS" > "$OUT/results.md"
cat "$OUT/results.md"
echo "written: $RESULTS, $OUT/results.md"
