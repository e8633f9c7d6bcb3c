#!/usr/bin/env bash
# The GPU check of issue 12, for one GPU machine (an H200 with 16 cores): about 5 minutes, 7.5 at most.
#
#   bash bench/gpu_check.sh [--out DIR] [--cpu-dry-run]
#
# Runs from the repository root of a copy that need not be installed, and prints one JSON object
# (also written to DIR/gpu_check.json, default exp/gpu_check):
#   1. each loss (AAM, CosFace, dense Q-Margin alpha 1.5 / 1.75, SparseQMarginHead) forward + backward
#      on the paper-scale ECAPA-TDNN (channels 1024, embedding 192, hparams/vox2_ecapa_*.yaml) with
#      synthetic input and bf16 autocast: bench/train_step.py on the GPU, and the same settings on the
#      CPU (all cores, float32) to compare with;
#   2. the loss step alone on B x C cosines (bench/loss_step.py: ATen ops, host syncs, time), GPU
#      with bf16 cosines and CPU;
#   3. one short recipes/voxceleb/run.sh training (stages 1-3, 2 epochs, bf16) on a generated tiny
#      corpus, with --nproc = the number of GPUs;
#   4. bench/train_step.py at GPU sizes: 5,994 / 17,982 / 100k / 1M classes, batch 128, dense up to 1M.
# Exits 1 (after printing the JSON) on NaN or inf anywhere, on a step that fails or runs out of time,
# or on a GPU result slower than the CPU one (samples/s of a training step, loss step time).
#
# Python: $PYTHON if set; else ./.venv if it imports what the check needs; else python3, after
# installing carried wheels from ./.whl (--no-index) if that folder exists; else, if PyPI answers,
# a new ./.venv (over python3's own torch when it has one). The JSON says which was used. A GPU
# image with torch but without speechbrain needs 7 small wheels in .whl (docs/performance.md).
# Output files stay under DIR; copy DIR/gpu_check.json where it should be kept.
# --cpu-dry-run runs the same plumbing on the CPU at tiny sizes (no GPU needed, about 75 s on 2
# loaded cores); speed comparisons are then reported but not enforced.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
out=exp/gpu_check
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --cpu-dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
budget=450  # seconds for the whole check, install included (600 for --cpu-dry-run)
started=$SECONDS
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: >"$out/steps.tsv"

log() { echo "gpu_check: $*" >&2; }

usable() {  # does interpreter $1 import everything the check needs (qmargin_spk from this copy)?
  "$1" -c "import torch, torchaudio, speechbrain, soundfile, qmargin_spk.losses" >/dev/null 2>&1
}

resolve_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    python_how="\$PYTHON ($PYTHON)"
  elif [[ -x .venv/bin/python ]] && usable .venv/bin/python; then
    PYTHON=.venv/bin/python; python_how="existing .venv"
  else
    local wheels=""
    if compgen -G ".whl/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/qmargin_site .whl/*.whl >&2 && export PYTHONPATH="$PYTHONPATH:/tmp/qmargin_site" \
        && wheels=" + wheels carried in .whl"
    fi
    if usable python3; then
      PYTHON=python3; python_how="python3 ($(command -v python3))$wheels"
    elif python3 -c "import torch" >/dev/null 2>&1; then
      log "python3 lacks speechbrain/soundfile: new .venv over its torch, the rest from PyPI"
      python3 -m venv --system-site-packages .venv >&2 && .venv/bin/python -m pip install -q speechbrain==1.1.2 soundfile >&2
      PYTHON=.venv/bin/python; python_how="new .venv over python3's torch, speechbrain and soundfile from PyPI"
    else
      log "no torch here: make install (requirements-lock.txt, from PyPI)"
      make install PYTHON=python3 >&2
      PYTHON=.venv/bin/python; python_how="make install (requirements-lock.txt from PyPI)"
    fi
  fi
  usable "$PYTHON" || { log "no usable Python (tried: $python_how)"; python_how="none usable: $python_how"; return 1; }
}

# step NAME CAP_SECONDS COMMAND...: stdout to NAME.json, stderr to NAME.log, within the time left.
step() {
  local name="$1" cap="$2"; shift 2
  local left=$((budget - (SECONDS - started) - 15))
  local limit=$((cap < left ? cap : left))
  if [[ $limit -le 5 ]]; then
    printf '%s\t%s\t%s\n' "$name" 125 0 >>"$out/steps.tsv"
    log "$name: skipped, out of time"
    return
  fi
  log "$name (at most ${limit} s)"
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" >"$out/$name.json" 2>"$out/$name.log" || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) >>"$out/steps.tsv"
  if [[ $rc -ne 0 ]]; then
    log "$name failed (exit $rc); the end of $out/$name.log:"
    tail -5 "$out/$name.log" >&2
  fi
}

