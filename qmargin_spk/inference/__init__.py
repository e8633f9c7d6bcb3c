"""Using a trained model: the packaged model folder, ``SpeakerModel`` and export to ONNX / TorchScript."""
from qmargin_spk.inference.model import SpeakerModel, Verification
from qmargin_spk.inference.package import (
    MODEL_FORMAT,
    MODEL_SETTINGS,
    ModelFolderError,
    code_version,
    ecapa_settings,
    package_model,
    read_model_info,
)

__all__ = [
    "MODEL_FORMAT",
    "MODEL_SETTINGS",
    "ModelFolderError",
    "SpeakerModel",
    "Verification",
    "code_version",
    "ecapa_settings",
    "package_model",
    "read_model_info",
]
