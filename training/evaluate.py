"""Evaluation against a cascade: how well does the LLM answer speech, compared with text and ASR?

For each utterance the reference is the frozen LLM's greedy answer to the true transcript. Its
perplexity is measured under (a) the typed transcript, (b) the audio end to end, (c) the cascade:
Whisper tiny.en's transcript typed into the same LLM. Lines with `"answer": "a|b"` also score
spoken-QA accuracy. Two-turn conversations mix a typed and a spoken turn both ways.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import jiwer
from tqdm import tqdm

from model.asr import WhisperASR
from model.audio import load_audio_file
from model.checkpoint import load_encoder, resolve_encoder_path
from model.decoding import SamplingParams
from model.llm import load_llm
from model.messages import Turn, audio_part_from_waveform
from model.speech_llm import SpeechLLM
from training.manifest import Utterance, read_manifest
from training.plots import plot_bars
from training.responses import COMPLETE_KEY

log = logging.getLogger(__name__)

SYSTEMS = ("text", "end-to-end", "cascade")
MAX_ANSWER_TOKENS = 96  # tokens generated for two-turn references
QA_ANSWER_TOKENS = 40  # tokens generated per spoken-QA answer; the fact comes early
TWO_TURN_PAIRS = 16  # conversations per two-turn case
QA_CELL_CHARS = 100  # characters of an answer shown in the report's table


@dataclass
class Tally:
    """Summed response NLL and token counts per system, plus QA hits."""

    nll: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SYSTEMS, 0.0))
    tokens: int = 0
    qa_hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SYSTEMS, 0))
    qa_total: int = 0
    qa_text_right: int = 0  # questions the text mode answers right
    qa_e2e_on_text_right: int = 0  # ... of which end to end also right
    per_utt: list[dict] = field(default_factory=list)
    qa_answers: list[dict] = field(default_factory=list)  # what each system said, per question

    def perplexity(self, system: str) -> float:
        return math.exp(self.nll[system] / max(1, self.tokens))


def normalize_words(text: str) -> str:
    """Lower case, punctuation removed, single spaces: the form WER and QA matching compare."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def answer_hit(response: str, answers: str) -> bool:
    """Any of the `|`-separated answers appears as a word sequence in the response."""
    words = f" {normalize_words(response)} "
    return any(f" {normalize_words(a)} " in words for a in answers.split("|") if a.strip())


def prompts_for(utt: Utterance, transcript: str, wav) -> dict[str, list]:
    return {
        "text": [{"role": "user", "content": utt.text}],
        "end-to-end": [Turn("user", (audio_part_from_waveform(wav),))],
        "cascade": [{"role": "user", "content": transcript}],
    }


def reference_answer(model: SpeechLLM, messages: list) -> tuple[str, bool]:
    """The LLM's greedy answer, and whether it ended before the token cap."""
    ids = list(model.respond_ids(messages, SamplingParams(max_new_tokens=MAX_ANSWER_TOKENS)))
    text = model.llm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    return text, len(ids) < MAX_ANSWER_TOKENS


def score_utterance(model: SpeechLLM, asr: WhisperASR, utt: Utterance, tally: Tally) -> str:
    """Score one utterance under all three systems; returns the cascade transcript."""
    wav = load_audio_file(utt.audio)
    transcript = asr.transcribe(wav)
    if utt.response is not None:
        reference, complete = utt.response, bool(utt.extra.get(COMPLETE_KEY, True))
    else:
        reference, complete = reference_answer(model, [{"role": "user", "content": utt.text}])
    prompts = prompts_for(utt, transcript, wav)
    row: dict = {"id": utt.id, "transcript": transcript, "ppl": {}}
    for system, messages in prompts.items():
        scored = model.score(messages, reference, complete)
        tally.nll[system] -= float(scored.logprobs.sum())
        row["ppl"][system] = scored.perplexity
    tally.tokens += len(scored.token_ids)
    answers = utt.extra.get("answer")
    if answers:
        said = {
            s: model.respond_text(m, max_new_tokens=QA_ANSWER_TOKENS) for s, m in prompts.items()
        }
        hits = {s: answer_hit(text, answers) for s, text in said.items()}
        tally.qa_answers.append({"id": utt.id, "question": utt.text, "answer": answers,
                                 "said": said, "hit": hits})  # fmt: skip
        tally.qa_total += 1
        for s, hit in hits.items():
            tally.qa_hits[s] += hit
        tally.qa_text_right += hits["text"]
        tally.qa_e2e_on_text_right += hits["text"] and hits["end-to-end"]
    tally.per_utt.append(row)
    return transcript


