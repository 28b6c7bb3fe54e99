"""One results schema for every run, and the tables and plots drawn from it.

A run directory holds `config.toml` (resolved), `rounds.jsonl` (one object per round, round 0
being the untrained start), `ledger.jsonl` (one row per tensor per client per round per
direction with its payload `bytes`, and one row per message with Flower's `wire_bytes`),
`label_counts.json`, `summary.json`, `global.safetensors` (the final travelling tensors) and
`plots/`; a causal-lm run also `generations.jsonl` (one object per evaluated round: the greedy
outputs for its fixed held-out prompts). `fedtt report` reads only these.

A causal-lm run's rounds record `loss` and `perplexity`; its `accuracy` and `macro_f1` stay
null, its summary has `final_perplexity` and `best_perplexity` (best = lowest loss) and null
accuracies, and its plots show perplexity.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

SUMMARY, LABELS, GLOBAL = "summary.json", "label_counts.json", "global.safetensors"
GENERATIONS = "generations.jsonl"  # causal-lm: greedy outputs for fixed prompts, per eval
CHECKPOINT = "checkpoint.safetensors"  # written by `federated/checkpoint.py` via write_tensors


@dataclass
class RoundRecord:
    """One line of rounds.jsonl: what happened in a round (round 0: the untrained start).

    The strategy fills in the traffic, the clients and what went wrong as the round runs;
    the ServerApp adds the evaluation, the running totals and the timing. *_bytes: tensor
    payload; *_wire_bytes: Flower's bytes for the whole messages (the wire). Fields in
    `OPTIONAL` appear in the line only when set; `method_metrics` (whatever the method's
    aggregation logs, e.g. FedTT's aggregation_gap) are written as top-level keys."""

    round: int
    method: str
    accuracy: float | None = None
    loss: float | None = None
    macro_f1: float | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    val_macro_f1: float | None = None
    upload_bytes: int = 0
    download_bytes: int = 0
    cumulative_bytes: int = 0
    upload_wire_bytes: int = 0
    download_wire_bytes: int = 0
    cumulative_wire_bytes: int = 0
    clients: list[int] = field(default_factory=list)
    seconds: float = 0.0
    epsilon: float | None = None
    train_loss: float | None = None
    clients_out_of_budget: int = 0
    client_train_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    eval_seconds: float = 0.0
    failed: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    retries: int = 0
    method_metrics: dict[str, float] = field(default_factory=dict)
    local_accuracy: float | None = None
    local_loss: float | None = None
    local_macro_f1: float | None = None
    update_norms: dict[str, float] | None = None
    clipped: list[int] | None = None
    secagg: dict[str, Any] | None = None
    perplexity: float | None = None  # causal-lm: exp(loss)
    val_perplexity: float | None = None
    local_perplexity: float | None = None

    OPTIONAL: ClassVar[tuple[str, ...]] = (
        "val_accuracy", "val_loss", "val_macro_f1", "local_accuracy", "local_loss",
        "local_macro_f1", "update_norms", "clipped", "secagg", "perplexity",
        "val_perplexity", "local_perplexity")

    def update(self, values: Mapping[str, Any]) -> None:
        """Set fields by name (an unknown name is a bug, not a new key)."""
        known = {f.name for f in fields(self)}
        for key, value in values.items():
            if key not in known:
                raise KeyError(f"RoundRecord has no field {key!r}")
            setattr(self, key, value)

    def row(self) -> dict[str, Any]:
        """The record as its JSON line holds it."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "method_metrics":
                out.update(value)
            elif value is not None or f.name not in self.OPTIONAL:
                out[f.name] = value
        return json.loads(json.dumps(out))  # plain JSON types only (tuples become lists)


ROUND_KEYS = tuple(f.name for f in fields(RoundRecord)
                   if f.name not in RoundRecord.OPTIONAL and f.name != "method_metrics")


def ledger_row(server_round: int, direction: str, kind: str, *, dtype: str,
               client: int | None = None, name: str | None = None,
               shape: list[int] | None = None, payload_bytes: int = 0, wire_bytes: int = 0,
               sent: bool = True, **extra: Any) -> dict[str, Any]:
    """One line of ledger.jsonl: a tensor (`name`, `shape`, its `bytes` of payload, 0 when
    not sent) or a whole message (`name` None, Flower's `wire_bytes`), in `direction`
    ("up"/"down") of a `kind` ("train"/"evaluate") message of `server_round` for `client`."""
    return {"round": server_round, "client": client, "direction": direction, "kind": kind,
            "name": name, "shape": shape, "dtype": dtype, "bytes": payload_bytes,
            "wire_bytes": wire_bytes, "sent": sent, **extra}


class Recorder:
    """Writes a run's files as the run goes (rows are flushed, so a crash loses nothing)."""

    def __init__(self, out_dir: str | Path, config_toml: str,
                 resume_round: int | None = None) -> None:
        """A fresh run directory, or (`resume_round`) one whose rows past that round are cut
        off (a run killed mid-round) and which is appended to from there."""
        self.dir = Path(out_dir)
        if resume_round is not None:
            check_history(self.dir, resume_round)  # before anything is cut off or written
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.toml").write_text(config_toml)
        self.rows: list[dict] = []
        if resume_round is not None:
            (self.dir / "summary.json").unlink(missing_ok=True)  # a stopped run's, now stale
            _keep_lines(self.dir / "rounds.jsonl", resume_round)
            _keep_lines(self.dir / "ledger.jsonl", resume_round)
            if (self.dir / GENERATIONS).exists():
                _keep_lines(self.dir / GENERATIONS, resume_round)
            self.rows = read_rounds(self.dir)
        else:
            (self.dir / GENERATIONS).unlink(missing_ok=True)  # an overwritten run's
        mode = "a" if resume_round is not None else "w"
        self._rounds = open(self.dir / "rounds.jsonl", mode)
        self._ledger = open(self.dir / "ledger.jsonl", mode)
        self.started = time.perf_counter()

    def ledger(self, rows: list[dict]) -> None:
        for row in rows:
            self._ledger.write(json.dumps(row) + "\n")
        self._ledger.flush()

    def labels(self, label_names: Sequence[str], counts: Sequence[Sequence[int]]) -> None:
        """label_counts.json: the label names and each client's training label counts."""
        write_json(self.dir / LABELS, {"label_names": list(label_names),
                                       "counts": [list(c) for c in counts]})

    def save_global(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """global.safetensors: the final global values of the travelling tensors."""
        write_tensors(self.dir / GLOBAL, tensors)

    def generations(self, server_round: int, samples: Sequence[Mapping[str, str]]) -> None:
        """One line of generations.jsonl: the round and its `{"prompt", "output"}` pairs."""
        line = {"round": server_round, "generations": [dict(s) for s in samples]}
        with open(self.dir / GENERATIONS, "a", encoding="utf-8") as out:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")

    def round(self, record: RoundRecord) -> None:
        row = record.row()
        self.rows.append(row)
        self._rounds.write(json.dumps(row, allow_nan=False) + "\n")  # always valid JSON
        self._rounds.flush()

    def close(self) -> None:
        self._rounds.close()
        self._ledger.close()

    def finish(self, summary: dict, plots: bool = True) -> dict:
        self.close()
        evaluated = evaluated_rows(self.rows)
        final, last = evaluated[-1], self.rows[-1]
        generative = final["accuracy"] is None  # causal-lm: scored by loss and perplexity
        if generative:
            best = min(evaluated, key=lambda r: r["loss"])
            scores = {"final_perplexity": final["perplexity"],
                      "best_perplexity": best["perplexity"], "best_loss": best["loss"]}
        else:
            best = max(evaluated, key=lambda r: r["accuracy"])
            scores = {}
        summary = {
            "final_accuracy": final["accuracy"], "final_loss": final["loss"],
            "final_macro_f1": final["macro_f1"], "best_accuracy": best["accuracy"],
            **scores, "best_round": best["round"], "rounds": last["round"],
            "total_bytes": last["cumulative_bytes"],
            "total_upload_bytes": sum(r["upload_bytes"] for r in self.rows),
            "total_download_bytes": sum(r["download_bytes"] for r in self.rows),
            "total_wire_bytes": last["cumulative_wire_bytes"],
            "total_upload_wire_bytes": sum(r["upload_wire_bytes"] for r in self.rows),
            "total_download_wire_bytes": sum(r["download_wire_bytes"] for r in self.rows),
            "wall_seconds": time.perf_counter() - self.started,
            **summary, "versions": versions(), "machine": machine(),
        }
        write_json(self.dir / SUMMARY, summary)
        if plots:
            plot_runs([self.dir], self.dir / "plots")
        return summary


def _keep_lines(path: Path, last_round: int) -> None:
    """Rewrite a JSON-lines file keeping the rows of rounds up to `last_round` (atomically)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [x for x in lines if x.strip() and _complete_round(x, last_round)]
    write_atomic(path, "".join(x + "\n" for x in kept))


def _complete_round(line: str, last_round: int) -> bool:
    recorded = _row_round(line)
    return recorded is not None and recorded <= last_round


def _row_round(line: str) -> int | None:
    """The round of a JSON-lines row, None for a line cut short by a kill (or not a row)."""
    try:
        value = json.loads(line)["round"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_history(run_dir: str | Path, last_round: int) -> None:
    """Refuse (ValueError) to continue a run after `last_round` unless its rounds.jsonl
    records every round 0..last_round, so that cutting off the rows after it loses nothing."""
    if isinstance(last_round, bool) or not isinstance(last_round, int) or last_round < 0:
        raise ValueError(f"the round to resume after must be an integer >= 0, got {last_round!r}")
    path = Path(run_dir) / "rounds.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    recorded = {_row_round(line) for line in lines}
    missing = next((r for r in range(last_round + 1) if r not in recorded), None)
    if missing is not None:
        raise ValueError(f"{path} does not record round {missing}, so the run cannot continue "
                         f"after round {last_round}")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` so that a reader never sees half a file (a temporary, then a rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, atomically (a reader sees the old file or the new, whole)."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def clear_finished(run_dir: str | Path) -> None:
    """Remove what a run writes only after its first round or at its end (checkpoint,
    summary, final tensors), so nothing of an old run is left to resume or report."""
    for name in (CHECKPOINT, SUMMARY, GLOBAL):
        (Path(run_dir) / name).unlink(missing_ok=True)


def add_to_summary(run_dir: str | Path, **values: Any) -> dict:
    """summary.json with `values` added (what a deployment learns after the run)."""
    path = Path(run_dir) / SUMMARY
    summary = {**json.loads(path.read_text()), **values}
    write_json(path, summary)
    return summary


def read_summary(run_dir: str | Path) -> dict | None:
    """summary.json, None when the run has none (still running, or killed)."""
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def read_labels(run_dir: str | Path) -> dict:
    """label_counts.json: {"label_names": [...], "counts": [[...] per client]}."""
    return json.loads((Path(run_dir) / LABELS).read_text())


def read_ledger(run_dir: str | Path) -> list[dict]:
    """ledger.jsonl's rows."""
    text = (Path(run_dir) / "ledger.jsonl").read_text(encoding="utf-8")
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def read_global(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """global.safetensors: the run's final travelling tensors."""
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / GLOBAL))


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("fedtt", "torch", "transformers", "peft", "flwr", "flwr-datasets", "opacus"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict[str, str | int | None]:
    """The machine that finished the run: its architecture, CPU model and core count (float
    results agree to the last digit only on the same kind of CPU)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"arch": platform.machine(), "cpu": cpu or "unknown", "cores": os.cpu_count()}


def read_rounds(run_dir: str | Path) -> list[dict]:
    """The rows of a run's `rounds.jsonl`."""
    text = (Path(run_dir) / "rounds.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def evaluated_rows(rows: Sequence[dict]) -> list[dict]:
    """The rounds that were evaluated (see `federation.eval_every`): with an accuracy, or
    for a causal-lm run a perplexity."""
    return [r for r in rows if r["accuracy"] is not None or r.get("perplexity") is not None]


def read_generations(run_dir: str | Path) -> list[dict]:
    """generations.jsonl's rows (none for a classification run)."""
    path = Path(run_dir) / GENERATIONS
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def read_run(run_dir: str | Path) -> dict:
    """A run's summary, rounds and resolved config name fields."""
    run_dir = Path(run_dir)
    for needed in ("rounds.jsonl", "summary.json"):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished fedtt run (no {needed})")
    rounds = read_rounds(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"dir": str(run_dir), "name": run_dir.name, "rounds": rounds, "summary": summary}


def format_table(runs: Sequence[dict]) -> str:
    """A comparison table of finished runs."""
    header = (f"{'run':<24} {'method':<9} {'rounds':>6} {'final acc':>9} {'best acc':>8} "
              f"{'up MB/rnd/cl':>12} {'total MB':>9} {'seconds':>8}   (MB: wire bytes)")
    lines = [header, "-" * len(header)]
    for run in runs:
        s = run["summary"]
        rounds = [r for r in run["rounds"] if r["round"] > 0]
        per_client = [r["upload_wire_bytes"] / max(len(r["clients"]), 1) for r in rounds]
        up = sum(per_client) / len(per_client) / 1e6 if per_client else 0.0
        if s.get("final_accuracy") is None:  # causal-lm: perplexities
            final = f"ppl {s.get('final_perplexity', float('nan')):.4g}"
            best = f"ppl {s.get('best_perplexity', float('nan')):.4g}"
        else:
            final, best = f"{s['final_accuracy']:.4f}", f"{s['best_accuracy']:.4f}"
        lines.append(f"{run['name'][:24]:<24} {s.get('method', '?'):<9} {s['rounds']:>6} "
                     f"{final:>9} {best:>8} {up:>12.4f} "
                     f"{s['total_wire_bytes'] / 1e6:>9.3f} {s['wall_seconds']:>8.1f}")
    return "\n".join(lines)


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Accuracy vs round and accuracy vs cumulative MB, every run on shared axes; causal-lm
    runs (no accuracy) get the same two plots of perplexity."""
    runs = [_load_rounds(Path(d)) for d in run_dirs]
    scored = [(label, evaluated_rows(rows)) for label, rows in runs]
    generative = [(label, rows) for label, rows in scored
                  if rows and rows[0]["accuracy"] is None]
    classified = [(label, rows) for label, rows in scored if (label, rows) not in generative]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if classified or not generative:
        paths += _plot(classified, "accuracy", "test accuracy", out)
    if generative:
        paths += _plot(generative, "perplexity", "test perplexity", out)
    return paths


def _plot(runs: Sequence[tuple[str, list[dict]]], key: str, ylabel: str,
          out: Path) -> list[Path]:
    """`key` vs round and vs cumulative MB (files `<key>_vs_round.png`, `<key>_vs_mb.png`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for xkey, xlabel, fname in (("round", "round", f"{key}_vs_round.png"),
                                ("cumulative_wire_bytes", "cumulative MB on the wire (up + down)",
                                 f"{key}_vs_mb.png")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for label, rows in runs:
            xs = [r[xkey] / (1e6 if xkey != "round" else 1) for r in rows]
            ax.plot(xs, [r[key] for r in rows], marker="o", markersize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if key == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def _load_rounds(run_dir: Path) -> tuple[str, list[dict]]:
    rows = read_rounds(run_dir)
    label = f"{run_dir.name} ({rows[0]['method']})" if rows else run_dir.name
    return label, rows
