#!/usr/bin/env bash
# VoxCeleb speaker-verification recipe, stage by stage (WeSpeaker-style).
#
#   bash recipes/voxceleb/run.sh --train_root DIR [--train_root DIR2 ...] --test_root DIR \
#       --trials FILE [--trials FILE2 ...] --exp DIR --hparams hparams/<file>.yaml \
#       [--stage N] [--stop_stage M] [--nproc N] [--key=value ...]
#
# Stages: 1 prepare (decode m4a, manifests, checks), 2 train, 3 extract + score.
# Each stage can run alone; re-running a finished stage does nothing new (prepare is skipped,
# training resumes from its last checkpoint, embeddings come from the cache).
# Paths (--exp, --train_root, --test_root, --trials) reach Python as data, whatever characters they hold.
# --key=value pairs override hparams keys (e.g. --number_of_epochs=2); --nproc N trains with
# torchrun on N processes (nccl with GPUs, gloo otherwise). PYTHON picks the interpreter.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
stage=1
stop_stage=3
nproc=1
exp=""
hparams=""
test_root=""
train_roots=()
trials=()
overrides=()

usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --train_root) train_roots+=("$2"); shift 2 ;;
    --test_root) test_root="$2"; shift 2 ;;
    --trials) trials+=("$2"); shift 2 ;;
    --exp) exp="$2"; shift 2 ;;
    --hparams) hparams="$2"; shift 2 ;;
    --stage) stage="$2"; shift 2 ;;
    --stop_stage) stop_stage="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --*=*) overrides+=("$1"); shift ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage ;;
  esac
done

[[ -n "$exp" ]] || { echo "run.sh: --exp is required" >&2; exit 1; }
[[ -n "$hparams" && -f "$hparams" ]] || { echo "run.sh: --hparams must name an existing file (got '$hparams')" >&2; exit 1; }
mkdir -p -- "$exp"

trial_args=()
for t in "${trials[@]+"${trials[@]}"}"; do trial_args+=(--trials "$(realpath -- "$t")"); done

if [[ $stage -le 1 && $stop_stage -ge 1 ]]; then
  echo "== stage 1: prepare"
  [[ ${#train_roots[@]} -gt 0 && -n "$test_root" ]] || { echo "run.sh: stage 1 needs --train_root and --test_root" >&2; exit 1; }
  args=(--test_root "$test_root" --out "$exp/data")
  for r in "${train_roots[@]}"; do args+=(--train_root "$r"); done
  for t in "${trials[@]+"${trials[@]}"}"; do args+=(--trials "$t"); done
  "$python" "$here/prepare.py" "${args[@]}"
fi

if [[ $stage -le 2 && $stop_stage -ge 2 ]]; then
  echo "== stage 2: train"
  train_args=("$hparams" --exp "$exp" "${overrides[@]+"${overrides[@]}"}")
  if [[ $nproc -gt 1 ]]; then
    backend=$("$python" -c "import torch; print('nccl' if torch.cuda.device_count() >= $nproc else 'gloo')")
    "$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" \
      "$here/train.py" "${train_args[@]}" --distributed_backend="$backend"
  else
    "$python" "$here/train.py" "${train_args[@]}"
  fi
fi

if [[ $stage -le 3 && $stop_stage -ge 3 ]]; then
  echo "== stage 3: extract + score"
  [[ -n "$test_root" && ${#trial_args[@]} -gt 0 ]] || { echo "run.sh: stage 3 needs --test_root and --trials" >&2; exit 1; }
  "$python" "$here/score.py" "$hparams" --exp "$exp" --test_root "$(realpath -- "$test_root")" \
    "${trial_args[@]}" "${overrides[@]+"${overrides[@]}"}"
fi