def two_turn_perplexity(
    model: SpeechLLM, utts: list[Utterance], pairs: int = TWO_TURN_PAIRS
) -> dict[str, float]:
    """Typed-then-spoken and spoken-then-typed conversations vs all-typed, as perplexities."""
    nll = {"text, text": 0.0, "text, audio": 0.0, "audio, text": 0.0}
    tokens = 0
    conversations = list(zip(utts[0::2], utts[1::2], strict=False))[:pairs]
    for first, second in tqdm(conversations, desc="two-turn", unit="conv"):
        a_wav, b_wav = load_audio_file(first.audio), load_audio_file(second.audio)
        first_answer = first.response or ""
        typed = [
            {"role": "user", "content": first.text},
            {"role": "assistant", "content": first_answer},
            {"role": "user", "content": second.text},
        ]
        reference, complete = reference_answer(model, typed)
        variants = {
            "text, text": typed,
            "text, audio": [*typed[:2], Turn("user", (audio_part_from_waveform(b_wav),))],
            "audio, text": [Turn("user", (audio_part_from_waveform(a_wav),)), *typed[1:]],
        }
        for name, messages in variants.items():
            scored = model.score(messages, reference, complete)
            nll[name] -= float(scored.logprobs.sum())
        tokens += len(scored.token_ids)
    return {k: math.exp(v / max(1, tokens)) for k, v in nll.items()}


