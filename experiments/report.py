"""docs/results.md from the committed records in results/ (see experiments/run.py).

Every number in the report is computed here from `results/<group>/<name>/seed<S>.json`,
`results/select/...` and `fedtt plan`; nothing is typed in by hand. Cells without records
yet are listed as pending, with the command that runs them.
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as runner  # noqa: E402  (the protocol's constants and readers)

# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
       17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}
PARITY = 0.01  # C2's and C5's "within 1 point of LoRA": the margin of pairs against LoRA
PLAN_MODELS = ("minilm", "arch:roberta-base", "arch:llama-2-7b")
PLAN_METHODS = ("fedtt", "fedtt+", "lora", "ffa-lora")
# C2's ablations, each shown where its config exists: (label, config key, what it is, the
# change it makes, the cause it tests, the cell it is compared with besides LoRA)
C2_ABLATIONS = (
    ("FedTT cores + head", "fedtt-cores-only", "FedTT training only its TT cores and the head "
     "(no adapter biases, no norms), at FedTT's rate", "without the adapter biases and norms",
     "the adapter biases and norms", "FedTT"),
    ("FedTT cores + head, rank 10", "fedtt-cores-only-rank10", "the same at TT rank 10 "
     "instead of 5", "with cores and head only at TT rank 10",
     "the adapter biases and norms together with TT rank 5's capacity", "FedTT cores + head"),
)

# C3's ablations, each shown at the α where its config exists: (label, config key, what it is,
# the change it makes, the cause it tests); each is compared with FedTT+ and LoRA
C3_ABLATIONS = (
    ("FedTT+ frozen norms", "fedttplus-frozen-norms", "FedTT+ with the norms frozen, at FedTT+'s "
     "rate", "without the trained norms", "the trained norms"),
    ("FedTT+ cores + head", "fedttplus-cores-only", "FedTT+ training only its TT cores and the "
     "head (no adapter biases, no norms), at FedTT+'s rate", "without the adapter biases and "
     "norms", "the adapter biases and norms"),
)


# --- reading -----------------------------------------------------------------------------------
def records(results: Path, name: str) -> dict[int, dict]:
    """seed -> record of a cell."""
    out = {}
    for path in sorted((results / name).glob("seed*.json")):
        rec = runner.read_record(path)
        out[rec["seed"]] = rec
    return out


def test_score(rec: dict) -> float:
    return runner.score(rec["rounds"], "accuracy")


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (nan half-width for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    df = len(values) - 1
    if df > max(T95):
        raise ValueError(f"{len(values)} seeds: add the t quantile for {df} degrees of freedom")
    t = T95[max(k for k in T95 if k <= df)]  # between tabled values, the wider interval
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def pct(mean: float, half: float) -> str:
    return f"{100 * mean:.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}")


def paired(a: dict[int, dict], b: dict[int, dict]) -> tuple[list[int], float, float] | None:
    """Seeds both cells ran, and the mean and 95% half-width of a - b over them."""
    return over_seeds({s: test_score(a[s]) - test_score(b[s]) for s in set(a) & set(b)})


def verdict(mean: float, half: float, margin: float = 0.0) -> str:
    """'met' when the whole interval of (a - b) lies at or above -margin, 'not met' when it
    lies below it, else inside the noise."""
    if math.isnan(half):
        return "pending (one seed)"
    if mean - half >= -margin:
        return "met"
    if mean + half < -margin:
        return "not met"
    return "inside the noise"


def upload_wire_per_client(rec: dict) -> float:
    rows = [r for r in rec["rounds"] if r["round"] > 0 and r["clients"]]
    return statistics.mean(r["upload_wire_bytes"] / len(r["clients"]) for r in rows)


# keys of `[data]` that split a task's rows among clients, not into train, test and validation
PARTITION_KEYS = ("partition", "alpha", "classes_per_client", "partition_column", "generations")


def split_settings(data: dict) -> dict:
    """The keys of a `[data]` section that decide a run's train, test and validation rows."""
    return {k: v for k, v in data.items() if k not in PARTITION_KEYS}


def run_rows(data: dict, seed: int) -> tuple:
    """`runtime.split_rows` of a run whose config has this `[data]` section and whose
    training seed is `seed`: its task and the rows it trains, tests and validates on (loaded
    once per split, whatever the partition)."""
    return _rows(json.dumps(split_settings(data), sort_keys=True), seed)


@functools.cache
def _rows(data: str, seed: int) -> tuple:
    from fedtt.config import from_flat
    from fedtt.federated.runtime import split_rows

    values = {f"data.{key}": value for key, value in json.loads(data).items()}
    return split_rows(from_flat({**values, "training.seed": seed}))


