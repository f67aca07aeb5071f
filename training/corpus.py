"""Step 1, corpus text: a deduplicated English sentence set from prose that installs offline.

Sources (licences in training/SOURCES.md): WordNet example sentences, fortune cookies (quotations,
riddles), GCIDE quotations, The Devil's Dictionary, the Jargon File, questions and requests built
from WordNet lemmas, and optionally questions written by the frozen LLM. Every candidate passes
`clean_sentence`; duplicates are dropped case-insensitively; the split (train/dev/eval) is a hash
of the sentence so it never changes between runs. Sentence splitting is a small regex of our own
because NLTK's punkt needs a data download.
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
    starters = {
        "i",
        "you",
        "he",
        "she",
        "it",
        "we",
        "they",
        "the",
        "a",
        "an",
        "this",
        "that",
        "these",
        "those",
        "his",
        "her",
        "their",
        "my",
        "our",
        "your",
        "there",
        "what",
        "who",
        "how",
        "why",
        "when",
        "where",
        "do",
        "does",
        "did",
        "is",
        "are",
        "can",
        "let's",
        "don't",
        "please",
        "if",
        "after",
        "before",
        "some",
        "all",
        "many",
    }
    for pos in ("noun", "verb", "adj", "adv"):
        for line in open(wordnet_dir / f"data.{pos}", encoding="latin-1"):
            if line.startswith("  ") or "|" not in line:
                continue
            for example in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                words = example.split()
                first = words[0].lower() if words else ""
                if len(words) >= 4 and (first in starters or words[0][:1].isupper()):
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


@dataclass
class Lexicon:
    """Common WordNet lemmas and relations that fill the question and request templates."""

    nouns: list[tuple[str, str, int]]  # (noun, its hypernym, lexicographer file number)
    siblings: dict[str, list[str]]  # hypernym -> common nouns under it
    verbs: list[str]
    antonyms: list[tuple[str, str]]  # (adjective, its antonym)
    places: list[str]
    people: list[str]


def parse_wordnet(path: Path) -> dict[str, tuple[int, list[str], list[tuple[str, str]]]]:
    """offset -> (lexfile, [(lemma, lex_id)...] as 'lemma:lexid', [(pointer, target offset)])."""
    synsets = {}
    for line in open(path, encoding="latin-1"):
        if line.startswith("  "):
            continue
        f = line.split("|", 1)[0].split()
        n_words = int(f[3], 16)
        words = [f"{f[4 + 2 * i]}:{int(f[5 + 2 * i], 16)}" for i in range(n_words)]
        at = 4 + 2 * n_words
        pointers = [(f[at + 1 + 4 * i], f[at + 2 + 4 * i]) for i in range(int(f[at]))]
        synsets[f[0]] = (int(f[1]), words, pointers)
    return synsets


def read_sense_counts(wordnet_dir: Path) -> dict[str, tuple[int, int]]:
    """'lemma%ss:lexfile:lexid' -> (sense number, tagged count), from cntlist.rev."""
    counts = {}
    for line in open(wordnet_dir / "cntlist.rev", encoding="latin-1"):
        key, sense, count = line.split()
        lemma, rest = key.split("%", 1)
        ss_type, lexfile, lexid = rest.split(":")[:3]
        counts[f"{lemma}%{ss_type}:{int(lexfile)}:{int(lexid)}"] = (int(sense), int(count))
    return counts


def common_lemma(word: str, ss_type: int, lexfile: int, counts: dict, min_count: int) -> str:
    """The lemma if this is its first, frequent sense and it is plain letters, else ''."""
    lemma, lexid = word.rsplit(":", 1)
    lemma = re.sub(r"\(.*\)$", "", lemma)
    sense, count = counts.get(f"{lemma.lower()}%{ss_type}:{lexfile}:{lexid}", (0, 0))
    if sense != 1 or count < min_count or not re.fullmatch(r"[a-z]+(_[a-z]+)?", lemma):
        return ""
    return lemma.replace("_", " ")


def load_lexicon(wordnet_dir: Path, min_count: int = 3) -> Lexicon:
    """Frequent nouns (with hypernyms), verbs, antonym pairs, named places and people."""
    counts = read_sense_counts(wordnet_dir)
    nouns_db = parse_wordnet(wordnet_dir / "data.noun")
    first = {off: s[1][0].rsplit(":", 1)[0].replace("_", " ") for off, s in nouns_db.items()}
    nouns, siblings, places, people = [], {}, [], []
    for lexfile, words, pointers in nouns_db.values():
        instance_of = [t for p, t in pointers if p == "@i"]
        if instance_of and lexfile in (15, 18):
            name = max((w.rsplit(":", 1)[0] for w in words), key=lambda w: w.count("_"))
            if re.fullmatch(r"[A-Z][a-z]+(_[A-Z][a-z]+){0,2}", name):
                (places if lexfile == 15 else people).append(name.replace("_", " "))
            continue
        noun = common_lemma(words[0], 1, lexfile, counts, min_count)
        hypernyms = [t for p, t in pointers if p == "@"]
        if noun and hypernyms:
            nouns.append((noun, first[hypernyms[0]], lexfile))
            siblings.setdefault(first[hypernyms[0]], []).append(noun)
    verbs = [
        v
        for lexfile, words, _ in parse_wordnet(wordnet_dir / "data.verb").values()
        if (v := common_lemma(words[0], 2, lexfile, counts, min_count)) and " " not in v
    ]
    adj_db = parse_wordnet(wordnet_dir / "data.adj")
    antonyms = []
    for lexfile, words, pointers in adj_db.values():
        adj = common_lemma(words[0], 3, lexfile, counts, min_count)
        for p, target in pointers:
            if adj and p == "!" and target in adj_db:
                antonyms.append((adj, re.sub(r"\(.*\)$", "", adj_db[target][1][0].split(":")[0])))
    return Lexicon(nouns, siblings, verbs, antonyms, places, people)


NOUN_TEMPLATES = (
    "What is {a_n}?",
    "What does the word {n} mean?",
    "Can you explain what {a_n} is?",
    "How would you describe {a_n} to a child?",
    "Is {a_n} a kind of {h}?",
    "Please give me a short definition of {n}.",
    "Use the word {n} in a sentence, please.",
    "What is the difference between {a_n} and {a_s}?",
    "Which is bigger, {a_n} or {a_s}?",
    "Tell me something interesting about the word {n}.",
    "Why is {a_n} called {a_n}?",
)
LEXFILE_TEMPLATES = {
    5: (
        "Where does {a_n} live?",
        "What does {a_n} eat?",
        "Is {a_n} dangerous to people?",
        "How long does {a_n} usually live?",
        "Can you keep {a_n} as a pet?",
    ),
    6: (
        "What is {a_n} used for?",
        "Where can I buy {a_n}?",
        "How do you use {a_n}?",
        "Who invented the {n}?",
        "How much does {a_n} usually cost?",
        "Help me choose {a_n}.",
    ),
    13: (
        "Is {n} good for you?",
        "How do you cook {n}?",
        "What does {n} taste like?",
        "Give me a simple recipe with {n}.",
        "How should I store {n}?",
    ),
    20: ("How do I grow {a_n}?", "Does {a_n} need a lot of water?", "Is {a_n} poisonous?"),
}
VERB_TEMPLATES = (
    "What does it mean to {v}?",
    "Can you teach me how to {v}?",
    "Explain what it means to {v}.",
    "Give me an example sentence with the verb {v}.",
    "Is it hard to learn to {v}?",
    "Why do people {v}?",
    "How would you explain the verb {v} to a beginner?",
)
ADJ_TEMPLATES = (
    "What is the opposite of {j}?",
    "Is {k} the opposite of {j}?",
    "Describe something that is {j}.",
    "Give me another word for {j}.",
    "What makes something {j} rather than {k}?",
)
PLACE_TEMPLATES = (
    "Where is {p}?",
    "What is {p} known for?",
    "Tell me about the history of {p}.",
    "What is the weather usually like in {p}?",
    "How do I get to {p}?",
    "What should I see if I visit {p}?",
    "Is {p} a good place to live?",
)
PERSON_TEMPLATES = (
    "Who was {p}?",
    "What is {p} famous for?",
    "Tell me about {p}.",
    "When did {p} live?",
    "Why is {p} remembered today?",
)


def with_article(noun: str) -> str:
    """'a noun' or 'an noun' by the first letter, with the common exceptions."""
    vowel = noun[0] in "aeiou" and not noun.startswith(("uni", "use", "eu", "one", "uto"))
    return ("an " if vowel or noun.startswith(("hour", "honest", "heir")) else "a ") + noun


def fill_template(lexicon: Lexicon, rng: random.Random) -> str:
    """One question or request: a kind of template drawn by weight, slots from the lexicon."""
    kind = rng.choices(["noun", "lexfile", "verb", "adj", "place", "person"], [4, 3, 2, 1, 2, 1])[0]
    if kind in ("noun", "lexfile"):
        noun, hyper, lexfile = rng.choice(lexicon.nouns)
        templates = LEXFILE_TEMPLATES.get(lexfile, NOUN_TEMPLATES) if kind == "lexfile" else None
        sibling = rng.choice([s for s in lexicon.siblings[hyper] if s != noun] or [hyper])
        return rng.choice(templates or NOUN_TEMPLATES).format(
            n=noun, a_n=with_article(noun), h=hyper, a_s=with_article(sibling)
        )
    if kind == "verb":
        return rng.choice(VERB_TEMPLATES).format(v=rng.choice(lexicon.verbs))
    if kind == "adj":
        adj, antonym = rng.choice(lexicon.antonyms)
        return rng.choice(ADJ_TEMPLATES).format(j=adj, k=antonym)
    names, templates = (
        (lexicon.places, PLACE_TEMPLATES) if kind == "place" else (lexicon.people, PERSON_TEMPLATES)
    )
    return rng.choice(templates).format(p=rng.choice(names))


def generate_template_sentences(lexicon: Lexicon, count: int, rng: random.Random) -> Iterator[str]:
    """Up to `count` distinct template questions and requests (gives up after 20x the tries)."""
    seen: set[str] = set()
    for _ in range(20 * count):
        if len(seen) >= count:
            return
        text = fill_template(lexicon, rng)
        text = text[0].upper() + text[1:]
        if text not in seen:
            seen.add(text)
            yield text


LLM_PROMPTS = (  # SmolLM2-135M keeps to these; open-ended ones make it chat about itself
    "Write a question about {topic}. Reply with the question only.",
    "Write a question a child might ask about {topic}. Reply with the question only.",
    "Write a how-to question about {topic}. Reply with the question only.",
    "Write a question asking for advice about {topic}. Reply with the question only.",
    "Write a question about the history of {topic}. Reply with the question only.",
)
LLM_META_WORDS = ("question", "request", "assist", "chatbot", "help you")


def sample_llm_batch(llm: Any, prompts: list[str], config: CorpusConfig, seed: int) -> list[str]:
    """The LLM's replies to a batch of user prompts (chat template, left padding, seeded)."""
    import torch

    tok = llm.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chats = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = enc.to(llm.model.device)
    torch.manual_seed(seed)
    sample = config.llm_temperature > 0
    with torch.no_grad():
        out = llm.model.generate(  # [B, T_prompt + T_new]
            **enc,
            do_sample=sample,
            temperature=config.llm_temperature if sample else None,
            top_p=0.95 if sample else None,
            max_new_tokens=config.llm_max_new_tokens,
            pad_token_id=tok.pad_token_id,
        )
    tok.padding_side = side
    return tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def pick_llm_sentence(reply: str, topic: str) -> str:
    """The question in a reply (quoted, else the first one), or '' if it misses the topic."""
    quoted = re.findall(r'"([^"]+\?)"?', reply)
    pieces = split_sentences(quoted[0] if quoted else reply.replace("\n", " "))
    text = next((p.strip("\"' *") for p in pieces if p.endswith("?")), "")
    lower = text.lower()
    if topic.split()[0].lower() not in lower or any(w in lower for w in LLM_META_WORDS):
        return ""
    return text


