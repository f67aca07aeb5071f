"""Audio encoders: waveform batch -> LLM-width embeddings, behind one interface (`AudioEncoder`)."""

from model.encoders.base import AudioEncoder, FrameStacker, build_encoder

__all__ = ["AudioEncoder", "FrameStacker", "build_encoder"]
