"""`load`: the task a run configuration names, from its `[data]` section: a built-in task,
"synthetic", or the path of a user's file (with an optional separate test file), as a
classification or a causal-lm task (`data.kind`, `task_kind`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedtt.data.common import DataError, TaskData
from fedtt.data.files import load_user_data, load_user_pairs
from fedtt.data.synthetic import synthetic_task
from fedtt.data.tasks import TASKS, list_tasks, load_task

if TYPE_CHECKING:
    from fedtt.config import DataConfig


def task_kind(d: DataConfig) -> str:
    """classification or causal-lm: `data.kind`, or with "auto" the task's own (a built-in
    task's kind; "synthetic" and a user's file are classification unless data.kind says
    causal-lm). A kind that contradicts a built-in task's raises `DataError`."""
    own = TASKS[d.task].kind if d.task in TASKS else None
    if d.kind == "auto":
        return own or "classification"
    if d.task == "synthetic" and d.kind != "classification":
        raise DataError(f"data.kind = {d.kind!r}: the synthetic task is classification only")
    if own is not None and own != d.kind:
        raise DataError(f"data.kind = {d.kind!r}, but the built-in task {d.task!r} is "
                        f"{own}: set data.kind = \"auto\" or {own!r}")
    return d.kind


def load(d: DataConfig, *, seed: int) -> TaskData:
    """The train/test data `d` (a run's `[data]` section) names, split with `seed`.

    "synthetic" is sized to cover `max_train_examples`/`max_test_examples` (at least 64/32
    rows); a name that is neither a built-in task nor an existing path raises
    `FileNotFoundError` listing the built-in tasks. A causal-lm user file is read for its
    `prompt_column` and `response_column` (and `partition_column`, when set).
    """
    kind = task_kind(d)
    if d.task == "synthetic":
        return synthetic_task(n_train=max(d.max_train_examples, 64),
                              n_test=max(d.max_test_examples, 32), seed=seed)
    if any(t["name"] == d.task for t in list_tasks()):
        return load_task(d.task, test_fraction=d.test_fraction, seed=seed)
    if not Path(d.task).exists():
        names = ", ".join(t["name"] for t in list_tasks())
        raise FileNotFoundError(f"data.task {d.task!r} is neither a built-in task ({names}, "
                                "synthetic) nor an existing file or directory")
    if kind == "causal-lm":
        if d.partition != "iid" and not d.partition_column:
            raise DataError(f"data.partition = {d.partition!r} skews clients by a category: "
                            "set data.partition_column to a categorical column of "
                            f"{d.task}, or data.partition = \"iid\"")
        return load_user_pairs(d.task, prompt_column=d.prompt_column,
                               response_column=d.response_column,
                               category_column=d.partition_column,
                               test_path=d.test_path or None, test_fraction=d.test_fraction,
                               seed=seed)
    return load_user_data(d.task, text_column=d.text_column, label_column=d.label_column,
                          test_path=d.test_path or None, test_fraction=d.test_fraction,
                          seed=seed)