python_how=""
resolve_python || PYTHON=python3
cpus=$(nproc)

if [[ $dry_run -eq 1 ]]; then
  budget=600; device=cpu; gpus=1
  ecapa=(--channels 16 --batch 2 --crop 0.5 --steps 1 --warmup 0 --threads 1)
  cpu_ecapa=("${ecapa[@]}"); size_ecapa=("${ecapa[@]}")
  cmp_classes=(--classes 50); size_classes=(--classes 50 200)
  loss_size=(--batch 16 --classes 300 --repeats 2); cpu_threads=1
  recipe_size=(--channels=16 --embedding_dim=16 --batch_size=8 --number_of_epochs=1 --warmup_epochs=1 --num_workers=0
               --bootstrap_resamples=0 --device=cpu)
else
  device=cuda; gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  ecapa=(--channels 1024 --batch 32 --crop 2 --steps 3 --warmup 1 --threads "$cpus")
  cpu_ecapa=(--channels 1024 --batch 32 --crop 2 --steps 1 --warmup 1 --threads "$cpus")
  size_ecapa=(--channels 1024 --batch 128 --crop 2 --steps 3 --warmup 1 --threads "$cpus")
  cmp_classes=(--classes 5994); size_classes=(--classes 5994 17982 100000 1000000)
  loss_size=(--batch 256 --classes 5994 --repeats 30); cpu_threads=$cpus
  recipe_size=(--batch_size=8 --number_of_epochs=2 --warmup_epochs=1 --num_workers=4 --bootstrap_resamples=100
               --device=cuda:0 --precision=bf16)
fi

step environment 60 "$PYTHON" -c '
import json, os, platform, torch
print(json.dumps({"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                  "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                  "cuda": torch.version.cuda, "cpus": os.cpu_count(), "machine": platform.machine()}))'

# 1. Each loss on the paper-scale ECAPA, bf16 autocast on the GPU; the same settings on the CPU.
step train_step_gpu 120 "$PYTHON" bench/train_step.py --device "$device" --bf16 "${ecapa[@]}" "${cmp_classes[@]}"
step train_step_cpu 150 "$PYTHON" bench/train_step.py --device cpu "${cpu_ecapa[@]}" "${cmp_classes[@]}"

# 2. The loss step alone: ops, syncs, time; bf16 cosines on the GPU, float32 on the CPU.
step loss_step_gpu 60 "$PYTHON" bench/loss_step.py --device "$device" --dtype bfloat16 --threads 1 --no_load "${loss_size[@]}"
step loss_step_cpu 60 "$PYTHON" bench/loss_step.py --device cpu --threads "$cpu_threads" --no_load "${loss_size[@]}"

# 3. A short recipe run on generated data, --nproc = GPUs.
rm -rf "$out/recipe"
step recipe 180 bash -c '
set -euo pipefail
py="$1"; out="$2"; nproc="$3"; shift 3
"$py" -m qmargin_spk.data.synthetic --preset tiny --out "$out/corpus" >&2
PYTHON="$py" bash recipes/voxceleb/run.sh --train_root "$out/corpus/train" --test_root "$out/corpus/test" \
  --trials "$out/corpus/trials.txt" --exp "$out/exp" --hparams hparams/vox2_ecapa_qmargin.yaml \
  --stop_stage 3 --nproc "$nproc" --score_backend=cosine "$@" >&2
