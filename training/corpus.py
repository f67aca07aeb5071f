"""Step 1, corpus text: a deduplicated English sentence set from prose that installs offline.

Sources (licences in training/SOURCES.md): WordNet example sentences, fortune cookies (quotations,
riddles), GCIDE quotations, The Devil's Dictionary, the Jargon File, questions and requests built
from WordNet lemmas, and optionally questions written by the frozen LLM. Every candidate passes
`clean_sentence`; duplicates are dropped case-insensitively; the split (train/dev/eval) is a hash
of the sentence so it never changes between runs. Sentence splitting is a small regex of our own
because NLTK's punkt needs a data download. The template source lives in `training/lexicon.py`,
the LLM source in `training/llm_questions.py`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from training.config import CorpusConfig
from training.lexicon import generate_template_sentences, load_lexicon

log = logging.getLogger(__name__)

ALLOWED = re.compile(r"^[A-Za-z0-9 .,;:!?'-]+$")
URL = re.compile(r"(https?|ftp|www\.|\.com\b|\.org\b|\.net\b|\.edu\b)", re.I)
MIXED_TOKEN = re.compile(r"[A-Za-z]\d|\d[A-Za-z]")
STRAY_QUOTE = re.compile(r"(?<![A-Za-z])'|'(?![A-Za-z])(?<!s')")  # not an apostrophe
BOUNDARY = re.compile(r"(?<=[.!?])[\"')]*\s+(?=[\"'(]*[A-Z0-9])")
ABBREVIATIONS = set(
    "mr. mrs. ms. dr. st. vs. etc. prof. jr. sr. no. mt. e.g. i.e. cf. viz. ca. gen. col. "
    "capt. lt.".split()
)
REQUEST_STARTS = (
    "let me",
    *"please tell give show explain describe help let's name list find remind set play write "
    "use teach suggest recommend read call send make turn".split(),
)
PUNCT_MAP = {
    "\u2018": "'",
    "\u2019": "'",
    "`": "'",
    "\u201c": "",
    "\u201d": "",
    '"': "",
    "\u2013": ", ",
    "\u2014": ", ",
    "\u2026": "...",
    "\t": " ",
}
MAX_UPPER_SHARE = 0.3  # of words written in capitals (headers, shouting, acronyms)
WORDNET_STARTERS = set(  # first words of a WordNet example that reads as a whole sentence
    "i you he she it we they the a an this that these those his her their my our your there "
    "what who how why when where do does did is are can let's don't please if after before "
    "some all many".split()
)


@dataclass
class Sentence:
    """One line of the sentence set."""

    id: str
    text: str
    source: str
    kind: str  # "question", "request" or "statement"
    split: str  # "train", "dev" or "eval"


@dataclass
class CorpusReport:
    """What `build_corpus` wrote, for logs and SOURCES.md."""

    path: str
    count: int
    per_source: dict[str, int]
    per_kind: dict[str, int]
    per_split: dict[str, int]
    question_share: float
    request_share: float
    rejected: int
    config_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def normalize_text(raw: str) -> str:
    """ASCII punctuation and letters, double quotes dropped, whitespace collapsed."""
    text = "".join(PUNCT_MAP.get(ch, ch) for ch in raw)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return text.strip("' ")


def clean_sentence(raw: str, min_words: int, max_words: int) -> str | None:
    """The normalised sentence if it is speakable English prose of the right length, else None."""
    text = normalize_text(raw)
    words = text.split()
    if not min_words <= len(words) <= max_words or not ALLOWED.match(text):
        return None
    if URL.search(text) or MIXED_TOKEN.search(text) or STRAY_QUOTE.search(text):
        return None
    if ".." in text or "--" in text:
        return None
    if not text[0].isupper() or text[-1] not in ".!?":
        return None
    upper = sum(1 for w in words if len(w.strip(".,;:!?'")) > 1 and w.isupper())
    if upper > MAX_UPPER_SHARE * len(words):
        return None
    return text


def sentence_key(text: str) -> str:
    """Dedup key: lower case, letters and digits only."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def classify_sentence(text: str) -> str:
    """'question' (ends in ?), 'request' (imperative or polite ask) or 'statement'."""
    if text.endswith("?"):
        return "question"
    lower = text.lower()
    if lower.startswith(REQUEST_STARTS) or " please" in lower:
        return "request"
    return "statement"


