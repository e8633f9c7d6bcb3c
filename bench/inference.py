"""Inference speed of the packaged model: PyTorch eager, TorchScript, ONNX Runtime fp32 and int8; prints JSON.

    python bench/inference.py [--models demo_cpu vox2_ecapa_c512 ... campplus_demo] [--threads 1 2] [--repeats 2]

For each architecture (random weights: speed does not depend on them; ECAPA-TDNN at the demo size and
C = 512 / 1024, ResNet34 and CAM++ at full and demo size) the model is composed from its experiment
file, packaged, exported, and timed on

* ``rtf``: one utterance of ``--seconds`` (6 s) at 1 and 2 threads; real-time factor =
  compute time / audio duration (lower is faster);
* ``embeddings_per_second``: batches of ``--batch`` (8) utterances of 2 s, at 1 and 2 threads;
* ``macs_2s``: multiply-accumulates of one forward pass on 2 s of audio, counted with
  ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2: convolutions and matrix products,
  so the front-end's mel matrix product is in and its STFT is not; elementwise operations are not counted).

Times are the best of ``--repeats`` runs after one warm-up: the machine is shared, and
the minimum is the least disturbed by other load (reported as ``load_average``).
Targets: ONNX Runtime no slower than eager PyTorch; single-thread RTF <= 0.05 for C = 512.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qmargin_spk.inference import SpeakerModel, export_onnx, export_torchscript, package_model
from qmargin_spk.inference.onnx_runtime import OnnxSpeakerModel

REPO = Path(__file__).resolve().parents[1]
ECAPA = "vox2_ecapa_qmargin.yaml"
ARCHITECTURES = {  # name -> (experiment file under hparams/, overrides)
    "demo_cpu": (ECAPA, {"channels": 128, "attention_channels": 64, "embedding_dim": 128}),
    "vox2_ecapa_c512": (ECAPA, {"channels": 512, "attention_channels": 128, "embedding_dim": 192}),
    "vox2_ecapa_c1024": (ECAPA, {"channels": 1024, "attention_channels": 128, "embedding_dim": 192}),
    "resnet34": ("vox2_resnet34_qmargin.yaml", {}),
    "resnet34_demo": ("demo_cpu_resnet34_qmargin.yaml", {}),
    "campplus": ("vox2_campplus_qmargin.yaml", {}),
    "campplus_demo": ("demo_cpu_campplus_qmargin.yaml", {}),
}
SAMPLE_RATE = 16000
BATCH_SECONDS = 2


def random_model(experiment: str, settings: dict, folder: Path) -> SpeakerModel:
    """Package a randomly initialised model of the experiment file with these overrides and load it."""
    from qmargin_spk.stages.experiment import composed_hparams

    hparams = composed_hparams(REPO / "hparams" / experiment, overrides=settings)
    weights = hparams["embedding_model"].state_dict()
    folder = package_model(
        folder / "model", hparams["frontend_description"], hparams["backbone_description"], weights, {}
    )
    return SpeakerModel.from_folder(folder)


def macs_2s(model: SpeakerModel) -> int:
    """Multiply-accumulates of one forward pass on one 2 s utterance (FlopCounterMode FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    wav = 0.1 * torch.randn(1, BATCH_SECONDS * SAMPLE_RATE)
    with FlopCounterMode(display=False) as counter:
        model.embed_batch(wav, torch.ones(1))
    return counter.get_total_flops() // 2


def best_time(run, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def runners(model: SpeakerModel, files: dict, threads: int) -> dict:
    """``name -> function(wavs [B, T] numpy) -> embeddings`` for every runtime, at ``threads`` threads."""
    torch.set_num_threads(threads)
    scripted = torch.jit.load(str(files["torchscript"]))

    def eager(wavs):
        return model.embed_batch(torch.from_numpy(wavs), torch.ones(len(wavs)))

    def torchscript(wavs):
        with torch.no_grad():
            return scripted(torch.from_numpy(wavs))

    onnx_fp32 = OnnxSpeakerModel(files["onnx"], threads=threads)
    onnx_int8 = OnnxSpeakerModel(files["int8"], threads=threads)
    return {
        "pytorch_eager": eager,
        "torchscript": torchscript,
        "onnxruntime_fp32": onnx_fp32.embed_batch,
        "onnxruntime_int8": onnx_int8.embed_batch,
    }


def bench_architecture(name: str, args: argparse.Namespace, scratch: Path) -> dict:
    experiment, settings = ARCHITECTURES[name]
    model = random_model(experiment, settings, scratch / name)
    start = time.perf_counter()
    files = {
        "onnx": export_onnx(model, scratch / name / "m.onnx"),
        "int8": export_onnx(model, scratch / name / "m.int8.onnx", quantize="int8"),
        "torchscript": export_torchscript(model, scratch / name / "m.pt"),
    }
    export_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    single = (0.1 * rng.normal(size=(1, int(args.seconds * SAMPLE_RATE)))).astype(np.float32)
    batch = (0.1 * rng.normal(size=(args.batch, BATCH_SECONDS * SAMPLE_RATE))).astype(np.float32)
    result = {
        "experiment": experiment,
        "settings": settings,
        "architecture": model.info["backbone"],
        "parameters": sum(p.numel() for p in model.embedder.parameters()),
        "macs_2s": macs_2s(model),
        "export_seconds": round(export_seconds, 1),
        "rtf": {},
        "embeddings_per_second": {},
        "int8_cosine_to_fp32_min": None,
    }
    for threads in args.threads:
        for runtime, run in runners(model, files, threads).items():
            rtf = best_time(lambda: run(single), args.repeats) / args.seconds
            per_second = args.batch / best_time(lambda: run(batch), args.repeats)
            result["rtf"].setdefault(runtime, {})[f"{threads}_thread"] = round(rtf, 5)
            result["embeddings_per_second"].setdefault(runtime, {})[f"{threads}_thread"] = round(per_second, 2)
            if runtime == "onnxruntime_int8" and threads == 1:
                reference = eager_embeddings(model, batch)
                quantised = np.asarray(run(batch), dtype=np.float64)
                result["int8_cosine_to_fp32_min"] = round(float(min_cosine(reference, quantised)), 6)
    eager, onnx = result["rtf"]["pytorch_eager"], result["rtf"]["onnxruntime_fp32"]
    result["onnx_not_slower_than_eager"] = {t: onnx[t] <= eager[t] for t in eager}
    return result


def eager_embeddings(model: SpeakerModel, wavs: np.ndarray) -> np.ndarray:
    return model.embed_batch(torch.from_numpy(wavs), torch.ones(len(wavs))).double().numpy()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.sum(a * b, axis=1).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(ARCHITECTURES), default=list(ARCHITECTURES))
    parser.add_argument("--seconds", type=float, default=6.0, help="utterance length for the RTF")
    parser.add_argument("--batch", type=int, default=8, help=f"utterances of {BATCH_SECONDS} s per batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts to time")
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        results = {name: bench_architecture(name, args, Path(scratch)) for name in args.models}
    c512 = results.get("vox2_ecapa_c512")
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
                "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                "note": "best of repeats after a warm-up; the machine was loaded by other users, so absolute numbers "
                "are pessimistic and ratios between runtimes are the meaningful part",
                "torch": torch.__version__,
                "onnxruntime": __import__("onnxruntime").__version__,
                "seconds_per_rtf_utterance": args.seconds,
                "batch": f"{args.batch} x {BATCH_SECONDS} s",
                "macs": "torch.utils.flop_counter.FlopCounterMode on one 2 s utterance, MACs = FLOPs / 2",
                "targets": {
                    "onnx_rtf_not_above_eager": all(
                        all(r["onnx_not_slower_than_eager"].values()) for r in results.values()
                    ),
                    "c512_single_thread_rtf_onnx": None
                    if c512 is None
                    else c512["rtf"]["onnxruntime_fp32"].get("1_thread"),
                    "c512_single_thread_rtf_eager": None
                    if c512 is None
                    else c512["rtf"]["pytorch_eager"].get("1_thread"),
                    "c512_single_thread_rtf_target": 0.05,
                },
                "total_seconds": round(time.perf_counter() - started, 1),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
