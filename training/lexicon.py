"""WordNet lexicon and templates: the `templates` corpus source of questions and requests.

Frequent first-sense lemmas (by the tagged counts in `cntlist.rev`) with their hypernyms, common
verbs, antonym pairs, and named places and people fill fixed templates; every draw comes from the
caller's seeded RNG, so a rerun writes the same sentences.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


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
