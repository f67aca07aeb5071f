"""Pull a trained `whisper_decoder` encoder part of the way back to its untrained start.

Its correction is trained on the LLM's answers in the training voices; past a point it fits them
by moving the spoken words' embeddings away from the typed words' ones, which costs answers that
hinge on a content word. Scaling the correction by a factor below 1 (a point on the line between
the start and the trained weights, as weight-space ensembles of a model and its fine-tuned copy
do) keeps most of the gain on the answers and less of the drift. Pick the factor on the dev loss
and on spoken questions in training voices, never on reserved voices. The same step can set how
widely Whisper searches (`asr_beams`), which needs no training either, and which Whisper hears:
stock tiny.en or one adapted to the corpus's voices (`whisper_lora`, from `speechchat tune-asr`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from model.checkpoint import load_encoder, resolve_encoder_path, save_encoder
from model.llm import load_llm

log = logging.getLogger(__name__)


def scale_correction(
    encoder: str,
    scale: float,
    out: str | Path,
    llm: str = "default",
    asr_beams: int | None = None,
    whisper_lora: str | Path | None = None,
) -> Path:
    """The encoder checkpoint `encoder` (a directory or "default") with its correction weighted
    by `scale` (and Whisper searching `asr_beams` beams, and Whisper adapted by the LoRA folder
    `whisper_lora`, where given), written to `out`; its config keeps the training record, with
    the scale, the search, the adapters' record and the source added."""
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"scale is a fraction of the trained correction (0 to 1), not {scale}")
    loaded = load_llm(llm)
    source = resolve_encoder_path(encoder)
    enc, prompt, training = load_encoder(source, loaded, device="cpu")
    if enc.config.kind != "whisper_decoder":
        raise ValueError(f"only a whisper_decoder encoder has a correction to scale, not "
                         f"{enc.config.kind}")  # fmt: skip
    enc.scale_correction(scale)
    record = {
        **training,
        "correction_scale": scale * training.get("correction_scale", 1.0),
        "scaled_from": str(encoder),
    }
    if asr_beams is not None:
        enc.config = dataclasses.replace(enc.config, asr_beams=asr_beams)  # checked there
        record["asr_beams"] = asr_beams
    if whisper_lora is not None:
        lora = Path(whisper_lora).resolve()
        if not (lora / "adapter_config.json").is_file():
            raise ValueError(f"{whisper_lora} holds no LoRA adapters (run `speechchat tune-asr`)")
        enc.config = dataclasses.replace(enc.config, whisper_lora=str(lora))
        tuned = lora / "training.json"
        record["whisper_lora"] = json.loads(tuned.read_text()) if tuned.is_file() else str(lora)
    path = save_encoder(out, enc, loaded.identity, prompt, record)
    log.info("%s: the correction of %s weighted by %.3f", path, encoder, scale)
    return path
