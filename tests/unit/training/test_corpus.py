"""Corpus text: filters, splitting, dedup, splits, templates and the LLM cache, on fixture sources
the test writes in the installed packages' own formats (and on the real packages when present)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from training.config import CorpusConfig
from training.corpus import (
    assign_split,
    build_corpus,
    classify_sentence,
    clean_sentence,
    read_sentences,
    sentence_key,
    split_sentences,
)
from training.lexicon import generate_template_sentences, load_lexicon
from training.llm_questions import generate_llm_sentences

WORDNET_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by Princeton
00002000 05 n 01 animal 0 000 | a living organism; "the animal ran into the woods"
00001740 05 n 01 dog 0 001 @ 00002000 n 0000 | a domestic animal; "the dog barked all night"
00003000 05 n 01 cat 0 001 @ 00002000 n 0000 | a small feline; "The cat sat on the mat."
00007000 15 n 01 city 0 000 | a large town; "a city"
00006000 15 n 01 Paris 0 001 @i 00007000 n 0000 | the capital of France
00008000 18 n 02 Einstein 0 Albert_Einstein 0 001 @i 00009000 n 0000 | a physicist
00009000 18 n 01 physicist 0 000 | a scientist; "able to swim"
"""
WORDNET_VERB = '00004000 29 v 01 run 0 000 01 + 02 00 | move fast; "she runs every morning"\n'
WORDNET_ADJ = """\
00005000 00 a 01 hot 0 001 ! 00005100 a 0101 | high in temperature; "we had a hot day"
00005100 00 a 01 cold 0 001 ! 00005000 a 0101 | low in temperature; "it is cold in here"
"""
CNTLIST = "animal%1:05:00:: 1 50\ndog%1:05:00:: 1 42\ncat%1:05:00:: 1 30\nrun%2:29:00:: 1 10\n"
CNTLIST += "hot%3:00:00:: 1 10\ncold%3:00:00:: 1 9\n"
FORTUNES = """\
Q: Why did the chicken cross the road?
A: To get to the other side.
%
THE DOG BARKED ALL NIGHT.
%
Visit http://example.com for more fortunes today.
%
Please remember to water the plants on Tuesday.  Dr. Smith said so.
		-- Anonymous
%
"""
DEVIL = """\
ABSENT, adj.  Peculiarly exposed to the tooth of detraction.  Vilified.

    A verse line that is indented
    and therefore skipped entirely.
"""


def write_sources(root: Path) -> CorpusConfig:
    wordnet, fortunes, dictd = root / "wordnet", root / "fortunes", root / "dictd"
    for folder in (wordnet, fortunes, dictd):
        folder.mkdir(parents=True)
    (wordnet / "data.noun").write_text(WORDNET_NOUN)
    (wordnet / "data.verb").write_text(WORDNET_VERB)
    (wordnet / "data.adj").write_text(WORDNET_ADJ)
    (wordnet / "data.adv").write_text("")
    (wordnet / "cntlist.rev").write_text(CNTLIST)
    (fortunes / "misc").write_text(FORTUNES)
    (fortunes / "misc.dat").write_bytes(b"\x00binary index")
    with gzip.open(dictd / "devil.dict.dz", "wt") as f:
        f.write(DEVIL)
    return CorpusConfig(
        sources=("wordnet", "fortunes", "devil", "templates"),
        max_per_source={},
        template_sentences=12,
        wordnet_dir=str(wordnet),
        fortune_dir=str(fortunes),
        dictd_dir=str(dictd),
    )


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  The cat   sat on the mat . ", "The cat sat on the mat."),
        ("\u201cWhat\u2019s up, doc?\u201d", "What's up, doc?"),
        ("Too short.", None),
        ("the lower case start is rejected here.", None),
        ("No terminal punctuation here at all", None),
        ("See www.example.org for the whole story.", None),
        ("Load the mp3 files before noon.", None),
        ("THIS IS ALL SHOUTING TODAY.", None),
        ("Curly {braces} are not speakable.", None),
        ("Trailing dots go nowhere...", None),
        (" ".join(["word"] * 30) + ".", None),  # no capital
        ("Word " + " ".join(["word"] * 29) + ".", "Word " + " ".join(["word"] * 29) + "."),
        ("Word " + " ".join(["word"] * 30) + ".", None),
    ],
)
def test_clean_sentence(raw: str, expected: str | None) -> None:
    assert clean_sentence(raw, 3, 30) == expected


def test_split_sentences_respects_abbreviations_and_quotes() -> None:
    text = 'Dr. Smith came home. "Is it late?" she asked. J. R. R. Tolkien wrote it. Done!'
    assert split_sentences(text) == [
        "Dr. Smith came home.",
        '"Is it late?" she asked.',
        "J. R. R. Tolkien wrote it.",
        "Done!",
    ]


