#!/usr/bin/env bash
# Train an audio encoder end to end on one machine, from sentences to checkpoint:
#   synth (espeak-ng, flite) -> respond (the frozen LLM answers each transcript) -> align.
# Every step is a `speechchat` subcommand and resumes where it stopped; the recipe's `synth`
# and `align` sections set voices and training (default: training/recipes/fast.yaml).
#
#   SENTENCES=data/corpus/sentences.jsonl WORK=runs/box DEVICE=cuda training/recipes/one_box.sh
#
# Knobs (environment):
#   SENTENCES      the sentence set (from `speechchat corpus`; built with the recipe if absent)
#   WORK, RECIPE   output folder; recipe file
#   DEVICE         cuda or cpu
#   LIMIT          sentences to render
#   STEPS, BATCH   alignment's step count and batch (default: the recipe's)
#   MINUTES        alignment's wall-clock cap
#   DEADLINE       seconds since the epoch by which alignment has stopped (caps MINUTES, for a
#                  machine lent for a fixed time)
#   RESPOND_BATCH  answers in flight; RESPOND_DTYPE: the answering LLM's (float32 matches
#                  answers scored on a CPU)
#   WORKERS        synthesis processes
#   SPEECHCHAT     the command ("python3 -m model.cli" where nothing is installed)
#   PYTHON         an interpreter that imports this project, to read the recipe's LLM
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${WORK:=runs/one_box}" "${RECIPE:=$here/fast.yaml}" "${DEVICE:=cuda}" "${LIMIT:=20000}"
: "${SENTENCES:=$WORK/corpus/sentences.jsonl}" "${RESPOND_BATCH:=256}" "${WORKERS:=$(nproc)}"
: "${SPEECHCHAT:=speechchat}"
: "${PYTHON:=python3}"
read -r -a sc <<<"$SPEECHCHAT"
# the LLM that answers is the one the encoder is aligned to, read as `align` reads it
llm=$("$PYTHON" -c 'import sys
from training.config import AlignConfig, load_step_config
print(load_step_config(AlignConfig, "align", sys.argv[1]).llm)' "$RECIPE")
started=$SECONDS
say() { echo "[one_box $((SECONDS - started)) s] $*"; }

if [ ! -f "$SENTENCES" ]; then
  say "corpus -> $SENTENCES"
  "${sc[@]}" corpus --recipe "$RECIPE" --out "$SENTENCES"
fi
say "synth: $LIMIT sentences, $WORKERS processes"
"${sc[@]}" synth "$SENTENCES" --recipe "$RECIPE" --out "$WORK/speech" --workers "$WORKERS" \
  --limit "$LIMIT"
for split in train dev; do
  if [ -s "$WORK/speech/$split.jsonl" ]; then
    say "respond: $split"
    engine=worker
    [[ $DEVICE == cuda* ]] && engine=generate  # padded batches of $RESPOND_BATCH on a GPU
    "${sc[@]}" respond "$WORK/speech/$split.jsonl" --llm "$llm" --device "$DEVICE" \
      --engine "$engine" --batch-size "$RESPOND_BATCH" ${RESPOND_DTYPE:+--dtype "$RESPOND_DTYPE"}
  fi
done
if [ -n "${DEADLINE:-}" ]; then  # leave 30 s after alignment's last checkpoint
  left=$(awk -v d="$DEADLINE" -v now="$(date +%s)" 'BEGIN {printf "%.2f", (d - now - 30) / 60}')
  MINUTES=$(awk -v a="$left" -v b="${MINUTES:-$left}" 'BEGIN {print (a < b ? a : b)}')
fi
say "align${MINUTES:+ for at most $MINUTES min}"
manifests=(--manifest "$WORK/speech/train.jsonl")
[ -s "$WORK/speech/dev.jsonl" ] && manifests+=(--manifest "$WORK/speech/dev.jsonl")
"${sc[@]}" align "${manifests[@]}" --recipe "$RECIPE" --out "$WORK/align" --device "$DEVICE" \
  ${STEPS:+--steps "$STEPS"} ${BATCH:+--batch-size "$BATCH"} ${MINUTES:+--max-minutes "$MINUTES"}
say "done: encoder checkpoint in $WORK/align/encoder"
