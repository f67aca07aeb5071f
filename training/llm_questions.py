"""Questions written by the frozen LLM: the optional `llm` corpus source.

The frozen chat LLM is asked for one question about a common WordNet noun; each reply is cut to that
question and dropped if it misses the topic or talks about itself. Replies are cached as JSON
Lines as they come, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from training.config import CorpusConfig
from training.corpus import split_sentences
from training.lexicon import load_lexicon

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
