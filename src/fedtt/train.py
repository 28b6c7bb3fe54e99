"""Local training and evaluation of a (shared) model on tokenised examples.

Used by clients (local steps on their partition) and by the server (evaluating the global
model). Examples are tokenised once into tensors; a partition is a list of row indices.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedtt.devices import CPU, Compute


@dataclass
class Encoded:
    """Tokenised examples: ids and mask (N x L) and labels (N)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, rows: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        mask = self.attention_mask[rows]
        width = max(int(mask.sum(1).max()), 1)  # trim padding shared by the whole batch
        return {"input_ids": self.input_ids[rows, :width],
                "attention_mask": mask[:, :width]}

    def loss(self, logits: torch.Tensor, rows: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of `logits`, the model's output on `batch(rows)`, against the rows'
        labels (a causal-lm task's rows override this: `causal_lm.LMEncoded`)."""
        return F.cross_entropy(logits.float(), self.labels[rows].to(logits.device),
                               reduction=reduction)


def encode(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int,
           chunk: int = 1024) -> Encoded:
    """Tokenise right-padded to the longest example (at most `max_length`)."""
    ids, masks = [], []
    for start in range(0, len(texts), chunk):
        part = tokenizer(list(texts[start:start + chunk]), max_length=max_length,
                         truncation=True, padding="max_length", return_tensors="pt")
        ids.append(part["input_ids"])
        masks.append(part["attention_mask"])
    input_ids = torch.cat(ids) if ids else torch.zeros(0, max_length, dtype=torch.long)
    attention_mask = torch.cat(masks) if masks else torch.zeros_like(input_ids)
    width = max(int(attention_mask.sum(1).max()) if len(attention_mask) else 1, 1)
    return Encoded(input_ids[:, :width].contiguous(), attention_mask[:, :width].contiguous(),
                   torch.as_tensor(list(labels), dtype=torch.long))


def batch_order(n: int, steps: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """`steps` batches of positions 0..n-1: reshuffled epochs, drawn in order."""
    rows: list[int] = []
    need = steps * min(batch_size, n)
    while len(rows) < need:
        rows += torch.randperm(n, generator=generator).tolist()
    size = min(batch_size, n)
    return [rows[i * size:(i + 1) * size] for i in range(steps)]


def train_local(model: nn.Module, data: Encoded, rows: Sequence[int],
                params: Iterable[nn.Parameter], *, steps: int, batch_size: int, lr: float,
                weight_decay: float, generator: torch.Generator, accum_steps: int = 1,
                compute: Compute = CPU) -> float:
    """Run `steps` AdamW steps (fresh optimizer) on `rows` of `data`; mean training loss.

    Each step sums the gradients of `accum_steps` micro-batches of `batch_size` (each loss
    divided by `accum_steps`): the update of one batch of accum_steps x batch_size rows.
    `compute` says where the model is and in what dtype its backbone runs (autocast, and a
    loss scaler for float16); the default, CPU float32, uses neither."""
    params = list(params)
    if not rows:
        raise ValueError("cannot train on an empty partition")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scaler = compute.scaler()
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    orders = batch_order(len(rows_t), steps * accum_steps, batch_size, generator)
    model.train()
    total = 0.0
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for order in orders[step * accum_steps:(step + 1) * accum_steps]:
            picked = rows_t[order]
            with compute.autocast():
                logits = model(**compute.to(data.batch(picked))).logits
            loss = data.loss(logits, picked)
            if accum_steps > 1:
                loss = loss / accum_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += float(loss.detach())
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    model.eval()
    return total / steps


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, rows: Sequence[int] | None = None, *,
             batch_size: int = 128, num_labels: int | None = None,
             compute: Compute = CPU) -> dict[str, float]:
    """Accuracy, mean cross-entropy loss and macro-F1 on `rows` (default: all), with the
    model on `compute`'s device (autocast for a half backbone)."""
    model.eval()
    rows_t = torch.arange(len(data)) if rows is None else torch.as_tensor(list(rows))
    if len(rows_t) == 0:
        raise ValueError("cannot evaluate on zero examples")
    preds, loss_sum = [], 0.0
    for start in range(0, len(rows_t), batch_size):
        picked = rows_t[start:start + batch_size]
        with compute.autocast():
            logits = model(**compute.to(data.batch(picked))).logits
        logits = logits.float().cpu()
        loss_sum += float(F.cross_entropy(logits, data.labels[picked], reduction="sum"))
        preds.append(logits.argmax(-1))
    pred = torch.cat(preds)
    gold = data.labels[rows_t]
    k = num_labels or int(max(int(gold.max()), int(pred.max())) + 1)
    return {"accuracy": float((pred == gold).float().mean()),
            "loss": loss_sum / len(rows_t),
            "macro_f1": macro_f1(pred, gold, k)}


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> float:
    """Unweighted mean over labels of F1 (a label absent from both counts as F1 = 0)."""
    scores = []
    for c in range(num_labels):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / num_labels