def read_llm_cache(cache: Path) -> list[str]:
    """Sentences cached by an earlier run; a line cut short by a kill is dropped from the file."""
    rows = []
    if cache.exists():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        cache.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return [row["text"] for row in rows]


def generate_llm_sentences(llm: Any, config: CorpusConfig, cache: Path) -> Iterator[str]:
    """`config.llm_questions` LLM replies to topic prompts, each cut to one question.

    Replies are appended to `cache` (JSON Lines) as they come, so a rerun resumes; the
    sentences still pass the corpus filters afterwards, so fewer may be kept.
    """
    done = read_llm_cache(cache)
    yield from done
    if len(done) >= config.llm_questions:
        return
    if llm is None:
        from model.llm import load_llm

        llm = load_llm(config.llm)
    topics = [n for n, _, _ in load_lexicon(Path(config.wordnet_dir)).nouns]
    rng = random.Random(f"llm:{config.seed}:{len(done)}")
    bar = tqdm(total=config.llm_questions, initial=len(done), desc="corpus llm", unit=" q")
    with open(cache, "a", encoding="utf-8") as f:
        for start in range(len(done), config.llm_questions, config.llm_batch_size):
            size = min(config.llm_batch_size, config.llm_questions - start)
            chosen = [rng.choice(topics) for _ in range(size)]
            prompts = [rng.choice(LLM_PROMPTS).format(topic=topic) for topic in chosen]
            replies = sample_llm_batch(llm, prompts, config, config.seed + start)
            for prompt, topic, reply in zip(prompts, chosen, replies, strict=True):
                text = pick_llm_sentence(reply, topic)
                f.write(json.dumps({"prompt": prompt, "text": text}) + "\n")
                yield text
            f.flush()
            bar.update(size)
    bar.close()


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