def evaluate(
    manifest: str | Path,
    encoder: str,
    out: str | Path,
    llm: str = "default",
    split: str | None = "dev",
    limit: int | None = None,
    device: str = "cpu",
    two_turn_pairs: int = TWO_TURN_PAIRS,
    dtype: str | None = None,
    stock_cascade: bool = False,
) -> dict[str, float]:
    """Score `manifest` (one split), write `report.md` and plots into `out`, return the summary.
    `dtype`: the LLM's (None: the loader's choice for the device), e.g. to score an encoder
    against the bf16 LLM a server would run. The cascade's Whisper hears as the encoder's own
    does (same search, same LoRA adapters), so the comparison isolates the path into the LLM;
    `stock_cascade` gives it plain tiny.en instead."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_llm(llm, device=device, dtype=dtype)
    enc, prompt, training = load_encoder(resolve_encoder_path(encoder), loaded)
    model = SpeechLLM(loaded, enc, prompt)
    asr, asr_line = cascade_asr(enc.config, device, stock_cascade)
    utts = [u for u in read_manifest(manifest) if split is None or u.split == split][:limit]
    if not utts:
        raise ValueError(f"{manifest} has no utterances in split {split!r}")
    tally, refs, hyps = Tally(), [], []
    for utt in tqdm(utts, desc="evaluate", unit="utt"):
        hyps.append(normalize_words(score_utterance(model, asr, utt, tally)))
        refs.append(normalize_words(utt.text))
    summary = {f"ppl {s}": tally.perplexity(s) for s in SYSTEMS}
    summary["cascade WER"] = jiwer.wer(refs, hyps)
    summary["e2e / cascade ppl"] = summary["ppl end-to-end"] / summary["ppl cascade"]
    summary["e2e / text ppl"] = summary["ppl end-to-end"] / summary["ppl text"]
    if tally.qa_total:
        for s in SYSTEMS:
            summary[f"QA acc {s}"] = tally.qa_hits[s] / tally.qa_total
        summary["QA e2e on text-right"] = tally.qa_e2e_on_text_right / max(1, tally.qa_text_right)
    two_turn = (
        two_turn_perplexity(model, utts, two_turn_pairs)
        if len(utts) >= 2 and two_turn_pairs > 0
        else {}
    )  # none asked for: no section, not perplexities of nothing
    llm_line = f"{loaded.name} ({loaded.dtype}, {loaded.device}); cascade ASR: {asr_line}"
    write_report(
        out, manifest, encoder, llm_line, split, len(utts), summary, two_turn, tally, training
    )
    print_summary(summary, two_turn)
    return summary | {f"two-turn ppl {k}": v for k, v in two_turn.items()}


def cascade_asr(config, device: str, stock: bool) -> tuple[WhisperASR, str]:
    """The cascade's Whisper, and a line naming it: a whisper_decoder encoder's own (its search
    and any LoRA adapters) unless `stock`, else plain tiny.en searching as the encoder does."""
    own = config.kind == "whisper_decoder" and not stock
    source = config.whisper_source if own else "default"
    lora = config.whisper_lora if own else None
    asr = WhisperASR.from_source(source, device=device, beams=config.asr_beams, lora=lora)
    line = f"Whisper {source}, {config.asr_beams} beam(s)" + (f", LoRA {lora}" if lora else "")
    return asr, line


def write_report(
    out, manifest, encoder, llm_line, split, n, summary, two_turn, tally, training
) -> None:
    plot_bars(
        {s: tally.perplexity(s) for s in SYSTEMS},
        "reference-response perplexity",
        "perplexity",
        out / "perplexity.png",
    )
    lines = [
        "# speechchat evaluation",
        "",
        f"- manifest: `{manifest}` (split `{split}`, {n} utterances, "
        f"{tally.tokens} reference tokens)",
        f"- encoder: `{encoder}` (trained steps: {training.get('steps', '?')})",
        f"- LLM: {llm_line}",
        "",
        "| figure | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in summary.items()],
        "",
        "![perplexity](perplexity.png)",
        "",
    ]
    if two_turn:
        lines += [
            "## Two-turn conversations (perplexity of the all-typed reference)",
            "",
            "| turns | perplexity |",
            "| --- | --- |",
            *[f"| {k} | {v:.3f} |" for k, v in two_turn.items()],
            "",
        ]
    lines += [
        "## Per utterance",
        "",
        "| id | transcript (cascade) | text | e2e | cascade |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['id']} | {r['transcript']} | "
        + " | ".join(f"{r['ppl'][s]:.2f}" for s in SYSTEMS)
        + " |"
        for r in tally.per_utt[:200]
    ]
    if tally.qa_answers:
        lines += ["", *qa_answer_lines(tally.qa_answers)]
        with open(out / "answers.jsonl", "w") as f:
            f.writelines(json.dumps(a) + "\n" for a in tally.qa_answers)
    (out / "report.md").write_text("\n".join(lines) + "\n")


def qa_answer_lines(qa_answers: list[dict]) -> list[str]:
    """The spoken-QA section of the report: each question's answers, a hit marked ✓."""
    lines = [
        "## Spoken-QA answers (all in `answers.jsonl`)",
        "",
        "| question | expected | text | end-to-end | cascade |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a in qa_answers[:200]:
        cells = [
            ("✓ " if a["hit"][s] else "") + cell_text(a["said"][s], QA_CELL_CHARS) for s in SYSTEMS
        ]
        lines.append(
            f"| {cell_text(a['question'], 80)} | {cell_text(a['answer'], 40)} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def cell_text(text: str, limit: int) -> str:
    """`text` on one line, pipes escaped, cut to `limit` characters for a table cell."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def print_summary(summary: dict[str, float], two_turn: dict[str, float]) -> None:
    print(
        "\n".join(
            [f"{'figure':<28}{'value':>10}"]
            + [f"{k:<28}{v:>10.4f}" for k, v in summary.items()]
            + [f"{'two-turn ppl ' + k:<28}{v:>10.4f}" for k, v in two_turn.items()]
        )
    )
