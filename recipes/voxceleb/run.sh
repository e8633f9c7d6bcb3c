#!/usr/bin/env bash
# VoxCeleb speaker-verification recipe, stage by stage (WeSpeaker-style).
#
#   bash recipes/voxceleb/run.sh --train_root DIR [--train_root DIR2 ...] --test_root DIR \
#       --trials FILE [--trials FILE2 ...] --exp DIR --hparams hparams/<experiment>.yaml \
#       [--backbone NAME] [--loss NAME] [--setting NAME] \
#       [--stage N] [--stop_stage M] [--lm_exp DIR] [--data_format files|shards] [--nproc N] \
#       [--nnodes N --node_rank K --rdzv_endpoint HOST:PORT] [--start_afresh] [--init_model DIR] [--key=value ...]
#       [--valid_speakers N [--data_seed S] [--valid_utts_per_speaker K] | --valid_trials FILE [--valid_root DIR]]
#       [--stage 0 --musan DIR --rirs DIR [--download DIR [--mirror URL]]]
#
# Stages: 0 prepare_augment (MUSAN / RIRS_NOISES lists into <exp>/data/augment; runs only when asked for,
#         with --musan, --rirs or --download DIR, which downloads what is not given),
#         1 prepare (decode m4a, manifests, checks), 2 train, 3 extract + score, 4 package (<exp>/model),
#         5 large-margin fine-tuning of the trained model into --lm_exp (default: <exp>_lm), 6 score it,
#         7 package it. The default runs stages 1-4. Each stage can run alone; re-running a finished stage does nothing new
# (prepare is skipped, training resumes from its last checkpoint, embeddings come from the cache).
# A resume refuses settings that would change the model (docs/training.md); --start_afresh moves the previous run
# (<exp>/save, its record, log, scores and model) to <exp>/previous-<time>/ and trains anew.
# --init_model DIR starts stage 2 from a model folder (ours or imported; its front-end and backbone must be the
# experiment's): its weights, and a head started as the setting's init_head says (fresh or class means).
# Paths (--exp, --lm_exp, --train_root, --test_root, --trials) reach Python as data, whatever characters
# they hold. --backbone/--loss/--setting NAME pick fragments of hparams/backbones/, losses/, settings/
# in place of the experiment file's; --key=value pairs override hparams keys (e.g. --number_of_epochs=2).
# Stage 2 writes the composed experiment to <exp>/hyperparams.yaml; stages 3-7 read it (--hparams is then
# optional, and what is given must agree with it on every key that shapes the model).
# --enroll_map FILE (stages 3 and 6): '<model> <utt1> <utt2> ...' lines; a trial whose enrolment item is a model
# scores the average of its utterances' normalised embeddings (CN-Celeb's enroll.map, Kaldi's spk2utt).
# Stage 3 on another --test_root (--stage 3 --stop_stage 3) keeps the first root's results in <exp>/scores/ and writes
# the new root's to <exp>/scores/<name>/ (--test_name NAME, default its folder name; docs/training.md).
# --embedding_format ark|npz|npy (stages 3, 6) also writes the test embeddings as Kaldi ark/scp, .npz or .npy files.
# --data_format shards writes the training set as tar shards at stage 1 and trains from them.
# --input_format kaldi|manifest|tree forces the form of --train_root/--test_root: a Kaldi data dir, a CSV/JSONL
# manifest or an audio tree (detected from their content otherwise; docs/data.md).
# --valid_speakers N (drawn with --data_seed, default 0) or --valid_trials FILE: stage 1 writes a validation list
# to <exp>/data and holds its speakers out of training; stage 2 scores it every valid_every epochs (never the tests).
# --nproc N trains with torchrun on N processes per node (nccl with GPUs, gloo otherwise); on several
# machines run the same command on each with --nnodes, its own --node_rank and one --rdzv_endpoint
# (torchrun's c10d rendezvous); the default is one node (--standalone). The interpreter: $PYTHON if set,
# else the project's .venv/bin/python when present (make install), else python3.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"; python_from="PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  python="$repo/.venv/bin/python"; python_from="the project's .venv"
else
  python=python3; python_from="no PYTHON and no .venv"