def validation_overlap(data: dict, seeds: tuple[int, ...]) -> tuple[int, list[int], int]:
    """How much of the selection runs' validation split is reported test rows. Unless
    `data.split_seed` fixes the split, each run splits train and test with its own seed, then
    carves validation from its training rows; so the selection seed's validation rows can be
    test rows of a reported seed. Returns the validation rows, how many of them (by text) each
    of `seeds` tests on, and how many any of them does."""
    def texts(ds) -> list[str]:
        return ds[ds.column_names[0]]

    val = texts(run_rows(data, runner.SELECT_SEED)[3])
    per_seed, anywhere = [], set()
    for s in seeds:
        test = set(texts(run_rows(data, s)[2]))
        per_seed.append(sum(t in test for t in val))
        anywhere |= test
    return len(val), per_seed, sum(t in anywhere for t in val)


def leak_lines() -> list[str]:
    """The Protocol's account of validation rows that are reported test rows, per task and
    split setting of the configs whose selection runs chose a rate."""
    settings = {}
    for name in runner.configs([]):
        chooser = runner.selects(name)
        if chooser is None:
            continue
        data = split_settings(runner.load(chooser).get("data", {}))
        seeds = runner.SEEDS[:runner.evidence(name).get("seeds", len(runner.SEEDS))]
        settings.setdefault(json.dumps(data, sort_keys=True), (data, set()))[1].update(seeds)
    lines = []
    for _, (data, seeds) in sorted(settings.items()):
        if not data.get("val_fraction"):
            continue
        rows, per_seed, anywhere = validation_overlap(data, tuple(sorted(seeds)))
        lines.append(f"{data['task']}: {min(per_seed)}–{max(per_seed)} of {rows} per reported seed "
                     f"({anywhere} in at least one of seeds "
                     f"{', '.join(map(str, sorted(seeds)))})")
    return lines


# --- sections ------------------------------------------------------------------------------------
def protocol() -> list[str]:
    return [
        "## Protocol",
        "",
        "- **Selection on validation only.** Every run holds out `data.val_fraction` = 10% of "
        "its training rows (seeded) as a validation split. Each method's learning rate is "
        f"chosen per task from {', '.join(f'{x:g}' for x in runner.LR_GRID)} (or the grid "
        "its config names, listed under Selection) by one run per "
        f"rate with seed {runner.SELECT_SEED} (a seed no reported run uses), scored by the mean "
        "of its last two validation accuracies (compared to 6 decimals; a tie goes to the "
        "smaller rate); a best rate at an edge of the grid, tied or not, extends it by a "
        f"factor of 2 on that side (at most {runner.MAX_EXTENSIONS} times). No run's test "
        "score chooses anything.",
        "- **Where selection touches test rows, measured.** Each run splits train and test "
        "with its own seed, so some of the selection seed's validation rows are test rows of "
        "a reported seed: " + "; ".join(leak_lines()) + ". The rate choice saw how well "
        "those rows were classified by the selection runs, never a reported run's score. A "
        "train/test split fixed across seeds (`data.split_seed`) removes this for new runs; "
        "the recorded runs predate it.",
        "- **Reported score.** The mean of the last two test-set evaluations (full test split; "
        "C6: 100 held-out prompts, 3 seeds) of each run; seeds "
        f"{', '.join(map(str, runner.SEEDS))}; means with 95% Student-t "
        "intervals; methods compared pairwise on the same seeds (a seed fixes the train/test "
        "split, the partition, the initialisation and the sampling), with the interval of the "
        "paired difference.",
        "- **Verdicts.** *met*: the whole interval of the paired difference lies on the claimed "
        "side; *not met*: it lies wholly on the other side; otherwise *inside the noise*. The "
        "claimed side is at or above 0, except for parity against LoRA (C2, C5: \"within 1 "
        f"point\"), where it is at or above −{100 * PARITY:g} point; an ablation against its "
        "parent is judged against 0.",
        "- **Bytes** are wire bytes: Flower's own serialisation of every message both ways "
        "(`upload_wire_bytes`, `download_wire_bytes` in each run's `rounds.jsonl`), as "
        "`fedtt plan` predicts them.",
        "- **Budgets** are stated per claim in epochs per client; curves against rounds and "
        "against cumulative wire MB show whether they flattened.",
        "",
    ]


