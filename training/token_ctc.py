"""Token CTC: the frozen LLM's tokens classified from an adapter's LLM-width outputs by cosine
similarity to the LLM's own input embeddings, so each spoken token is pulled towards the embedding
of the same token typed. `pretrain-ctc --encoder-kind whisper` trains on it alone before
alignment; `align --ctc-weight` keeps it beside the response loss (the words stay legible while
the answers are learned).

Dims: B rows, T embeddings, D LLM width, V' corpus tokens (+ blank at 0).
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import torch
from torch import nn

from model.llm import LoadedLLM
from training.batches import PromptFrame, encode_batch

log = logging.getLogger(__name__)

BLANK = 0
INIT_SCALE = 10.0  # cosine-logit scale the token head starts from (learned)
NORM_WEIGHT = 0.1  # weight of the pull of output norms to the embedding table's mean norm


class TokenHead(nn.Module):
    """Cosine similarity of adapter outputs to the frozen LLM's input embeddings of the corpus's
    tokens, plus a learned blank; the norms of the outputs are pulled to the table's mean norm.

    Dims: B rows, T embeddings, D LLM width, V' corpus tokens (+ blank at 0)."""

    def __init__(self, table: torch.Tensor, vocab: list[int]) -> None:
        super().__init__()
        rows = table[torch.tensor(vocab)].float()  # [V', D]
        self.register_buffer("rows", nn.functional.normalize(rows, dim=-1))  # [V', D]
        self.blank = nn.Parameter(rows.mean(dim=0))  # [D]
        self.log_scale = nn.Parameter(torch.tensor(math.log(INIT_SCALE)))
        self.target_norm = float(table.float().norm(dim=-1).mean())
        self.last_norm_penalty: torch.Tensor | float = 0.0

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """emb [B, T, D], lengths [B] -> log-probs [B, T, 1 + V'] float32."""
        emb = emb.float()
        classes = torch.cat([nn.functional.normalize(self.blank, dim=-1)[None], self.rows])
        logits = nn.functional.normalize(emb, dim=-1) @ classes.T * self.log_scale.exp()
        valid = torch.arange(emb.shape[1], device=emb.device)[None] < lengths[:, None]  # [B, T]
        norms = emb.norm(dim=-1)[valid]  # [valid frames]
        self.last_norm_penalty = ((norms - self.target_norm) / self.target_norm).square().mean()
        return logits.log_softmax(dim=-1)  # [B, T, 1 + V']


class TokenTask:
    """The frozen LLM's tokens, classified from the encoder's LLM-width outputs against the LLM's
    own input embeddings: each spoken token is pulled towards the embedding of the typed token
    (Wav2Prompt / LegoSLM-style), so alignment starts from embeddings the LLM can read."""

    name = "llm_tokens"

    def __init__(
        self, llm: LoadedLLM, texts: list[str], system_prompt: str | None, min_count: int = 1
    ) -> None:
        self.llm = llm
        self.frame = PromptFrame.build(llm, system_prompt)
        self.cache: dict[str, list[int]] = {}
        counts = Counter(i for t in texts for i in self.turn_ids(t))
        vocab = sorted(i for i, n in counts.items() if n >= min_count)
        log.info(
            "token CTC over %d of the LLM's tokens (seen >= %d times; %.1f%% of target tokens)",
            len(vocab),
            min_count,
            100 * sum(counts[i] for i in vocab) / max(1, sum(counts.values())),
        )
        self.class_of = {tok: c + 1 for c, tok in enumerate(vocab)}
        self.token_of = dict(enumerate(vocab, start=1))
        self.head = TokenHead(llm.model.get_input_embeddings().weight.detach().cpu(), vocab)
        self.norm_weight = NORM_WEIGHT

    def turn_ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.frame.turn_ids(self.llm, text)
        return self.cache[text]

    def encode(self, text: str) -> list[int]:
        """Classes of the text's tokens; a token outside the training vocabulary is dropped."""
        return [self.class_of[i] for i in self.turn_ids(text) if i in self.class_of]

    def decode(self, ids: list[int]) -> str:
        return self.llm.tokenizer.decode([self.token_of[c] for c in ids])

    def log_probs(self, encoder, batch: dict, device: torch.device):
        emb, lengths = encode_batch(encoder, batch, device)  # [B, T, D], [B]
        return self.head(emb, lengths), lengths

    def penalty(self) -> torch.Tensor | float:
        return self.norm_weight * self.head.last_norm_penalty


def token_ctc_loss(task: TokenTask, emb: torch.Tensor, lengths: torch.Tensor, texts: list[str]):
    """CTC of `texts`' tokens on adapter outputs emb [B, T, D] (lengths [B]) plus the head's norm
    penalty -> (loss, the CTC part as a float). Rows whose text has no known token are skipped."""
    log_probs = task.head(emb, lengths)  # [B, T, 1 + V']
    targets = [task.encode(t) for t in texts]
    keep = [i for i, ids in enumerate(targets) if ids]
    if not keep:
        return log_probs.sum() * 0.0, 0.0
    rows = torch.tensor(keep, device=emb.device)
    ctc = nn.functional.ctc_loss(
        log_probs[rows].transpose(0, 1),  # [T, B', 1 + V']
        torch.tensor([c for i in keep for c in targets[i]], device=emb.device),
        lengths[rows],
        torch.tensor([len(targets[i]) for i in keep], device=emb.device),
        blank=BLANK,
        zero_infinity=True,
    )
    return ctc + task.penalty(), float(ctc.detach())