fi
echo "run.sh: using $python ($python_from)"
stage=1
stop_stage=4
nproc=1
data_format=files
nnodes=1
node_rank=0
rdzv_endpoint=""
exp=""
lm_exp=""
hparams=""
test_root=""
train_roots=()
trials=()
overrides=()
fragments=()
afresh=()
init_model=()
enroll_map=()
score_args=()
augment_args=()
input_format=()
validation=()

usage() { sed -n '2,40p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-1}"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --train_root) train_roots+=("$2"); shift 2 ;;
    --test_root) test_root="$2"; shift 2 ;;
    --input_format) input_format=(--input_format "$2"); shift 2 ;;
    --trials) trials+=("$2"); shift 2 ;;
    --enroll_map) enroll_map=(--enroll_map "$(realpath -- "$2")"); shift 2 ;;
    --test_name|--embedding_format) score_args+=("$1" "$2"); shift 2 ;;
    --exp) exp="$2"; shift 2 ;;
    --lm_exp) lm_exp="$2"; shift 2 ;;
    --hparams) hparams="$2"; shift 2 ;;
    --backbone|--loss|--setting) fragments+=("$1" "$2"); shift 2 ;;
    --backbone=*|--loss=*|--setting=*) fragments+=("$1"); shift ;;
    --stage) stage="$2"; shift 2 ;;
    --stop_stage) stop_stage="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --data_format) data_format="$2"; shift 2 ;;
    --nnodes) nnodes="$2"; shift 2 ;;
    --node_rank) node_rank="$2"; shift 2 ;;
    --rdzv_endpoint) rdzv_endpoint="$2"; shift 2 ;;
    --start_afresh) afresh=(--start_afresh); shift ;;
    --init_model) init_model=(--init_model "$2"); shift 2 ;;
    --musan|--rirs|--download|--mirror) augment_args+=("$1" "$2"); shift 2 ;;
    --valid_speakers|--valid_trials|--valid_root|--data_seed|--valid_utts_per_speaker) validation+=("$1" "$2"); shift 2 ;;
    -h|--help) usage 0 ;;
    --*=*) overrides+=("$1"); shift ;;
    *) echo "run.sh: unknown argument '$1'" >&2; usage ;;
  esac
done

[[ -n "$exp" ]] || { echo "run.sh: --exp is required" >&2; exit 1; }
[[ -z "$hparams" || -f "$hparams" ]] || { echo "run.sh: --hparams must name an existing file (got '$hparams')" >&2; exit 1; }
prepare_model=()  # stage 1 skips test files too short for the experiment's model when --hparams is given
[[ -n "$hparams" ]] && prepare_model=(--hparams "$hparams" "${fragments[@]+"${fragments[@]}"}")
if [[ -z "$hparams" && $stage -le 2 && $stop_stage -ge 2 ]]; then
  [[ -f "$exp/hyperparams.yaml" ]] || { echo "run.sh: stage 2 needs --hparams (an experiment file)" >&2; exit 1; }
  hparams="$exp/hyperparams.yaml"  # repeat (resume) the recorded run
fi
hparams_args=()
[[ -n "$hparams" ]] && hparams_args=("$hparams")
[[ $nnodes -eq 1 || -n "$rdzv_endpoint" ]] || { echo "run.sh: --nnodes $nnodes needs --rdzv_endpoint HOST:PORT" >&2; exit 1; }
lm_exp="${lm_exp:-${exp}_lm}"
overrides+=(--data_format="$data_format")
mkdir -p -- "$exp"

trial_args=()
for t in "${trials[@]+"${trials[@]}"}"; do trial_args+=(--trials "$(realpath -- "$t")"); done
run_stage() { [[ $stage -le $1 && $stop_stage -ge $1 ]]; }