def assign_split(key: str, dev_fraction: float, eval_fraction: float) -> str:
    """train / dev / eval from a hash of the sentence key: stable across runs and machines."""
    bucket = int(hashlib.sha1(f"split:{key}".encode()).hexdigest()[:8], 16) / 16**8
    if bucket < eval_fraction:
        return "eval"
    return "dev" if bucket < eval_fraction + dev_fraction else "train"


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph; no boundary after a known abbreviation or an initial."""
    paragraph = re.sub(r"\s+", " ", paragraph).strip()
    pieces, start = [], 0
    for match in BOUNDARY.finditer(paragraph):
        last = paragraph[start : match.start()].split(" ")[-1].lower()
        if last in ABBREVIATIONS or re.fullmatch(r"[a-z]\.", last):
            continue
        pieces.append(paragraph[start : match.start()])
        start = match.end()
    pieces.append(paragraph[start:])
    return [p for p in pieces if p]


def read_wordnet_examples(wordnet_dir: Path) -> Iterator[str]:
    """Example sentences quoted in WordNet glosses that read as whole sentences."""
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(wordnet_dir / f"data.{pos}", encoding="latin-1"):
            if line.startswith("  ") or "|" not in line:
                continue
            for example in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                words = example.split()
                first = words[0].lower() if words else ""
                if len(words) >= 4 and (first in WORDNET_STARTERS or words[0][:1].isupper()):
                    text = example[0].upper() + example[1:]
                    yield text if text[-1] in ".!?" else text + "."


def read_fortunes(fortune_dir: Path, exclude: Iterable[str]) -> Iterator[str]:
    """Sentences of fortune cookies: attributions dropped, Q:/A: and speaker labels stripped."""
    skip = set(exclude)
    for path in sorted(fortune_dir.iterdir()):
        if path.suffix or path.name in skip or not path.is_file():
            continue
        for entry in path.read_text(encoding="latin-1").split("\n%\n"):
            lines = [ln.strip() for ln in entry.splitlines()]
            lines = [ln for ln in lines if ln and not ln.startswith(("--", "- ", "%"))]
            text = " ".join(re.sub(r"^(Q|A|[A-Z][A-Za-z.]{0,20}):\s+", "", ln) for ln in lines)
            yield from split_sentences(text)


def read_dict_paragraphs(path: Path) -> Iterator[tuple[int, str]]:
    """(indent, joined text) of each blank-line-separated paragraph of a dictd `.dict.dz`."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        block: list[str] = []
        for line in [*f, "\n"]:
            if line.strip():
                block.append(line.rstrip("\n"))
                continue
            if block:
                indent = len(block[0]) - len(block[0].lstrip(" "))
                yield indent, " ".join(ln.strip() for ln in block)
                block = []


def read_dict_prose(dictd_dir: Path, name: str) -> Iterator[str]:
    """Sentences of one dictd dictionary: gcide quotations, devil and jargon prose."""
    for indent, text in read_dict_paragraphs(dictd_dir / f"{name}.dict.dz"):
        if name == "gcide":
            if indent < 8:
                continue  # definitions are fragments; the indented blocks are quotations
            text = re.sub(r"\[1913 Webster\]|\[[A-Z][A-Za-z. ]*\]", "", text)
            text = re.sub(r"\s*--\s*[A-Z][^.]*\.?\s*$", "", text)
        elif name == "devil":
            if indent > 0:
                continue  # verse
            text = re.sub(r"^[A-Z][A-Z' -]*,\s*[a-z. ]{1,12}\.\s+", "", text)
        elif name == "jargon":
            if indent != 4:
                continue
            text = re.sub(r"\[[^\]]*\]", "", text).replace("{", "").replace("}", "")
        yield from split_sentences(text)


def read_source(name: str, config: CorpusConfig) -> Iterator[str]:
    """Raw candidate sentences of one named source."""
    if name == "wordnet":
        yield from read_wordnet_examples(Path(config.wordnet_dir))
    elif name == "fortunes":
        yield from read_fortunes(Path(config.fortune_dir), config.fortune_exclude)
    elif name in ("gcide", "devil", "jargon"):
        yield from read_dict_prose(Path(config.dictd_dir), name)
    elif name == "templates":
        lexicon = load_lexicon(Path(config.wordnet_dir))
        rng = random.Random(f"templates:{config.seed}")
        yield from generate_template_sentences(lexicon, config.template_sentences, rng)
    else:
        raise ValueError(f"unknown corpus source {name!r}")


def hash_config(config: CorpusConfig) -> str:
    """Short hash of a config, stored in the report so a rerun with the same config is skipped."""
    return hashlib.sha1(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:12]