def plan_section() -> tuple[list[str], dict]:
    from fedtt.adapters import AdapterConfig
    from fedtt.plan import plan

    lines = ["## C1: bytes per client per round (wire, upload, `fedtt plan`, round 2)", "",
             "| model | adapter | " + " | ".join(PLAN_METHODS) + " | LoRA / FedTT | "
             "LoRA / FedTT+ |", "|---|---|" + "---|" * (len(PLAN_METHODS) + 2)]
    found = {}
    variants = {"": ("fedtt default", {}), "loretta": ("loretta", {}),
                "loretta-no-norms": ("loretta, norms frozen (ablation)", {"train_norms": False})}
    for model in PLAN_MODELS:
        for key, (label, extra) in variants.items():
            if key == "loretta-no-norms" and model == PLAN_MODELS[0]:
                continue
            preset = key.split("-")[0]
            result = plan(model, PLAN_METHODS, AdapterConfig(preset=preset, **extra))["methods"]
            found[(model, key)] = result
            cells = [f"{result[m]['upload_wire_bytes'] / 1e3:,.1f} KB"
                     + (" (≤)" if result[m]["upper_bound"] else "") for m in PLAN_METHODS]
            lora = result["lora"]["upload_wire_bytes"]
            lines.append(f"| {model} | {label} | " + " | ".join(cells)
                         + f" | {lora / result['fedtt']['upload_wire_bytes']:.1f}x | "
                         f"{lora / result['fedtt+']['upload_wire_bytes']:.1f}x |")
    lines.append("")
    ratios = {k: (v["lora"]["upload_wire_bytes"] / v["fedtt"]["upload_wire_bytes"],
                  v["lora"]["upload_wire_bytes"] / v["fedtt+"]["upload_wire_bytes"])
              for k, v in found.items()}
    for model in PLAN_MODELS[1:]:
        tt, plus = ratios[(model, "loretta")]
        lines.append(f"- {model}, the paper's adapter: FedTT sends {tt:.1f}x fewer bytes than "
                     f"LoRA r=8 (goal ≥ 10x: **{'met' if tt >= 10 else 'not met'}**), FedTT+ "
                     f"{plus:.1f}x (goal ≥ 15x: **{'met' if plus >= 15 else 'not met'}**).")
        tt_nn, plus_nn = ratios[(model, "loretta-no-norms")]
        if tt_nn >= 10 and plus_nn >= 15:
            cause = "the norms explain the gap"
        elif tt_nn >= 10 or plus_nn >= 15:
            cause = (f"the norms explain {'FedTT' if tt_nn >= 10 else 'FedTT+'}'s gap, not "
                     f"{'FedTT+' if tt_nn >= 10 else 'FedTT'}'s")
        else:
            cause = ("the norms alone do not explain the gap: the TT adapters themselves send "
                     "more than a tenth of what LoRA r=8 on query and value sends")
        lines.append(f"  - Ablation (the most likely cause, the norms LoRETTA trains and sends): "
                     f"with them frozen, FedTT sends {tt_nn:.1f}x fewer, FedTT+ "
                     f"{plus_nn:.1f}x; {cause}.")
    lines += ["- LoRA r=8 adapts query and value and sends the classification head as it is; "
              "the paper's preset tensorizes a RoBERTa head's dense layer. Under "
              "`preset = \"\"` the adapter biases and norms travel too.", ""]
    return lines, ratios


def comparison(results: Path, title: str, cells: dict[str, str], pairs: list[tuple[str, str]],
               margins: dict[str, float], claim: str, img: Path, stem: str,
               verdicts: list[dict] | None = None,
               ablations: list[tuple[str, str, str, str]] = (),
               more: list[str] = ()) -> list[str]:
    """A table of cells (label -> config name), paired differences with verdicts, plots.
    A pair "a − b" whose b is in `margins` (the claim's baseline) is judged with that margin,
    every other pair (an ablation against its parent) with none. Each pair's outcome is also
    appended to `verdicts` (for the summary). Each of `ablations`
    is (claim pair, ablation pair, what the ablation changes, the cause it tests), pairs as
    "A − B": when the claim is not met, a line says whether the change closes the gap.
    `more`: lines placed after the differences, before the plot."""
    recs = {label: records(results, name) for label, name in cells.items()}
    spent = [statistics.mean(r["rounds"][-1]["cumulative_wire_bytes"] for r in got.values())
             for got in recs.values() if got]
    budget = min(spent) if spent else 0.0  # the fewest bytes any finished cell sent
    at_budget = f"at {budget / 1e6:.1f} MB" if budget else "at equal bytes"
    lines = [f"### {title}", "", "| cell | seeds | rate | test accuracy (%) | accuracy (%) "
             f"{at_budget} | upload wire KB per client per round | epochs per client |",
             "|---|---|---|---|---|---|---|"]

    def row(label: str, got: dict[int, dict]) -> str:
        mean, half = interval([test_score(r) for r in got.values()])
        at = interval([accuracy_within(r, budget) for r in got.values()])
        first = next(iter(got.values()))
        up = statistics.mean(upload_wire_per_client(r) for r in got.values())
        return (f"| {label} | {len(got)} | {first['lr']:g} | {pct(mean, half)} | "
                f"{pct(*at)} | {up / 1e3:,.1f} | {epochs(first):.1f} |")

    lines += table_rows(recs, cells, 7, row)
    lines += ["", f"Claim: {claim}", "", "*Accuracy at N MB*: each run's last evaluation before "
              "its cumulative wire bytes (all clients, both ways) passed N by more than "
              f"{BYTES_SLACK:.0%} (cells of one method differ by a few bytes of metrics), N "
              "being the mean total of the cell that sent the least: the accuracy each method "
              "buys with the same bytes.",
              ""]
    judged_lines, outcomes = judge_pairs(recs, pairs, margins, title, verdicts)
    lines += judged_lines
    for ablation in ablations:
        lines += cause(outcomes, *ablation)
    lines += more
    path = draw(recs, img / f"{stem}.png", title)
    if path:
        lines += ["", f"![{title}](img/{path.name})"]
    return lines + [""]


