#!/usr/bin/env bash
# A β sweep of the smol DPO stage as DVC experiments (`make sweep`): each β is `dvc exp run --temp dpo -S dpo.beta=…`
# in a temporary copy of the workspace, so the workspace and its committed results stay as they are. The reference
# log-probs (stage ref_logps) are computed once by the baseline; every β reads them — only dpo runs.
# Writes reports/sweep.md: the experiments table (dvc exp show), the stages each experiment ran, and
# reports/sweep/beta.png: each held-out metric against β.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
betas=(${SWEEP_BETAS:-0.05 0.2 0.5})
out=reports/sweep.md

dvc repro ref_logps >/dev/null  # the baseline's reference log-probs, in the cache for the temporary workspaces
{
  echo "# β sweep of the smol DPO stage"
  echo
  echo "Made by \`make sweep\` (pipelines/beta_sweep.sh): \`dvc exp run --temp dpo -S dpo.beta=β\` per β, from the"
  echo "committed baseline (β $(python -c 'import yaml; print(yaml.safe_load(open("params.yaml"))["dpo"]["beta"])'))."
  echo "The reference log-probs come from the \`ref_logps\` stage, computed once; each experiment reads them."
  echo
  echo "| experiment | stages run | seconds |"
  echo "|---|---|---|"
} > "$out.tmp"
for beta in "${betas[@]}"; do
  name="beta-${beta}"
  dvc exp remove "$name" >/dev/null 2>&1 || true
  start=$EPOCHREALTIME
  log=$(dvc exp run --temp -n "$name" dpo -S "dpo.beta=$beta" 2>&1) || { echo "$log"; exit 1; }
  secs=$(awk "BEGIN{printf \"%.0f\", $EPOCHREALTIME - $start}")
  ran=$(echo "$log" | sed -n "s/^Running stage '\(.*\)':$/\1/p" | paste -sd, -)
  echo "$name: ran [$ran] in ${secs}s"
  echo "| $name | $ran | $secs |" >> "$out.tmp"
done
{
  echo
  echo "## Results (held-out pairs; \`dvc exp show\`)"
  echo
  dvc exp show --md --no-pager --only-changed --drop 'Created|State|Executor' \
    --keep 'dpo.beta|eval_loss|eval_reward_accuracy|eval_reward_margin|train_loss'
} >> "$out.tmp"
dvc exp show --json --no-pager > reports/sweep.exp.json.tmp
python -m alignkit.evaluation.figures sweep reports/sweep.exp.json.tmp dpo.beta reports/sweep/beta.png \
  eval_loss eval_reward_accuracy eval_reward_margin
rm reports/sweep.exp.json.tmp
printf '\n![held-out metrics against β](sweep/beta.png)\n' >> "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
