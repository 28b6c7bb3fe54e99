"""Decoder classification through the LM head: a prompt template and a verbalizer per label.

LoRETTA (and MeZO before it) run LLaMA on SuperGLUE-style tasks without a new head: each
text goes into a prompt (`model.template`, `{text}` marking the example), and each label is
scored by the frozen LM head as the log-probability of its verbalizer word right after the
prompt; a word of several tokens scores the sum of their log-probabilities. The label scores
play the role of a classifier's logits: training minimises the cross-entropy over them, and
the prediction is the best-scoring label.

`Verbalizer` turns texts into prompt tokens (the text is cut from the left when too long, so
the template's end and the room for the longest verbalizer always survive); `VerbalizerLM`
wraps a causal LM so that `model(input_ids, attention_mask).logits` are the label scores
(batch x labels), which is all that training, evaluation, DP-SGD and predict ask of a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from fedtt.errors import ConfigError
from fedtt.models import HashTokenizer
from fedtt.train import Encoded

DEFAULT_TEMPLATE = "{text}\nLabel:"


def token_ids(tokenizer, text: str) -> list[int]:
    """`text`'s tokens without any special token."""
    if isinstance(tokenizer, HashTokenizer):
        return tokenizer._ids(text)[1:]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def leading_special(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text (a BOS), found by comparing its encoding
    of a probe with and without special tokens; trailing ones (an EOS) are dropped."""
    if isinstance(tokenizer, HashTokenizer):
        return [1]
    probe = "a b"
    full = list(tokenizer(probe)["input_ids"])
    plain = token_ids(tokenizer, probe)
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k]
    return []


@dataclass
class Verbalizer:
    """The prompt template, the words scored for each label and their token ids."""

    template: str
    words: list[str]
    label_ids: list[list[int]]  # each label's verbalizer tokens
    prefix: list[int]  # special tokens before every prompt (BOS)
    pad_id: int

    @classmethod
    def build(cls, tokenizer, label_names: Sequence[str], template: str = "",
              words: Sequence[str] = ()) -> Verbalizer:
        """From the config's `model.template` and `model.verbalizers` (empty: the defaults:
        the built-in template, the task's label names)."""
        template = template or DEFAULT_TEMPLATE
        if template.count("{text}") != 1:
            raise ConfigError(f"model.template must hold {{text}} exactly once, got {template!r}")
        words = list(words) or [str(n) for n in label_names]
        if len(words) != len(label_names):
            raise ConfigError(f"model.verbalizers has {len(words)} words but the task has "
                              f"{len(label_names)} labels ({', '.join(map(str, label_names))})")
        ids = [token_ids(tokenizer, " " + w.strip()) for w in words]
        for w, i in zip(words, ids, strict=True):
            if not i:
                raise ConfigError(f"model.verbalizers: {w!r} has no tokens")
        seen: dict[tuple[int, ...], str] = {}
        for w, i in zip(words, ids, strict=True):
            if tuple(i) in seen:
                raise ConfigError(f"model.verbalizers: {seen[tuple(i)]!r} and {w!r} are the "
                                  "same tokens, so their labels could never be told apart")
            seen[tuple(i)] = w
        pad = getattr(tokenizer, "pad_token_id", None)
        return cls(template, words, ids, leading_special(tokenizer), int(pad or 0))

    def prompt(self, text: str) -> str:
        return self.template.replace("{text}", text)

    def encode(self, tokenizer, texts: Sequence[str], labels: Sequence[int],
               max_length: int) -> Encoded:
        """Prompt tokens, right-padded, each at most `max_length` minus the longest
        verbalizer (the text is cut from the left: the template's end always survives)."""
        budget = max_length - max(len(i) for i in self.label_ids)
        if budget <= len(self.prefix):
            raise ConfigError(f"model.max_length {max_length} leaves no room for a prompt "
                              f"before the longest verbalizer ({budget} tokens)")
        rows = []
        for text in texts:
            body = token_ids(tokenizer, self.prompt(text))
            rows.append(self.prefix + body[max(0, len(body) - (budget - len(self.prefix))):])
        width = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return Encoded(ids, mask, torch.as_tensor(list(labels), dtype=torch.long))


class VerbalizerLM(nn.Module):
    """A causal LM whose output `.logits` are label scores: the log-probability of each
    label's verbalizer tokens after the prompt (right-padded `input_ids`)."""

    def __init__(self, lm: nn.Module, label_ids: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.lm = lm
        self.label_ids = [list(map(int, ids)) for ids in label_ids]
        self.config = getattr(lm, "config", None)

    def _parts(self) -> tuple[nn.Module, nn.Module]:
        inner = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        return inner.base_model, inner.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **_: object) -> SequenceClassifierOutput:
        decoder, head = self._parts()
        lengths = attention_mask.sum(1).long()
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if all(len(ids) == 1 for ids in self.label_ids):  # one pass over the prompts
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False).last_hidden_state
            logp = F.log_softmax(head(hidden[rows, lengths - 1]).float(), dim=-1)
            words = torch.tensor([ids[0] for ids in self.label_ids], device=logp.device)
            return SequenceClassifierOutput(logits=logp[:, words])
        scores = [self._score(decoder, head, input_ids, attention_mask, lengths, rows, ids)
                  for ids in self.label_ids]
        return SequenceClassifierOutput(logits=torch.stack(scores, dim=1))

    @staticmethod
    def _score(decoder: nn.Module, head: nn.Module, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor,
               word: list[int]) -> torch.Tensor:
        """Sum of log p(word[j] | prompt, word[:j]) per row: the prompt with the word's
        tokens written right after it, one forward pass."""
        m = len(word)
        b, w = input_ids.shape
        ids = torch.cat([input_ids, input_ids.new_zeros(b, m)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_zeros(b, m)], dim=1)
        offsets = torch.arange(m, device=ids.device)
        at = lengths[:, None] + offsets[None, :]  # where the word's tokens go
        tokens = torch.tensor(word, device=ids.device).expand(b, m)
        ids[rows[:, None], at] = tokens
        mask[rows[:, None], at] = 1
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logp = F.log_softmax(head(hidden[rows[:, None], at - 1]).float(), dim=-1)
        return logp.gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