def judge_pairs(recs: dict[str, dict[int, dict]], pairs: list[tuple[str, str]],
                margins: dict[str, float], where: str,
                verdicts: list[dict] | None) -> tuple[list[str], dict[str, dict]]:
    """The lines and outcomes of pairs "a − b" of cells (label -> seed -> record): with the
    margin `margins` gives b (the claim's baseline), else none."""
    lines, outcomes = [], {}
    for a, b in pairs:
        line, outcomes[f"{a} − {b}"] = judged(f"{a} − {b}", paired(recs[a], recs[b]),
                                             margins.get(b, 0.0), where, verdicts)
        lines.append(line)
    return lines, outcomes


def judged(pair: str, got: tuple[list[int], float, float] | None, margin: float, where: str,
           verdicts: list[dict] | None) -> tuple[str, dict]:
    """The report line and the outcome of one paired difference (None: not measured yet);
    the outcome is also appended to `verdicts` (for the summary)."""
    if got is None:
        outcome = {"difference": "", "seeds": 0, "verdict": "pending"}
        line = f"- {pair}: pending"
    else:
        seeds, mean, half = got
        outcome = {"difference": pct(mean, half), "seeds": len(seeds),
                   "verdict": verdict(mean, half, margin)}
        line = (f"- {pair}: {pct(mean, half)} points over seeds {', '.join(map(str, seeds))}: "
                f"**{outcome['verdict']}**")
    if verdicts is not None:
        verdicts.append({"where": where, "pair": pair, **outcome})
    return line, outcome


def over_seeds(differences: dict[int, float]) -> tuple[list[int], float, float] | None:
    """Seeds, mean and 95% half-width of per-seed differences (None when there are none)."""
    if not differences:
        return None
    return sorted(differences), *interval([differences[s] for s in sorted(differences)])


def majority_share(data: dict, seed: int) -> float:
    """Test accuracy of always predicting the most frequent test label of a run with this
    `[data]` section and training seed (the rows it scores on)."""
    labels = run_rows(data, seed)[2]["label"]
    return max(labels.count(c) for c in set(labels)) / len(labels)


def privacy_lines(results: Path, eps: str, cells: dict[str, tuple[str, str]],
                  verdicts: list[dict], where: str, majority=majority_share) -> list[str]:
    """C4's two questions at one ε. `cells`: method label -> (DP cell, no-DP cell), config
    names. Each DP cell against the majority class (met: the whole interval above it), and
    whether FedTT loses less to DP than LoRA: (LoRA's loss to DP) − (FedTT's), paired by seed
    over the seeds all four cells ran (met: FedTT loses less)."""
    recs = {label: (records(results, dp), records(results, clear))
            for label, (dp, clear) in cells.items()}
    lines = []
    for label, (dp, _) in recs.items():
        above = {s: test_score(r) - majority(r["config"].get("data", {}), s)
                 for s, r in dp.items()}
        line, _ = judged(f"{label} ε={eps} − majority class", over_seeds(above), 0.0, where,
                         verdicts)
        lines.append(line)
    (tt, (tt_dp, tt_clear)), (lora, (lora_dp, lora_clear)) = recs.items()
    seeds = set(tt_dp) & set(tt_clear) & set(lora_dp) & set(lora_clear)
    cost = {s: (test_score(lora_clear[s]) - test_score(lora_dp[s]))
            - (test_score(tt_clear[s]) - test_score(tt_dp[s])) for s in seeds}
    line, _ = judged(f"{lora}'s loss to DP − {tt}'s (ε={eps})", over_seeds(cost), 0.0, where,
                     verdicts)
    return lines + [line] + dp_loss_context(recs, seeds, eps)


def dp_loss_context(recs: dict[str, tuple[dict, dict]], seeds: set[int], eps: str) -> list[str]:
    """What the loss-to-DP difference is made of, over `seeds` (measured, no verdict): each
    method's loss to DP, and the two methods without DP, FedTT − LoRA."""
    if not seeds:
        return []
    (tt, (_, tt_clear)), (lora, (_, lora_clear)) = recs.items()
    losses = [f"{label} " + pct(*interval([test_score(clear[s]) - test_score(dp[s])
                                           for s in sorted(seeds)]))
              for label, (dp, clear) in recs.items()]
    mean, half = interval([test_score(tt_clear[s]) - test_score(lora_clear[s])
                           for s in sorted(seeds)])
    lower = mean + half < 0
    return [f"- Measured, no claim: loss to DP (no DP − ε={eps}) {', '.join(losses)} points; "
            f"without DP, {tt} − {lora} is {pct(mean, half)} points"
            + (f", so part of {tt}'s smaller loss is its lower accuracy without DP." if lower
               else ".")]