# Runs a training script on one process, or under torchrun on nproc x nnodes processes.
launch() {
  if [[ $nproc -le 1 && $nnodes -le 1 ]]; then
    "$python" "$@"
    return
  fi
  local backend rendezvous
  backend=$("$python" -c "import torch; print('nccl' if torch.cuda.device_count() >= $nproc else 'gloo')")
  if [[ $nnodes -gt 1 ]]; then
    rendezvous=(--nnodes="$nnodes" --node_rank="$node_rank" --rdzv_backend=c10d --rdzv_endpoint="$rdzv_endpoint")
  else
    rendezvous=(--standalone)
  fi
  "$python" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$nproc" "$@" --distributed_backend="$backend"
}

score() {  # score.py for experiment folder $1
  [[ -n "$test_root" && ${#trial_args[@]} -gt 0 ]] || { echo "run.sh: scoring needs --test_root and --trials" >&2; exit 1; }
  "$python" "$here/score.py" "${hparams_args[@]+"${hparams_args[@]}"}" --exp "$1" --test_root "$(realpath -- "$test_root")" \
    "${trial_args[@]}" "${enroll_map[@]+"${enroll_map[@]}"}" "${score_args[@]+"${score_args[@]}"}" \
    "${fragments[@]+"${fragments[@]}"}" "${overrides[@]+"${overrides[@]}"}"
}

if run_stage 0; then
  if [[ ${#augment_args[@]} -gt 0 ]]; then
    echo "== stage 0: prepare_augment (noise and RIR lists into $exp/data/augment)"
    "$python" "$here/prepare_augment.py" --out "$exp/data/augment" "${augment_args[@]}"
  else
    echo "== stage 0: skipped (give --musan DIR, --rirs DIR or --download DIR)"
  fi
fi

if run_stage 1; then
  echo "== stage 1: prepare"
  [[ ${#train_roots[@]} -gt 0 && -n "$test_root" ]] || { echo "run.sh: stage 1 needs --train_root and --test_root" >&2; exit 1; }
  args=(--test_root "$test_root" --out "$exp/data" --data_format "$data_format")
  for r in "${train_roots[@]}"; do args+=(--train_root "$r"); done
  for t in "${trials[@]+"${trials[@]}"}"; do args+=(--trials "$t"); done
  "$python" "$here/prepare.py" "${args[@]}" "${prepare_model[@]+"${prepare_model[@]}"}" "${input_format[@]+"${input_format[@]}"}" \
    "${validation[@]+"${validation[@]}"}"
fi

if run_stage 2; then
  echo "== stage 2: train"
  launch "$here/train.py" "$hparams" --exp "$exp" "${afresh[@]+"${afresh[@]}"}" "${init_model[@]+"${init_model[@]}"}" \
    "${fragments[@]+"${fragments[@]}"}" \
    "${overrides[@]+"${overrides[@]}"}"
fi

if run_stage 3; then
  echo "== stage 3: extract + score"
  score "$exp"
fi

if run_stage 4; then
  echo "== stage 4: package"
  "$python" "$here/package.py" "${hparams_args[@]+"${hparams_args[@]}"}" --exp "$exp" "${fragments[@]+"${fragments[@]}"}" \
    "${overrides[@]+"${overrides[@]}"}"
fi

if run_stage 5; then
  echo "== stage 5: large-margin fine-tuning into $lm_exp"
  launch "$here/finetune_lm.py" "${hparams_args[@]+"${hparams_args[@]}"}" --init "$exp" --exp "$lm_exp" \
    "${fragments[@]+"${fragments[@]}"}" "${overrides[@]+"${overrides[@]}"}"
fi

if run_stage 6; then
  echo "== stage 6: extract + score the fine-tuned model"
  score "$lm_exp"
fi

if run_stage 7; then
  echo "== stage 7: package the fine-tuned model"
  "$python" "$here/package.py" "${hparams_args[@]+"${hparams_args[@]}"}" --exp "$lm_exp" \
    "${fragments[@]+"${fragments[@]}"}" "${overrides[@]+"${overrides[@]}"}"
fi