def keep_sample(items: list[tuple[str, str]], cap: int) -> list[tuple[str, str]]:
    """At most `cap` (text, key) pairs, chosen by a hash of the key so every run keeps the same."""
    if not cap or len(items) <= cap:
        return items
    return sorted(items, key=lambda item: hashlib.sha1(f"cap:{item[1]}".encode()).digest())[:cap]


def collect_sentences(
    sources: dict[str, Iterable[str]], config: CorpusConfig
) -> tuple[list[Sentence], int]:
    """Filtered, deduplicated sentences from named streams of candidates; and the reject count."""
    seen: set[str] = set()
    sentences: list[Sentence] = []
    rejected = 0
    for name, stream in sources.items():
        fresh: dict[str, str] = {}
        for raw in tqdm(stream, desc=f"corpus {name}", unit=" cand", leave=False):
            text = clean_sentence(raw, config.min_words, config.max_words)
            key = sentence_key(text) if text else ""
            if not text or key in seen or key in fresh:
                rejected += 1
                continue
            fresh[key] = text
        kept = keep_sample([(t, k) for k, t in fresh.items()], config.max_per_source.get(name, 0))
        for text, key in kept:
            seen.add(key)
            sentence_id = "s" + hashlib.sha1(key.encode()).hexdigest()[:12]
            split = assign_split(key, config.dev_fraction, config.eval_fraction)
            sentences.append(Sentence(sentence_id, text, name, classify_sentence(text), split))
    return sorted(sentences, key=lambda s: s.id), rejected


def summarize_corpus(path: Path, sentences: list[Sentence], rejected: int) -> CorpusReport:
    """Counts and shares of a sentence set."""
    kinds = Counter(s.kind for s in sentences)
    total = max(len(sentences), 1)
    return CorpusReport(
        path=str(path),
        count=len(sentences),
        per_source=dict(Counter(s.source for s in sentences)),
        per_kind=dict(kinds),
        per_split=dict(Counter(s.split for s in sentences)),
        question_share=round(kinds["question"] / total, 4),
        request_share=round(kinds["request"] / total, 4),
        rejected=rejected,
    )


def write_sentences(path: Path, sentences: list[Sentence]) -> None:
    """Sentence set as JSON Lines, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for s in sentences:
            f.write(json.dumps(asdict(s)) + "\n")
    tmp.replace(path)


def read_sentences(path: str | Path) -> list[Sentence]:
    """A sentence set written by `build_corpus`; a `.txt` file gives one sentence a line."""
    path = Path(path)
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        out = []
        for text in filter(None, lines):
            key = sentence_key(text)
            sid = "s" + hashlib.sha1(key.encode()).hexdigest()[:12]
            out.append(Sentence(sid, text, "file", classify_sentence(text), "train"))
        return out
    with open(path, encoding="utf-8") as f:
        return [Sentence(**json.loads(line)) for line in f if line.strip()]


def build_corpus(
    out_path: str | Path,
    config: CorpusConfig | None = None,
    llm: Any | None = None,
    force: bool = False,
) -> CorpusReport:
    """Build the sentence set and write it to `out_path` (JSON Lines: id, text, source, kind,
    split).

    Sources are `config.sources` plus, when `config.llm_questions > 0`, questions written by the
    frozen LLM (`llm`, or `model.llm.load_llm(config.llm)`; its output is cached next to
    `out_path` so an interrupted run resumes). A report is written to `<out_path>.report.json`;
    if it matches this config and the set exists, nothing is rebuilt unless `force`.
    """
    config = config or CorpusConfig()
    out_path = Path(out_path)
    report_path = out_path.with_name(out_path.name + ".report.json")
    if not force and out_path.exists() and report_path.exists():
        saved = json.loads(report_path.read_text())
        if saved.get("config_hash") == hash_config(config):
            log.info("corpus %s is up to date (%d sentences)", out_path, saved["count"])
            return CorpusReport(**saved)
    sources: dict[str, Iterable[str]] = {n: read_source(n, config) for n in config.sources}
    if config.llm_questions > 0:
        # deferred: llm_questions imports split_sentences from this module
        from training.llm_questions import generate_llm_sentences

        cache = out_path.with_name(out_path.name + ".llm.jsonl")
        sources["llm"] = generate_llm_sentences(llm, config, cache)
    sentences, rejected = collect_sentences(sources, config)
    write_sentences(out_path, sentences)
    report = summarize_corpus(out_path, sentences, rejected)
    report.config_hash = hash_config(config)
    report_path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    log.info(
        "corpus: %d sentences, %.1f%% questions, %.1f%% requests -> %s",
        report.count,
        100 * report.question_share,
        100 * report.request_share,
        out_path,
    )
    return report
