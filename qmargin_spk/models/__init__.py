"""Models: the speaker embedder and the architecture registry that builds it from a plain description."""

from qmargin_spk.models.embedder import SpeakerEmbedder, count_parameters
from qmargin_spk.models.min_input import shortest_input
from qmargin_spk.models.registry import (
    ARCHITECTURES,
    DescriptionError,
    build_backbone,
    build_embedder,
    build_frontend,
    validate_backbone,
    validate_frontend,
)

__all__ = [
    "ARCHITECTURES",
    "DescriptionError",
    "SpeakerEmbedder",
    "build_backbone",
    "build_embedder",
    "build_frontend",
    "count_parameters",
    "shortest_input",
    "validate_backbone",
    "validate_frontend",
]
