"""Models: the speaker embedder (features + ECAPA-TDNN) shared by training and extraction."""
from qmargin_spk.models.embedder import SpeakerEmbedder, count_parameters

__all__ = ["SpeakerEmbedder", "count_parameters"]
