"""Generative fine-tuning (`data.kind = "causal-lm"`): prompt/response pairs as LM examples.

Each pair becomes one token row: the prompt in the model's chat template (the tokenizer's own
`chat_template` when it has one, else a plain "### User / ### Assistant" template), then the
response and the end-of-sequence token. The loss is the causal LM's cross-entropy on the
response tokens only: `labels` are -100 on the prompt and the padding, and equal to the
tokens on the response, shifted inside the loss as Hugging Face does.

Too long a pair is cut to `model.max_length`: the response keeps at least half the row (or
all of it, when shorter), the rest goes to the prompt, whose text is cut from the left so the
template around it (and the end of the question) always survives.

`evaluate_lm` gives the held-out loss (mean over response tokens) and its perplexity;
`generate` greedy-decodes prompts, for the recorded generations and `fedtt predict`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedtt.devices import CPU, Compute
from fedtt.errors import ConfigError
from fedtt.models import HashTokenizer
from fedtt.train import Encoded
from fedtt.verbalizer import leading_special, token_ids

IGNORE = -100  # label of a token that carries no loss (prompt, padding)
PLAIN_TEMPLATE = ("### User:\n", "\n\n### Assistant:\n")
_SENTINEL = "FEDTTPROMPTSENTINEL"


@dataclass
class LMEncoded(Encoded):
    """Tokenised pairs: ids and mask (N x L) and per-token `labels` (N x L, -100 where no
    loss is taken); `loss` is the mean cross-entropy over the response tokens of a batch."""

    def loss(self, logits: torch.Tensor, rows: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
        labels = self.labels[rows, :logits.shape[1]].to(logits.device)
        return lm_loss(logits, labels, reduction)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts label t+1; -100 labels are skipped."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction=reduction)


@dataclass
class ChatFormat:
    """How a prompt is wrapped: special tokens first (`prefix`), the template's tokens before
    and after the prompt text, and the tokens that end a response."""

    prefix: list[int]
    head: list[int]
    tail: list[int]
    end: list[int]
    pad_id: int
    chat_template: bool  # the tokenizer's own template (else PLAIN_TEMPLATE)

    @classmethod
    def build(cls, tokenizer) -> ChatFormat:
        pad = int(getattr(tokenizer, "pad_token_id", None) or 0)
        eos = getattr(tokenizer, "eos_token_id", None)
        end = [int(eos)] if eos is not None else []
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}],
                                                 tokenize=False, add_generation_prompt=True)
            if text.count(_SENTINEL) == 1:
                before, after = text.split(_SENTINEL)
                return cls([], token_ids(tokenizer, before), token_ids(tokenizer, after), end,
                           pad, True)
        head, tail = PLAIN_TEMPLATE
        return cls(leading_special(tokenizer), token_ids(tokenizer, head),
                   token_ids(tokenizer, tail), end, pad, False)

    @property
    def wrap(self) -> int:
        """Tokens of every prompt besides its text."""
        return len(self.prefix) + len(self.head) + len(self.tail)

    def prompt_ids(self, tokenizer, prompt: str, budget: int | None = None) -> list[int]:
        """The prompt's tokens in the template, at most `budget` of them (the text is cut
        from the left)."""
        text = token_ids(tokenizer, prompt)
        if budget is not None:
            room = budget - self.wrap
            if room < 1:
                raise ConfigError(f"model.max_length leaves no room for a prompt in the chat "
                                  f"template ({self.wrap} tokens before any text)")
            text = text[max(0, len(text) - room):]
        return self.prefix + self.head + text + self.tail

    def encode(self, tokenizer, prompts: Sequence[str], responses: Sequence[str],
               max_length: int) -> LMEncoded:
        """Right-padded rows of prompt + response + end, with labels on the response only."""
        if max_length < self.wrap + 2:
            raise ConfigError(f"model.max_length {max_length} is too small for the chat "
                              f"template ({self.wrap} tokens) plus a prompt and a response")
        rows, starts = [], []
        for prompt, response in zip(prompts, responses, strict=True):
            answer = token_ids(tokenizer, response) + self.end
            full = self.prompt_ids(tokenizer, prompt)
            if len(full) + len(answer) > max_length:
                keep = max(max_length - len(full), min(len(answer), max_length // 2))
                keep = min(keep, max_length - self.wrap - 1)
                answer = answer[:keep]
                full = self.prompt_ids(tokenizer, prompt, max_length - len(answer))
            rows.append(full + answer)
            starts.append(len(full))
        width = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
            labels[i, start:len(row)] = ids[i, start:len(row)]
        return LMEncoded(ids, mask, labels)


@torch.no_grad()
def evaluate_lm(model: nn.Module, data: LMEncoded, rows: Sequence[int] | None = None, *,
                batch_size: int = 128, compute: Compute = CPU) -> dict[str, float]:
    """Mean cross-entropy over the response tokens of `rows` (default: all) and its
    perplexity, exp(loss)."""
    model.eval()
    rows_t = torch.arange(len(data)) if rows is None else torch.as_tensor(list(rows))
    if len(rows_t) == 0:
        raise ValueError("cannot evaluate on zero examples")
    total, tokens = 0.0, 0
    for start in range(0, len(rows_t), batch_size):
        picked = rows_t[start:start + batch_size]
        with compute.autocast():
            logits = model(**compute.to(data.batch(picked))).logits
        total += float(data.loss(logits, picked, reduction="sum"))
        width = logits.shape[1]
        tokens += int((data.labels[picked, 1:width] != IGNORE).sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": perplexity(loss)}


def perplexity(loss: float) -> float:
    """exp(loss), capped at 1e300 so that it always stays a finite JSON number."""
    return math.exp(loss) if loss < 690 else 1e300


@torch.no_grad()
def generate(model: nn.Module, tokenizer, fmt: ChatFormat, prompts: Sequence[str], *,
             max_new_tokens: int, max_length: int, compute: Compute = CPU) -> list[str]:
    """Greedy continuations of `prompts` (each in the chat template, cut to `max_length`),
    up to `max_new_tokens` tokens or the end token, decoded."""
    model.eval()
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    out = []
    for prompt in prompts:
        ids = fmt.prompt_ids(tokenizer, prompt, max_length)
        step = torch.tensor([ids], dtype=torch.long)  # the whole prompt, then one token
        past, new = None, []  # the key/value cache: each step feeds only the new token
        for _ in range(max_new_tokens):
            if positions is not None and len(ids) + len(new) >= positions:
                break
            with compute.autocast():
                output = model(**compute.to({"input_ids": step}), past_key_values=past,
                               use_cache=True)
            past = output.past_key_values
            token = int(output.logits[0, -1].float().argmax())
            if token in fmt.end:
                break
            new.append(token)
            step = torch.tensor([[token]], dtype=torch.long)
        out.append(decode(tokenizer, new))
    return out


def decode(tokenizer, ids: Sequence[int]) -> str:
    """Text of generated tokens (a hash tokenizer, which has no vocabulary, shows ids)."""
    if isinstance(tokenizer, HashTokenizer):
        return " ".join(f"<{i}>" for i in ids)
    return tokenizer.decode(list(ids), skip_special_tokens=True)
