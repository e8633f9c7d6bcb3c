"""Using a trained model: the packaged model folder, ``SpeakerModel`` and export to ONNX / TorchScript.

Names are imported on first use, so that ``qmargin_spk.inference.onnx_runtime`` can be
imported (and run) without torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SpeakerModel": "model",
    "Verification": "model",
    "MODEL_FORMAT": "package",
    "ModelFolderError": "package",
    "code_version": "package",
    "model_description": "package",
    "package_model": "package",
    "read_model_info": "package",
    "export_onnx": "export",
    "export_torchscript": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
