"""`load`: the task a run configuration names, from its `[data]` section: a built-in task,
"synthetic", or the path of a user's file (with an optional separate test file)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fedtt.data.common import TaskData
from fedtt.data.files import load_user_data
from fedtt.data.synthetic import synthetic_task
from fedtt.data.tasks import list_tasks, load_task

if TYPE_CHECKING:
    from fedtt.config import DataConfig


def load(d: DataConfig, *, seed: int) -> TaskData:
    """The train/test data `d` (a run's `[data]` section) names, split with `seed`.

    "synthetic" is sized to cover `max_train_examples`/`max_test_examples` (at least 64/32
    rows); a name that is neither a built-in task nor an existing path raises
    `FileNotFoundError` listing the built-in tasks.
    """
    if d.task == "synthetic":
        return synthetic_task(n_train=max(d.max_train_examples, 64),
                              n_test=max(d.max_test_examples, 32), seed=seed)
    if any(t["name"] == d.task for t in list_tasks()):
        return load_task(d.task, test_fraction=d.test_fraction, seed=seed)
    if not Path(d.task).exists():
        names = ", ".join(t["name"] for t in list_tasks())
        raise FileNotFoundError(f"data.task {d.task!r} is neither a built-in task ({names}, "
                                "synthetic) nor an existing file or directory")
    return load_user_data(d.task, text_column=d.text_column, label_column=d.label_column,
                          test_path=d.test_path or None, test_fraction=d.test_fraction,
                          seed=seed)
