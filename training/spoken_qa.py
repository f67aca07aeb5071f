"""A small spoken-QA set: short factual questions with accepted answers, synthesized on demand.

Lines carry `"answer": "a|b"`, which `evaluate` turns into spoken-QA accuracy for the typed
question, the audio end to end and the cascade. Spoken by the voices reserved for evaluation
(the default), or by a recipe's dev voices (`split="dev"`) for choosing between encoders.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from training.engines import SYNTHESIZERS, split_voice
from training.manifest import Utterance, write_manifest

log = logging.getLogger(__name__)

EVAL_VOICES = ("flite:slt", "festival:cmu_us_slt_arctic_hts")

QA_PAIRS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of England?", "london"),
    ("What is the capital of Russia?", "moscow"),
    ("What is the capital of China?", "beijing"),
    ("What is the capital of Egypt?", "cairo"),
    ("What is the capital of Greece?", "athens"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What colour is grass?", "green"),
    ("What colour is a ripe banana?", "yellow"),
    ("What colour is fresh snow?", "white"),
    ("How many days are there in a week?", "seven|7"),
    ("How many months are there in a year?", "twelve|12"),
    ("How many hours are there in a day?", "twenty-four|twenty four|24"),
    ("How many legs does a spider have?", "eight|8"),
    ("How many continents are there on Earth?", "seven|7"),
    ("How many sides does a triangle have?", "three|3"),
    ("What planet do we live on?", "earth"),
    ("Which planet is known as the red planet?", "mars"),
    ("What is the largest planet in our solar system?", "jupiter"),
    ("What star is closest to the Earth?", "sun"),
    ("What do bees make?", "honey"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("What is the largest mammal in the world?", "blue whale|whale"),
    ("What is a baby cat called?", "kitten"),
    ("What is a baby dog called?", "puppy"),
    ("What gas do plants take in from the air?", "carbon dioxide|co2"),
    ("What is frozen water called?", "ice"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("Who painted the Mona Lisa?", "leonardo|da vinci"),
    ("What language is spoken in Brazil?", "portuguese"),
    ("What is the opposite of night?", "day"),
    ("What is the opposite of up?", "down"),
    ("What animal is known as the king of the jungle?", "lion"),
    ("What is the tallest animal in the world?", "giraffe"),
    ("What do you call a shape with four equal sides?", "square"),
    ("What is the boiling point of water in Celsius?", "100|one hundred"),
)


def synthesize_spoken_qa(
    out_dir: str | Path,
    voices: tuple[str, ...] = EVAL_VOICES,
    limit: int | None = None,
    split: str = "eval",
) -> Path:
    """Render the questions (the first `limit`) in every voice (any engine of
    `training.engines`, at its own rate and pitch) to `<out_dir>/qa/*.wav`; write
    `<out_dir>/qa.jsonl` with every line in `split`."""
    if split != "eval" and set(voices) & set(EVAL_VOICES):
        raise ValueError(f"the reserved voices {EVAL_VOICES} speak only the eval split")
    out_dir = Path(out_dir)
    (out_dir / "qa").mkdir(parents=True, exist_ok=True)
    utterances = []
    for voice in voices:
        engine, name = split_voice(voice)
        pairs = QA_PAIRS[:limit]
        for i, (question, answer) in enumerate(tqdm(pairs, desc=f"qa {voice}", unit="q")):
            safe = name.replace("+", "-").replace("/", "-")
            wav = out_dir / "qa" / f"qa{i:03d}-{engine}-{safe}.wav"
            if not wav.is_file():
                SYNTHESIZERS[engine](question, name, wav)
            utterances.append(
                Utterance(
                    id=wav.stem,
                    audio=str(wav),
                    text=question,
                    voice=voice,
                    split=split,
                    extra={"answer": answer},
                )
            )
    return write_manifest(out_dir / "qa.jsonl", utterances)