def test_classify_and_key() -> None:
    assert classify_sentence("Where is the station?") == "question"
    assert classify_sentence("Tell me a story.") == "request"
    assert classify_sentence("Could you close the door, please.") == "request"
    assert classify_sentence("The sky is blue.") == "statement"
    assert sentence_key("Hello, World!") == sentence_key("hello world")


def test_split_is_stable_and_near_its_fractions() -> None:
    keys = [f"sentence number {i}" for i in range(4000)]
    splits = [assign_split(k, 0.1, 0.05) for k in keys]
    assert splits == [assign_split(k, 0.1, 0.05) for k in keys]
    assert 0.07 < splits.count("dev") / len(keys) < 0.13
    assert 0.03 < splits.count("eval") / len(keys) < 0.07


def test_build_corpus_from_fixture_sources(tmp_path: Path) -> None:
    config = write_sources(tmp_path / "src")
    out = tmp_path / "corpus" / "sentences.jsonl"
    report = build_corpus(out, config)
    sentences = read_sentences(out)
    texts = [s.text for s in sentences]
    assert report.count == len(sentences) == len(set(texts))
    assert "The dog barked all night." in texts  # wordnet example, capitalised and closed
    assert "Why did the chicken cross the road?" in texts  # Q: label stripped
    assert "Dr. Smith said so." in texts and "Vilified." not in texts  # one word: too short
    assert "Peculiarly exposed to the tooth of detraction." in texts  # headword stripped
    assert not any("http" in t or "indented" in t or "Able to swim" in t for t in texts)
    keys = [sentence_key(t) for t in texts]
    assert len(keys) == len(set(keys))  # the shouted duplicate fortune was rejected
    for s in sentences:
        assert clean_sentence(s.text, 3, 30) == s.text
        assert s.kind == classify_sentence(s.text) and s.split in ("train", "dev", "eval")
    templates = [s for s in sentences if s.source == "templates"]
    assert len(templates) == 12 and all(s.kind in ("question", "request") for s in templates)
    saved = json.loads((tmp_path / "corpus" / "sentences.jsonl.report.json").read_text())
    assert saved["count"] == report.count and 0 < saved["question_share"] < 1
    mtime = out.stat().st_mtime_ns
    assert build_corpus(out, config).count == report.count and out.stat().st_mtime_ns == mtime
    build_corpus(out, replace(config, template_sentences=5))  # a new config rebuilds
    assert sum(s.source == "templates" for s in read_sentences(out)) == 5


def test_templates_fill_every_slot(tmp_path: Path) -> None:
    config = write_sources(tmp_path)
    lexicon = load_lexicon(Path(config.wordnet_dir))
    assert ("dog", "animal", 5) in lexicon.nouns and lexicon.siblings["animal"] == ["dog", "cat"]
    assert lexicon.verbs == ["run"] and ("hot", "cold") in lexicon.antonyms
    assert lexicon.places == ["Paris"] and lexicon.people == ["Albert Einstein"]
    out = list(generate_template_sentences(lexicon, 40, random.Random(0)))
    assert len(out) == len(set(out)) > 20
    assert all("{" not in t and t[0].isupper() and t[-1] in "?." for t in out)


def test_llm_cache_resumes_without_loading_a_model(tmp_path: Path) -> None:
    cache = tmp_path / "llm.jsonl"
    rows = [{"prompt": "p", "text": "What is a dog?"}, {"prompt": "p", "text": ""}]
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "cut sh')
    config = CorpusConfig(llm_questions=2, llm="no-such-model")
    assert list(generate_llm_sentences(None, config, cache)) == ["What is a dog?", ""]
    assert len(cache.read_text().splitlines()) == 2  # the line a kill cut short is gone


@pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").exists()
    or not Path("/usr/share/games/fortunes/fortunes").exists(),
    reason="Debian wordnet-base and fortunes not installed",
)
def test_real_sources_yield_thousands(tmp_path: Path) -> None:
    config = CorpusConfig(sources=("wordnet", "fortunes"), max_per_source={})
    report = build_corpus(tmp_path / "s.jsonl", config)
    assert report.per_source["wordnet"] > 20000 and report.per_source["fortunes"] > 10000
    assert report.per_kind["question"] > 1000


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("model.llm") is None, reason="model.llm missing")
def test_llm_writes_questions(tmp_path: Path) -> None:
    config = write_sources(tmp_path / "src")
    config = replace(config, sources=(), llm_questions=16, llm_batch_size=16)
    report = build_corpus(tmp_path / "s.jsonl", config)
    questions = read_sentences(tmp_path / "s.jsonl")
    assert report.per_source.get("llm", 0) >= 1
    assert all(q.text.endswith("?") and q.source == "llm" for q in questions)
    lines = (tmp_path / "s.jsonl.llm.jsonl").read_text().splitlines()
    assert len(lines) == 16