def cause(outcomes: dict[str, dict], claim: str, ablation: str, change: str,
          suspect: str) -> list[str]:
    """One line saying whether `change` (which tests `suspect`) closes a gap the claim pair did
    not close."""
    c, a = outcomes.get(claim), outcomes.get(ablation)
    if not c or not a or c["verdict"] != "not met" or a["verdict"] not in (
            "met", "not met", "inside the noise"):
        return []
    reading = {"met": f"the gap is explained by {suspect}",
               "not met": f"the gap is not explained by {suspect}",
               "inside the noise": f"whether the gap is explained by {suspect} is inside the noise"}
    return [f"- Cause, measured: {claim} is *{c['verdict']}*; {change}, "
            f"{ablation} is {a['difference']} points (*{a['verdict']}*): "
            f"{reading[a['verdict']]}."]


def table_rows(recs: dict[str, dict[int, dict]], cells: dict[str, str], columns: int,
               row) -> list[str]:
    """One table row per cell: `row(label, records)`, or pending with the command to run it."""
    return [row(label, recs[label]) if recs[label] else
            f"| {label} | pending: `python experiments/run.py --only '{name}'` |"
            + " |" * (columns - 2) for label, name in cells.items()]


# bytes within 1% of a budget are within it: the same method's cells differ by a few bytes per
# message (their metrics), not by what the budget compares
BYTES_SLACK = 0.01


def accuracy_within(rec: dict, budget: float) -> float:
    """Test accuracy of the run's last evaluation within `budget` cumulative wire bytes (give
    or take `BYTES_SLACK`)."""
    within = [r["accuracy"] for r in rec["rounds"] if r["accuracy"] is not None
              and r["cumulative_wire_bytes"] <= budget * (1 + BYTES_SLACK)]
    return within[-1]


def epochs(rec: dict) -> float:
    """Local epochs per client over the run: the examples all clients trained on (the rounds
    each client took part in, as recorded) over all their rows, so a sampled client counts
    only the rounds it was picked."""
    t = rec["config"].get("training", {})
    trained = sum(len(r["clients"] or []) for r in rec["rounds"] if r["round"] > 0)
    rows = sum(map(sum, rec["label_counts"]))
    return trained * t.get("local_steps", 10) * t.get("batch_size", 32) / rows


