#!/usr/bin/env bash
# CN-Celeb speaker-verification recipe: CN-Celeb's layout read here, the stages of recipes/voxceleb/run.sh.
#
#   bash recipes/cnceleb/run.sh --cnceleb1 DIR [--cnceleb2 DIR] --exp DIR --hparams hparams/cnceleb_ecapa_qmargin.yaml \
#       [--stage N] [--stop_stage M] [any other recipes/voxceleb/run.sh option, --key=value ...]
#
# Stage 0 reads CN-Celeb1 (data/, dev/dev.lst, eval/enroll, eval/test, eval/lists) and CN-Celeb2 (data/, spk.lst)
# into <exp>/cnceleb/ (recipes/cnceleb/prepare.py): train.csv (CN-Celeb1 dev speakers + all of CN-Celeb2),
# test.csv (CN-Celeb1 eval), trials/CNC-Eval-Concat.lst (one concatenated enrollment file per model),
# trials/CNC-Eval-Avg.lst + enroll.map (each model the average of its utterances' embeddings).
# Stage 1 checks and prepares them with the concatenated-enrollment list; stages 2-7 are recipes/voxceleb/run.sh's,
# scoring both protocols, reported side by side in <exp>/scores/results.<backend>.md. Default: stages 0-4.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then python="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"
else python=python3; fi

cnceleb1=""
cnceleb2=()
exp=""
stage=0
stop_stage=4
rest=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cnceleb1) cnceleb1="$2"; shift 2 ;;
    --cnceleb2) cnceleb2=(--cnceleb2 "$2"); shift 2 ;;
    --exp) exp="$2"; shift 2 ;;
    --stage) stage="$2"; shift 2 ;;
    --stop_stage) stop_stage="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) rest+=("$1"); shift ;;
  esac
done
[[ -n "$exp" ]] || { echo "cnceleb/run.sh: --exp is required" >&2; exit 1; }
lists="$exp/cnceleb"

if [[ $stage -le 0 && $stop_stage -ge 0 ]]; then
  echo "== stage 0: CN-Celeb layout -> $lists"
  [[ -n "$cnceleb1" ]] || { echo "cnceleb/run.sh: stage 0 needs --cnceleb1 DIR" >&2; exit 1; }
  "$python" "$here/prepare.py" --cnceleb1 "$cnceleb1" "${cnceleb2[@]+"${cnceleb2[@]}"}" --out "$lists"
fi

common=(--train_root "$lists/train.csv" --test_root "$lists/test.csv" --exp "$exp")
if [[ $stage -le 1 && $stop_stage -ge 1 ]]; then  # stage 1 checks the lists of files; models are not files
  bash "$repo/recipes/voxceleb/run.sh" "${common[@]}" --trials "$lists/trials/CNC-Eval-Concat.lst" \
    --stage 1 --stop_stage 1 "${rest[@]+"${rest[@]}"}"
fi
first=$(( stage > 2 ? stage : 2 ))
if [[ $stop_stage -ge $first ]]; then
  protocols=(--trials "$lists/trials/CNC-Eval-Concat.lst")
  [[ -f "$lists/enroll.map" ]] && protocols+=(--trials "$lists/trials/CNC-Eval-Avg.lst" --enroll_map "$lists/enroll.map")
  bash "$repo/recipes/voxceleb/run.sh" "${common[@]}" "${protocols[@]}" --stage "$first" --stop_stage "$stop_stage" \
    "${rest[@]+"${rest[@]}"}"
fi