"$py" -c "import json, pathlib, sys
exp = pathlib.Path(sys.argv[1])
results = sorted(exp.rglob(\"results.*.json\"))
print(json.dumps({\"train_log\": (exp / \"train_log.txt\").read_text().splitlines(),
                  \"results\": {str(p.relative_to(exp)): json.loads(p.read_text()) for p in results}}))" "$out/exp"
' recipe "$PYTHON" "$out/recipe" "$((gpus > 0 ? gpus : 1))" "${recipe_size[@]}"

# 4. The training-step benchmark at GPU sizes (dense losses up to 1M classes).
step train_step_sizes 200 "$PYTHON" bench/train_step.py --device "$device" --bf16 "${size_ecapa[@]}" \
  "${size_classes[@]}" --dense_max_classes 1000000

"$PYTHON" - "$out" "$dry_run" "$python_how" $((SECONDS - started)) "$budget" <<'EOF'
"""Gather the steps' JSON, check for NaN, failures and GPU-slower-than-CPU, print one JSON object."""
import json
import math
import re
import sys
from pathlib import Path

out, dry_run, python_how, elapsed, budget = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
checks = []


def check(name, ok, detail="", enforced=True):
    checks.append({"check": name, "ok": bool(ok), "enforced": enforced, "detail": detail})


def load(name):
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text()) if path.stat().st_size else None
    except (OSError, json.JSONDecodeError) as error:
        return {"unreadable": str(error)}


def non_finite(value, where=""):
    """Paths of every NaN/inf number inside a JSON value."""
    if isinstance(value, float) and not math.isfinite(value):
        return [where]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{where}/{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{where}[{i}]")]
    return []


steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    steps[name] = {"exit": int(rc), "seconds": int(seconds)}
    check(f"{name} ran", rc == "0", {"124": "timed out", "125": "skipped: out of time"}.get(rc, f"exit {rc}"))
results = {name: load(name) for name in steps}
env = results.get("environment") or {}
if not dry_run:
    check("a CUDA GPU is visible", env.get("cuda_available"), env.get("gpus"))

for name, value in results.items():
    bad = non_finite(value)
    check(f"{name}: no NaN or inf", not bad, bad[:5])
for name in ("train_step_gpu", "train_step_cpu", "train_step_sizes"):
    for entry in (results.get(name) or {}).get("results", []):
        for method, summary in entry["methods"].items():
            check(f"{name}: {method} at {entry['classes']} classes finite", summary.get("finite"), summary.get("loss_first_last"))
recipe = results.get("recipe") or {}
for line in recipe.get("train_log", []):
    if re.search(r"\b(nan|inf)\b", line, re.I):
        check("recipe: training log finite", False, line)
if recipe:
    check("recipe: results written", recipe.get("results"), sorted(recipe.get("results", {})))

comparisons = {"train_step_samples_per_second": {}, "loss_step_ms_median": {}}
gpu, cpu = results.get("train_step_gpu") or {}, results.get("train_step_cpu") or {}
for g_entry, c_entry in zip(gpu.get("results", []), cpu.get("results", [])):
    for method, g in g_entry["methods"].items():
        c = c_entry["methods"].get(method)
        if c:
            ratio = g["samples_per_second"] / c["samples_per_second"]
            comparisons["train_step_samples_per_second"][method] = {"gpu": g["samples_per_second"], "cpu": c["samples_per_second"],
                                                                    "gpu_over_cpu": round(ratio, 2)}
            check(f"train step {method}: GPU not slower than CPU", ratio >= 1.0, f"{ratio:.2f}x", enforced=not dry_run)
gpu, cpu = results.get("loss_step_gpu") or {}, results.get("loss_step_cpu") or {}
if gpu.get("timings") and cpu.get("timings"):
    g_times, c_times = gpu["timings"][0]["alone"], cpu["timings"][0]["alone"]
    for loss, g in g_times.items():
        speedup = c_times[loss]["ms_median"] / g["ms_median"]
        comparisons["loss_step_ms_median"][loss] = {"gpu": g["ms_median"], "cpu": c_times[loss]["ms_median"],
                                                    "cpu_over_gpu": round(speedup, 2),
                                                    "gpu_aten_ops": gpu["counts"][loss]["aten_ops_per_step"],
                                                    "gpu_host_syncs": gpu["counts"][loss]["host_syncs_per_step"]}
        check(f"loss step {loss}: GPU not slower than CPU", speedup >= 1.0, f"{speedup:.2f}x", enforced=not dry_run)
check("whole check within its time budget", elapsed <= budget, f"{elapsed} s of {budget} s")

ok = all(c["ok"] for c in checks if c["enforced"])
# The verdict comes last: a reader of the output's tail sees it first.
report = {"results": {k: v for k, v in results.items() if k != "environment"}, "steps": steps,
          "not_enforced": [c for c in checks if not c["enforced"]], "comparisons": comparisons,
          "mode": "cpu-dry-run" if dry_run else "gpu", "python": python_how, "environment": env,
          "elapsed_s": elapsed, "budget_s": budget, "checks_passed": sum(c["ok"] for c in checks if c["enforced"]),
          "failed": [c for c in checks if c["enforced"] and not c["ok"]], "ok": ok}
text = json.dumps(report, indent=1)
(out / "gpu_check.json").write_text(text)
print(text)
sys.exit(0 if ok else 1)
EOF