def draw(recs: dict[str, dict[int, dict]], path: Path, title: str,
         key: str = "accuracy") -> Path | None:
    """Mean test `key` (accuracy, or a causal-LM run's loss) against rounds and against
    cumulative wire MB, one line a cell."""
    if not any(recs.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for label, got in recs.items():
        if not got:
            continue
        runs = list(got.values())
        rows = [[r for r in run["rounds"] if r.get(key) is not None] for run in runs]
        n = min(map(len, rows))
        acc = [statistics.mean(rr[i][key] for rr in rows) for i in range(n)]
        rounds = [rows[0][i]["round"] for i in range(n)]
        mb = [statistics.mean(rr[i]["cumulative_wire_bytes"] for rr in rows) / 1e6
              for i in range(n)]
        axes[0].plot(rounds, acc, marker="o", markersize=3, label=label)
        axes[1].plot(mb, acc, marker="o", markersize=3, label=label)
    axes[0].set_xlabel("round")
    axes[1].set_xlabel("cumulative MB on the wire (up + down, all clients)")
    for ax in axes:
        ax.set_ylabel(f"test {key} (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def generative_section(results: Path, title: str, cells: dict[str, str], base: str,
                       img: Path, stem: str) -> list[str]:
    """Causal-LM cells: held-out loss and perplexity (mean of the last two evaluations),
    paired loss differences against `base`, loss against rounds and cumulative wire MB."""
    recs = {label: records(results, name) for label, name in cells.items()}
    lines = [f"### {title}", "", "| cell | seeds | rate | held-out loss | perplexity | "
             "upload wire KB per client per round |", "|---|---|---|---|---|---|"]

    def row(label: str, got: dict[int, dict]) -> str:
        mean, half = interval([runner.score(r["rounds"], "loss") for r in got.values()])
        up = statistics.mean(upload_wire_per_client(r) for r in got.values())
        spread = "" if math.isnan(half) else f" ± {half:.3f}"
        return (f"| {label} | {len(got)} | {next(iter(got.values()))['lr']:g} | "
                f"{mean:.3f}{spread} | {math.exp(mean):.2f} | {up / 1e3:,.1f} |")

    lines += [*table_rows(recs, cells, 6, row), ""]
    for label in cells:
        seeds = sorted(set(recs[label]) & set(recs[base]))
        if label == base or not seeds:
            continue
        mean, half = interval([runner.score(recs[label][s]["rounds"], "loss")
                               - runner.score(recs[base][s]["rounds"], "loss") for s in seeds])
        spread = "one seed" if math.isnan(half) else f"± {half:.3f}"
        lines.append(f"- {label} − {base}, held-out loss: {mean:+.3f} ({spread}; seeds "
                     f"{', '.join(map(str, seeds))}; lower is better)")
    path = draw(recs, img / f"{stem}.png", title, key="loss")
    if path:
        lines += ["", f"![{title}](img/{path.name})"]
    return lines + [""]


def summary_section(c1: dict, verdicts: list[dict]) -> list[str]:
    """Every claim's verdict in one table, each linked to its section below."""
    lines = ["## Summary", "", "Differences are paired by seed, in accuracy points, with 95% "
             "intervals; *inside the noise* means the interval holds both sides of the claim's "
             f"threshold (0, or −{100 * PARITY:g} point for parity against LoRA). "
             "Controls and ablations are in their sections.", "",
             "| claim | where | comparison | difference | seeds | verdict |",
             "|---|---|---|---|---|---|"]
    for model in PLAN_MODELS[1:]:
        tt, plus = c1[(model, "loretta")]
        lines += [f"| C1 bytes ≥ 10x | {model}, paper's adapter, `fedtt plan` | LoRA r=8 / "
                  f"FedTT | {tt:.1f}x | | {'met' if tt >= 10 else 'not met'} |",
                  f"| C1 bytes ≥ 15x | {model}, paper's adapter, `fedtt plan` | LoRA r=8 / "
                  f"FedTT+ | {plus:.1f}x | | {'met' if plus >= 15 else 'not met'} |"]
    for v in verdicts:
        claim = v["where"].split(",")[0]
        where = v["where"][len(claim) + 2:]
        lines.append(f"| {claim} | {where} | {v['pair']} | {v['difference']} | "
                     f"{v['seeds'] or ''} | {v['verdict']} |")
    return lines + [""]


def run_seconds(rec: dict) -> float:
    """A run's wall time: its summary's, plus that of the rounds before a resume (a resumed
    run's summary times only the invocation that finished it)."""
    before = rec["summary"].get("resumed_from_round")
    earlier = 0.0 if before is None else sum(
        r["seconds"] for r in rec["rounds"] if r["round"] <= before)
    return rec["summary"]["wall_seconds"] + earlier


def per_round(records: list[dict]) -> float | None:
    """Median wall seconds per round of finished runs; None when there are none."""
    return statistics.median(run_seconds(r) / r["summary"]["rounds"]
                             for r in records) if records else None


COMPUTE_GOAL_HOURS = 5.0  # the issue: the whole set within about 5 hours on 2 cores


def compute_section(results: Path) -> list[str]:
    """What the recorded runs cost (their wall time on this project's 2-core machines) and
    what the pending ones would, estimated from the same cell's finished seeds, else from the
    finished runs of the same group."""
    lines = ["## Compute", "", "Wall time of each run as its summary records it, plus its "
             "rounds before a resume (2 runs at a time on 2 cores, one thread each); pending "
             "runs are estimated from their rounds and the median seconds per round of the "
             "same cell's finished seeds, or of the group's finished runs (selection runs "
             "included) when the cell has none.", "",
             "| group | runs recorded | hours recorded | runs pending | hours pending (est.) |",
             "|---|---|---|---|---|"]
    def hours(seconds: float) -> float:  # wall-clock, 2 runs at a time
        return seconds / 2 / 3600

    groups = sorted({name.split("/")[0] for name in runner.configs([])})
    total_done = total_todo = 0.0
    for group in groups:
        names = runner.configs([f"{group}/*"])
        cells = {name: [runner.read_record(p) for p in (results / name).glob("seed*.json")]
                 for name in names}
        done = [*(r for records in cells.values() for r in records),
                *(runner.read_record(p) for name in names
                  for p in (results / "select" / name).glob("*.json"))]
        seconds = [run_seconds(r) for r in done]
        group_rate = per_round(done)
        todo, todo_seconds = 0, 0.0
        for name in names:
            runs = max(0, runner.evidence(name).get("seeds", len(runner.SEEDS)) - len(cells[name]))
            rate = per_round(cells[name]) or group_rate
            if (runner.selects(name) == name
                    and not any((results / "select" / name).glob("lr*.json"))):
                runs += len(runner.evidence(name).get("grid", runner.LR_GRID))
            todo += runs
            todo_seconds += runs * runner.load(name)["federation"]["rounds"] * (rate or 0.0)
        est = "" if group_rate is None else f"{hours(todo_seconds):.1f}"
        total_done += hours(sum(seconds))
        total_todo += hours(todo_seconds)
        lines.append(f"| {group} | {len(done)} | {hours(sum(seconds)):.1f} | {todo} | "
                     f"{est or 'unknown (no finished run)'} |")
    lines += ["", f"Hours are wall-clock at 2 runs at a time: {total_done:.1f} h recorded, "
              f"{total_todo:.1f} h estimated for the pending runs of groups with a finished "
              "run."]
    total = total_done + total_todo
    verdict = "met" if total <= COMPUTE_GOAL_HOURS else "not met"
    lines += [f"Goal: the whole set within about {COMPUTE_GOAL_HOURS:g} h of wall time: "
              f"{total:.1f} h, **{verdict}**.", ""]
    return lines


def selection_section(results: Path) -> list[str]:
    """Each selection's scores, the rate the rule chooses (ties named), and the rates the
    reported runs of the cells it chooses for used (they differ where a rule changed after
    the runs: the line says so)."""
    lines = ["## Learning-rate selection (validation accuracy, seed "
             f"{runner.SELECT_SEED})", "", "| selection config | rate: validation accuracy "
             "(%) | chosen | reported runs used |", "|---|---|---|---|"]
    base = results / "select"
    names = sorted(str(p.relative_to(base)) for p in base.glob("*/*") if p.is_dir())
    chooser = {cell: runner.selects(cell) for cell in runner.configs([])}
    notes = []
    for name in names:
        scores = runner.selection_scores(name)
        if not scores:
            continue
        tied = runner.best_rates(scores)
        chosen = f"{tied[0]:g}" + (f" (tie: {', '.join(f'{x:g}' for x in tied)})"
                                   if len(tied) > 1 else "")
        used = sorted({rec["lr"] for cell, chosen_by in chooser.items() if chosen_by == name
                       for rec in records(results, cell).values()})
        grid = ", ".join(f"{lr:g}: " + (f"loss {-v:.3f}" if v < 0 else f"{100 * v:.1f}")
                         for lr, v in sorted(scores.items()))
        lines.append(f"| {name} | {grid} | {chosen} | {', '.join(f'{x:g}' for x in used)} |")
        planned = runner.evidence(name).get("grid", runner.LR_GRID)
        extended = sum(lr < min(planned) or lr > max(planned) for lr in scores)
        finished = set(planned) <= set(scores)  # else the selection is still running
        if finished and (max(scores) in tied or min(scores) in tied) and (
                extended < runner.MAX_EXTENSIONS):
            notes.append(f"- {name}: the best rate ties at the grid's edge; the extension "
                         "beyond it is pending (`python experiments/run.py --only "
                         f"'{name}'` runs it).")
        if used and used != [tied[0]]:
            notes.append(f"- {name}: the reported runs used {', '.join(f'{x:g}' for x in used)}"
                         f", chosen before ties were compared to 6 decimals and given to the "
                         f"smaller rate; on validation {tied[0]:g} and "
                         f"{', '.join(f'{x:g}' for x in used)} "
                         + ("tie" if set(used) <= set(tied) else "do not tie") + ".")
    return lines + ([""] + notes if notes else []) + [""]


def write_report(results: Path, doc: Path, img: Path) -> None:
    verdicts: list[dict] = []
    c2 = {}
    for task in ("movie-reviews", "bbc-news"):
        cells = {"FedTT": f"c2-parity/{task}-fedtt-iid", "LoRA r=8": f"c2-parity/{task}-lora-iid"}
        pairs = [("FedTT", "LoRA r=8")]
        claim = "FedTT within 1 point of LoRA, or better."
        ablations = []
        for label, key, what, change, suspect, versus in C2_ABLATIONS:
            if f"c2-parity/{task}-{key}-iid" in runner.configs([]) and versus in cells:
                cells[label] = f"c2-parity/{task}-{key}-iid"
                pairs += [(label, versus), (label, "LoRA r=8")]
                claim += f" Ablation, {label}: {what}."
                ablations.append(("FedTT − LoRA r=8", f"{label} − LoRA r=8", change, suspect))
        c2[task] = comparison(results, f"C2 parity, {task}, IID, 3 clients", cells, pairs,
                              {"LoRA r=8": PARITY}, claim, img, f"c2-{task}", verdicts,
                              ablations)
    c3 = []
    for alpha in ("0.1", "0.5", "1.0"):
        cells = {label: f"c3-heterogeneity/bbc-news-{key}-a{alpha}" for label, key in (
            ("FedTT+", "fedttplus"), ("FedTT", "fedtt"), ("LoRA r=8", "lora"),
            ("FFA-LoRA", "ffa-lora"))}
        pairs = [("FedTT+", "FedTT"), ("FedTT+", "LoRA r=8"), ("FedTT+", "FFA-LoRA")]
        claim = "FedTT+ at or above FedTT, LoRA and FFA-LoRA, paired by seed."
        ablations = []
        for label, key, what, change, suspect in C3_ABLATIONS:
            if f"c3-heterogeneity/bbc-news-{key}-a{alpha}" in runner.configs([]):
                cells[label] = f"c3-heterogeneity/bbc-news-{key}-a{alpha}"
                pairs += [(label, "FedTT+"), (label, "LoRA r=8")]
                claim += f" Ablation, {label}: {what}."
                ablations.append(("FedTT+ − LoRA r=8", f"{label} − LoRA r=8", change, suspect))
        c3 += comparison(results, f"C3 heterogeneity, BBC news, Dirichlet α={alpha}, 5 clients",
                         cells, pairs, {}, claim, img, f"c3-a{alpha}", verdicts, ablations)
    controls = {label: f"c3-heterogeneity/bbc-news-{key}-a0.1" for label, key in (
        ("FedTT", "fedtt"), ("FedTT cores + head", "fedtt-cores-only"), ("FedTT+", "fedttplus"),
        ("FedTT+ frozen norms", "fedttplus-frozen-norms"), ("LoRA r=8", "lora"),
        ("LoRA r=8 + norms", "lora-norms"), ("LoRA r=2", "lora-r2"))}
    c3 += comparison(results, "C3 controls, BBC news, Dirichlet α=0.1, 5 clients", controls,
                     [("FedTT cores + head", "FedTT"), ("LoRA r=8 + norms", "LoRA r=8"),
                      ("FedTT", "LoRA r=2"), ("FedTT+ frozen norms", "LoRA r=2")], {},
                     "none; these cells separate what the methods train from how they "
                     "train it: the TT methods with only cores and head (no adapter biases, "
                     "no norms), LoRA with the norms the TT methods train, and LoRA at about "
                     "FedTT's bytes. Rates are the parent method's (α=1.0), not reselected.",
                     img, "c3-controls")
    c4 = []
    for eps in ("6", "3", "1"):
        runs = {label: (f"c4-privacy/movie-reviews-{key}-eps{eps}",
                        f"c4-privacy/movie-reviews-{key}-epsnone")
                for label, key in (("FedTT", "fedtt"), ("LoRA r=8", "lora"))}
        cells = {f"{label} ε={eps}": dp for label, (dp, _) in runs.items()}
        cells.update({f"{label} no DP": clear for label, (_, clear) in runs.items()})
        title = f"C4 privacy, movie reviews, IID, 3 clients, ε={eps}"
        questions = privacy_lines(results, eps, runs, verdicts, title)
        claim = ("FedTT loses less to DP than LoRA (each method's DP cell against its no-DP "
                 "cell, paired by seed).")
        if eps == "6":
            claim = ("every method clearly above the majority class at ε=6 (the whole interval "
                     "above it); " + claim)
        else:
            claim += (" The claim asks for the majority class only at ε=6; the same "
                      "comparison is shown here.")
        c4 += comparison(results, title, cells, [(f"FedTT ε={eps}", f"LoRA r=8 ε={eps}")], {},
                         claim, img, f"c4-eps{eps}", verdicts, more=questions)
    cells = {"FedTT": "c5-cross-device/movie-reviews-fedtt-a0.5",
             "LoRA r=8": "c5-cross-device/movie-reviews-lora-a0.5"}
    pairs = [("FedTT", "LoRA r=8")]
    claim = "FedTT within 1 point of LoRA, or better, with clients sampled and stateless."
    ablations = []
    if "c5-cross-device/movie-reviews-fedtt-a0.5-r120" in runner.configs([]):
        cells.update({f"{label}, 120 rounds": f"{name}-r120" for label, name in cells.items()})
        pairs.append(("FedTT, 120 rounds", "LoRA r=8, 120 rounds"))
        claim += (" Ablation, 120 rounds: both methods at twice the rounds, same rates (the "
                  "cause it tests: a budget too short to learn).")
        ablations.append(("FedTT − LoRA r=8", "FedTT, 120 rounds − LoRA r=8, 120 rounds",
                          "with 120 rounds instead of 60", "the budget"))
    c5 = comparison(results, "C5 cross-device, movie reviews, Dirichlet α=0.5, 100 clients, "
                    "10 per round", cells, pairs,
                    {"LoRA r=8": PARITY, "LoRA r=8, 120 rounds": PARITY}, claim, img, "c5",
                    verdicts, ablations)
    c6 = generative_section(
        results, "C6 instruction tuning, SmolLM2-135M-Instruct, ShareGPT, IID, 3 clients",
        {label: f"c6-instruction/sharegpt-{key}-iid" for label, key in (
            ("FedTT", "fedtt"), ("LoRA r=8", "lora"), ("FFA-LoRA", "ffa-lora"))},
        "LoRA r=8", img, "c6")
    c1, ratios = plan_section()
    lines = ["# Results", "",
             "Generated by `python experiments/run.py --report` from `results/` (records of "
             "finished runs, committed as they finish) and `fedtt plan`; do not edit by hand.",
             "", *summary_section(ratios, verdicts), *protocol(), *c1,
             "## C2: parity under IID data", "", *c2["movie-reviews"],
             *c2["bbc-news"], "## C3: heterogeneity (label skew)", "", *c3,
             "## C4: local differential privacy", "",
             "Poisson sampling at an expected batch of 128, 100 DP-SGD steps per client; the "
             "rate is selected under DP (at ε=6) on validation. The no-DP cells take the same "
             "100 steps on fixed batches of 128 (no Poisson sampling, clipping or noise) at "
             "their own rate, chosen on validation: a method's loss to DP is that of the whole "
             "DP-SGD recipe.", "", *c4,
             "## C5: cross-device", "", *c5,
             "## C6: generative fine-tuning (causal LM)", "",
             "Held-out loss on the response tokens (mean of the last two evaluations) and its "
             "perplexity; each run's record keeps the greedy outputs of its last evaluation "
             "for three fixed held-out prompts. The rate is selected by validation loss.", "",
             *c6, *selection_section(results), *compute_section(results)]
    doc.write_text("\n".join(lines) + "\n")
