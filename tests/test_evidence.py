"""The evidence protocol (experiments/run.py, experiments/report.py): every experiment config is
a valid run that holds out validation rows and scores on the full test split; rates are chosen
on validation with the grid extended at an edge; the report's paired intervals and verdicts."""

import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import crash_at, tiny

from fedtt import results
from fedtt.cli import main
from fedtt.config import load_config, to_toml
from fedtt.data import tasks
from fedtt.fetch import FetchError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(EXPERIMENTS))
import report  # noqa: E402
import run as runner  # noqa: E402


@pytest.mark.parametrize("name", runner.configs([]))
def test_every_experiment_is_a_valid_run_on_validation_and_the_full_test_split(
        name: str, tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(runner.fedtt_toml(name))
    cfg = load_config(path)
    assert cfg.data.val_fraction > 0, "selection needs a validation split"
    if not runner.generative(runner.load(name)):  # a causal-LM cell scores a fixed held-out set
        assert cfg.data.max_test_examples == 0, "reported numbers use the full test split"
    evidence = runner.evidence(name)
    assert set(evidence) <= {"select", "seeds", "grid"}, f"unknown [evidence] keys in {name}"
    select = evidence.get("select", name)
    assert select in runner.configs([]), f"{name} selects its rate from a missing config"


def record(val: float, test: float) -> dict:
    """A classification record whose last two evaluations score `val` and `test`."""
    rows = [{"round": r, "val_accuracy": val, "accuracy": test} for r in (18, 20)]
    return {"config": {"data": {"task": "bbc-news"}}, "rounds": rows}


def test_selection_scores_validation_never_test() -> None:
    assert runner.selection_score(record(val=0.7, test=0.9)) == pytest.approx(0.7)
    assert report.test_score(record(val=0.7, test=0.9)) == pytest.approx(0.9)


def test_accuracy_at_a_budget_counts_bytes_within_its_slack() -> None:
    """A cell of the same method that sent a few bytes more (its metrics) is scored at its last
    evaluation; one that sent clearly more, at the evaluation before."""
    def run(last_bytes: float) -> dict:
        return {"rounds": [{"accuracy": 0.6, "cumulative_wire_bytes": 500.0},
                           {"accuracy": None, "cumulative_wire_bytes": 750.0},
                           {"accuracy": 0.8, "cumulative_wire_bytes": last_bytes}]}

    budget = 1000.0
    assert report.accuracy_within(run(budget), budget) == 0.8
    assert report.accuracy_within(run(budget * (1 + report.BYTES_SLACK / 2)), budget) == 0.8
    assert report.accuracy_within(run(budget * (1 + 2 * report.BYTES_SLACK)), budget) == 0.6


def test_score_is_the_mean_of_the_last_two_evaluations() -> None:
    rows = [{"accuracy": 0.1}, {"accuracy": None}, {"accuracy": 0.5}, {"accuracy": 0.7}]
    assert runner.score(rows, "accuracy") == pytest.approx(0.6)
    assert runner.score([{"accuracy": None}], "accuracy") is None


@pytest.fixture
def fake_selection(monkeypatch: pytest.MonkeyPatch):
    """run_jobs that 'runs' a job by scoring its rate with the config's validation curve."""
    curves = {"a": lambda lr: -abs(math.log(lr / 0.01)),    # best 1e-2: interior of the grid
              "b": lambda lr: -abs(math.log(lr / 2.5e-4)),  # best below the grid
              "c": lambda lr: -lr,                          # always the smallest rate
              "d": lambda lr: float(lr >= 0.01)}            # a plateau from 1e-2 up
    scores: dict[str, dict[float, float]] = {}
    batches: list[list[tuple[str, float]]] = []

    def run_jobs(jobs, workers, commit):
        batches.append([(j.name, j.lr) for j in jobs])
        for job in jobs:
            scores.setdefault(job.name, {})[job.lr] = curves[job.name](job.lr)
        return []

    monkeypatch.setattr(runner, "run_jobs", run_jobs)
    monkeypatch.setattr(runner, "selection_scores", lambda name: scores.get(name, {}))
    monkeypatch.setattr(runner, "evidence", lambda name: {})
    return batches


def test_rates_are_chosen_inside_the_grid_extending_it_at_an_edge(fake_selection) -> None:
    rates, failed = runner.select_rates(["a", "b", "c"], workers=2, commit=False)
    assert failed == []
    assert rates["a"] == 0.01                           # interior at once: no extension
    assert rates["b"] == min(runner.LR_GRID) / 4        # extended twice downwards, interior
    # "c" keeps improving downwards: it stops after MAX_EXTENSIONS at the edge it reached
    assert rates["c"] == min(runner.LR_GRID) / 2 ** runner.MAX_EXTENSIONS
    first = fake_selection[0]
    assert {name for name, _ in first} == {"a", "b", "c"}, "all grids run together"
    assert all(name != "a" for batch in fake_selection[1:] for name, _ in batch)
    assert len(fake_selection) == runner.MAX_EXTENSIONS + 1


def test_a_tie_goes_to_the_smaller_rate_and_a_tie_at_an_edge_extends_the_grid(
        fake_selection) -> None:
    rates, _ = runner.select_rates(["d"], workers=2, commit=False)
    # 1e-2 and 2e-2 tie, and 2e-2 is the top edge: the grid grows upwards as far as allowed
    grids = [sorted(lr for _, lr in batch) for batch in fake_selection]
    assert [grid[-1] for grid in grids] == [0.02, 0.04, 0.08] and grids[0][0] == 0.002
    assert rates["d"] == 0.01
    # the same rows right, averaged in float32 at different steps: a tie, not a difference
    right = float(np.float32(333 / 358))
    noisy = {0.005: right, 0.01: right + 3e-8, 0.02: right - 0.01}
    assert runner.best_rates(noisy) == [0.005, 0.01]
    assert runner.best_rates({0.005: 0.91, 0.01: 0.93}) == [0.01]
    assert runner.best_rates({}) == []


def test_a_config_whose_runs_all_failed_has_no_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "run_jobs", lambda jobs, w, c: [f"{j.name} failed" for j in jobs])
    monkeypatch.setattr(runner, "selection_scores", lambda name: {})
    monkeypatch.setattr(runner, "evidence", lambda name: {})
    rates, failed = runner.select_rates(["x"], workers=1, commit=False)
    assert rates == {"x": None} and len(failed) == len(runner.LR_GRID)


def test_paired_difference_interval_and_verdicts() -> None:
    a = {s: record(0, test) for s, test in enumerate([0.80, 0.82, 0.84])}
    b = {s: record(0, test) for s, test in enumerate([0.78, 0.795, 0.81, 0.99])}  # seed 3 unpaired
    seeds, mean, half = report.paired(a, b)
    assert seeds == [0, 1, 2]
    assert mean == pytest.approx(0.025)  # differences 0.02, 0.025, 0.03: sd 0.005
    assert half == pytest.approx(4.303 * 0.005 / math.sqrt(3))
    assert report.verdict(mean, half) == "met"
    assert report.verdict(-mean, half) == "not met"
    assert report.verdict(0.0, half) == "inside the noise"
    assert report.verdict(-0.005, 0.002, margin=0.01) == "met"  # within the 1-point margin


def test_compute_section_counts_recorded_and_pending_runs(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    name = "c2-parity/bbc-news-fedtt-iid"
    (tmp_path / name).mkdir(parents=True)
    rounds = runner.load(name)["federation"]["rounds"]
    for seed, seconds in ((0, 600.0), (1, 1200.0)):  # each ran half the config's rounds
        (tmp_path / name / f"seed{seed}.json").write_text(json.dumps(
            {"seed": seed, "summary": {"wall_seconds": seconds, "rounds": rounds // 2},
             "rounds": []}))
    monkeypatch.setattr(runner, "configs", lambda only: [name] if only in ([], ["c2-parity/*"])
                        else [])
    lines = report.compute_section(tmp_path)
    row = next(line for line in lines if line.startswith("| c2-parity"))
    pending = len(runner.SEEDS) - 2
    # 2 recorded runs of 0.25 h at 2 at a time; a pending run of the config's full rounds
    # costs twice the median recorded run (900 s), 2 at a time
    assert rounds % 2 == 0
    assert row == (f"| c2-parity | 2 | {1800 / 2 / 3600:.1f} | {pending} | "
                   f"{pending * 1800 / 2 / 3600:.1f} |")
    total = (1 + pending) * 1800 / 2 / 3600
    assert f"{total:.1f} h, **met**." in lines[-2]
    monkeypatch.setattr(report, "COMPUTE_GOAL_HOURS", total / 2)
    assert f"{total:.1f} h, **not met**." in report.compute_section(tmp_path)[-2]


def test_a_pending_run_is_estimated_from_its_own_cells_seeds_before_the_groups(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = "c2-parity/bbc-news-fedtt-iid", "c2-parity/bbc-news-lora-iid"
    rounds = {name: runner.load(name)["federation"]["rounds"] for name in (fast, slow)}
    done = {fast: [10.0] * len(runner.SEEDS), slow: [100.0]}  # seconds per round
    for name, rates in done.items():
        (tmp_path / name).mkdir(parents=True)
        for seed, rate in enumerate(rates):
            (tmp_path / name / f"seed{seed}.json").write_text(json.dumps(
                {"seed": seed, "summary": {"wall_seconds": rate * rounds[name],
                                           "rounds": rounds[name]}, "rounds": []}))
    monkeypatch.setattr(runner, "configs", lambda only: [fast, slow] if only in (
        [], ["c2-parity/*"]) else [])
    row = next(line for line in report.compute_section(tmp_path)
               if line.startswith("| c2-parity"))
    pending = len(runner.SEEDS) - 1
    # the group's median (10 s per round) would say 10x less: the slow cell's own seed rules
    assert row.endswith(f"| {pending} | {pending * rounds[slow] * 100.0 / 2 / 3600:.1f} |")


def test_a_cause_line_only_when_the_claim_is_not_met_and_the_ablation_is_measured() -> None:
    def outcomes(claim: str, ablation: str) -> dict[str, dict]:
        return {"A − B": {"verdict": claim, "difference": "-2.0 ± 1.0"},
                "A' − B": {"verdict": ablation, "difference": "-0.5 ± 0.4"}}

    def cause(claim: str, ablation: str) -> list[str]:
        return report.cause(outcomes(claim, ablation), "A − B", "A' − B", "without the norms",
                            "the norms")

    line = cause("not met", "met")
    assert len(line) == 1 and "without the norms, A' − B is -0.5 ± 0.4" in line[0]
    assert "the gap is explained by the norms" in line[0]
    assert "the gap is not explained by the norms" in cause("not met", "not met")[0]
    assert "inside the noise" in cause("not met", "inside the noise")[0]
    assert cause("met", "met") == []
    assert cause("inside the noise", "met") == []
    assert cause("not met", "pending (one seed)") == []


def test_the_parity_margin_applies_to_pairs_against_the_baseline_only() -> None:
    """FedTT trails LoRA by 0.4-0.6 points (within C2's 1 point: met); an ablation that is
    0.7 points above and below its parent on different seeds is inside the noise, not met by
    the margin it has no claim to."""
    cells = {"LoRA": [0.800, 0.810, 0.820, 0.830], "FedTT": [0.795, 0.805, 0.814, 0.826],
             "FedTT ablation": [0.802, 0.798, 0.821, 0.819]}
    recs = {label: {s: record(0, test) for s, test in enumerate(values)}
            for label, values in cells.items()}
    verdicts: list[dict] = []
    lines, outcomes = report.judge_pairs(
        recs, [("FedTT", "LoRA"), ("FedTT ablation", "FedTT")], {"LoRA": report.PARITY},
        "C2, here", verdicts)
    assert outcomes["FedTT − LoRA"]["verdict"] == "met"
    assert report.verdict(*report.interval([-0.005, -0.005, -0.006, -0.004])) == "not met"
    assert outcomes["FedTT ablation − FedTT"]["verdict"] == "inside the noise"
    assert [v["pair"] for v in verdicts] == ["FedTT − LoRA", "FedTT ablation − FedTT"]
    assert len(lines) == 2


def test_the_t_quantile_grows_as_seeds_fall_and_refuses_what_it_lacks() -> None:
    def t(n: int) -> float:  # the quantile interval() used for n values
        values = [float(i % 2) for i in range(n)]
        return report.interval(values)[1] / (statistics.stdev(values) / math.sqrt(n))

    quantiles = [t(n) for n in range(2, 32)]
    assert all(a >= b - 1e-9 for a, b in zip(quantiles, quantiles[1:], strict=False))
    assert t(5) == pytest.approx(2.776)   # 4 degrees of freedom
    assert t(13) == pytest.approx(2.179)  # 12 (the old fallback said 1.96)
    assert t(23) == pytest.approx(2.086)  # 22 is not tabled: 20's, the wider (true: 2.074)
    with pytest.raises(ValueError, match="degrees of freedom"):
        report.interval([0.0, 1.0] * 20)


def test_validation_overlap_counts_validation_rows_that_a_reported_seed_tests_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The selection seed trains on t0-t9; seed 0 tests on exactly those rows, seed 1 on
    none of them: every validation row is a test row of seed 0, none of seed 1."""
    from datasets import Dataset

    def texts(lo: int, hi: int) -> Dataset:
        return Dataset.from_dict({"text": [f"t{i}" for i in range(lo, hi)],
                                  "label": [i % 2 for i in range(lo, hi)]})

    from fedtt.federated import runtime

    splits = {runner.SELECT_SEED: (texts(0, 10), texts(10, 20)), 0: (texts(10, 20), texts(0, 10)),
              1: (texts(0, 10), texts(10, 20))}
    monkeypatch.setattr(runtime, "load_task_data", lambda cfg: type("Split", (), {
        "train": splits[runtime.split_seed(cfg)][0], "test": splits[runtime.split_seed(cfg)][1]}))
    report._rows.cache_clear()
    data = {"task": "bbc-news", "val_fraction": 0.3}
    rows, per_seed, anywhere = report.validation_overlap(data, (0, 1))
    assert (rows, per_seed, anywhere) == (3, [3, 0], 3)
    # a split fixed across training seeds: validation rows are no reported seed's test rows
    fixed = report.validation_overlap({**data, "split_seed": runner.SELECT_SEED}, (0, 1))
    assert fixed == (3, [0, 0], 0)
    report._rows.cache_clear()


def test_selection_section_names_ties_pending_edges_and_rates_the_runs_did_not_use(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = list(runner.LR_GRID)  # 0.002 ... 0.02
    scores = {"g/tie-inside": {0.002: 0.5, 0.005: 0.9, 0.01: 0.9 + 3e-8, 0.02: 0.4},
              "g/tie-at-edge": {0.002: 0.5, 0.005: 0.6, 0.01: 0.9, 0.02: 0.9},
              "g/running": {0.002: 0.9}}
    used = {"g/tie-inside": 0.01, "g/tie-at-edge": 0.01}
    for name in scores:
        (tmp_path / "select" / name).mkdir(parents=True)
    for name, lr in used.items():
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / name / "seed0.json").write_text(json.dumps({**record(0, 0.8), "seed": 0,
                                                                "lr": lr}))
    monkeypatch.setattr(runner, "selection_scores", lambda name: scores[name])
    monkeypatch.setattr(runner, "configs", lambda only: list(scores))
    monkeypatch.setattr(runner, "selects", lambda name: name)
    monkeypatch.setattr(runner, "evidence", lambda name: {"grid": grid})
    text = "\n".join(report.selection_section(tmp_path))
    assert "| g/tie-inside | 0.002: 50.0, 0.005: 90.0, 0.01: 90.0, 0.02: 40.0 | 0.005 (tie: " \
           "0.005, 0.01) | 0.01 |" in text
    assert "g/tie-inside: the reported runs used 0.01" in text and "0.01 tie." in text
    assert "g/tie-at-edge: the best rate ties at the grid's edge" in text
    assert "g/tie-at-edge: the reported runs used" not in text  # 0.01 is the rule's choice
    assert "g/running:" not in text  # its grid has not finished: no verdict on its edges


def test_privacy_lines_judge_each_dp_cell_against_the_majority_and_the_loss_to_dp(
        tmp_path: Path) -> None:
    """FedTT loses 0.05 to DP on every seed and LoRA 0.10 to 0.12: LoRA's loss − FedTT's is
    0.06 ± its interval over the three seeds all four cells ran (seed 3 has no LoRA DP cell)."""
    scores = {"tt-dp": [0.70, 0.71, 0.80, 0.73], "tt-clear": [0.75, 0.76, 0.85, 0.78],
              "lora-dp": [0.70, 0.70, 0.69], "lora-clear": [0.80, 0.81, 0.81]}
    for name, values in scores.items():
        (tmp_path / name).mkdir()
        for seed, test in enumerate(values):
            rec = {**record(0, test), "seed": seed}
            (tmp_path / name / f"seed{seed}.json").write_text(json.dumps(rec))
    shares = {0: 0.5, 1: 0.5, 2: 0.75, 3: 0.5}  # seed 2: LoRA's 0.69 is below its majority
    verdicts: list[dict] = []
    lines = report.privacy_lines(tmp_path, "6", {"FedTT": ("tt-dp", "tt-clear"),
                                                 "LoRA": ("lora-dp", "lora-clear")},
                                 verdicts, "C4, here", majority=lambda data, seed: shares[seed])
    assert [v["pair"] for v in verdicts] == ["FedTT ε=6 − majority class",
                                             "LoRA ε=6 − majority class",
                                             "LoRA's loss to DP − FedTT's (ε=6)"]
    tt, lora, cost = verdicts
    assert tt["seeds"] == 4 and tt["verdict"] == "met"
    assert lora["seeds"] == 3 and lora["verdict"] == "inside the noise"  # -0.06 on seed 2
    differences = [0.10 - 0.05, 0.11 - 0.05, 0.12 - 0.05]
    mean, half = report.interval(differences)
    assert mean == pytest.approx(0.06)
    assert cost == {"where": "C4, here", "pair": "LoRA's loss to DP − FedTT's (ε=6)",
                    "difference": report.pct(mean, half), "seeds": 3,
                    "verdict": report.verdict(mean, half)}
    assert cost["verdict"] == "met" and lines[-2].endswith("**met**")
    # what the difference is made of, over the same three seeds: FedTT loses 5.0 points,
    # LoRA 11.0; without DP FedTT is 5.0 to 3.0 points lower, wholly below LoRA
    assert lines[-1].startswith("- Measured, no claim: loss to DP (no DP − ε=6) FedTT 5.0 ± 0.0, "
                                f"LoRA {report.pct(*report.interval([0.10, 0.11, 0.12]))} points")
    clear = report.interval([0.75 - 0.80, 0.76 - 0.81, 0.85 - 0.81])
    assert f"without DP, FedTT − LoRA is {report.pct(*clear)} points" in lines[-1]
    assert lines[-1].endswith("points.") == (clear[0] + clear[1] >= 0)


@pytest.mark.integration
def test_the_majority_share_is_that_of_the_split_a_seed_scores_on() -> None:
    try:
        task = tasks.load_task("bbc-news", seed=1)
    except FetchError:
        pytest.skip("bbc-news is not cached and the network is off")
    labels = task.test["label"]
    share = report.majority_share({"task": "bbc-news", "max_test_examples": 0}, 1)
    assert share == max(labels.count(c) for c in range(5)) / len(labels)
    assert 0.2 < share < 0.3  # five topics, none the majority of the test rows
    # a run's own rows: its sample of the test split, drawn with data.split_seed when set
    from fedtt.federated import runtime

    sample = {"task": "bbc-news", "max_test_examples": 40, "split_seed": 1}
    rows = runtime.sample_rows(task.test, 40, 1)["label"]
    assert report.majority_share(sample, 7) == max(rows.count(c) for c in range(5)) / 40


def test_epochs_count_only_the_rounds_a_client_took_part_in() -> None:
    """10 clients of 80 rows, 4 rounds of 5 steps x 16 = 80 examples: all clients every round
    is 4 epochs each; 2 sampled per round is 8 participations over 10 clients, 0.8 epoch."""
    def rec(picked: int) -> dict:
        rounds = [{"round": 0, "clients": []}] + [
            {"round": r, "clients": list(range(picked))} for r in (1, 2, 3, 4)]
        return {"config": {"training": {"local_steps": 5, "batch_size": 16}},
                "rounds": rounds, "label_counts": [[40, 40]] * 10}

    assert report.epochs(rec(10)) == pytest.approx(4.0)
    assert report.epochs(rec(2)) == pytest.approx(0.8)


def test_a_job_killed_part_way_resumes_its_own_run_and_nothing_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted invocation leaves its runs with a checkpoint and no summary: the next
    one resumes a run of exactly its job (config, seed, rate) and starts anything else afresh;
    the finished run's wall time counts the rounds before the resume."""
    monkeypatch.setattr(runner, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(runner, "RUNS", tmp_path / "runs")
    job = runner.Job("g/cell", 0, 0.01, runner.record_path("g/cell", 0))
    cfg = tiny(tmp_path, **{"training.seed": 0, "training.lr": 0.01, "training.threads": 1,
                            "federation.rounds": 4, "output.dir": str(job.out)})
    crash_at(cfg, monkeypatch, 3)
    config = tmp_path / "cell.toml"
    config.write_text(to_toml(cfg))
    assert "--resume" in job.command(config)
    for other in (runner.Job("g/cell", 1, 0.01, job.record), runner.Job("g/cell", 0, 0.02,
                                                                         job.record)):
        assert not other.resumable(config) and "--overwrite" in other.command(config)
    damaged = runner.Job("g/damaged", 0, 0.01, runner.record_path("g/damaged", 0))
    shutil.copytree(job.out, damaged.out)
    (damaged.out / results.CHECKPOINT).write_bytes(b"not a checkpoint")
    assert "--overwrite" in damaged.command(config)

    command = job.command(config)
    assert command[:3] == [sys.executable, "-m", "fedtt.cli"]
    assert main(command[3:]) == 0
    rec = {"summary": results.read_summary(job.out), "rounds": results.read_rounds(job.out)}
    assert rec["summary"]["status"] == "completed"
    assert rec["summary"]["resumed_from_round"] == 2
    assert [r["round"] for r in rec["rounds"]] == [0, 1, 2, 3, 4]
    assert report.run_seconds(rec) == pytest.approx(
        rec["summary"]["wall_seconds"] + sum(r["seconds"] for r in rec["rounds"][:3]))
    assert not job.resumable(config)  # finished: a new invocation writes its record or reruns


def test_a_runs_wall_time_is_its_summarys_unless_it_was_resumed() -> None:
    rounds = [{"round": r, "seconds": s} for r, s in ((0, 2.0), (1, 3.0), (2, 4.0))]
    assert report.run_seconds({"summary": {"wall_seconds": 10.0}, "rounds": rounds}) == 10.0
    assert report.run_seconds({"summary": {"wall_seconds": 10.0, "resumed_from_round": 1},
                               "rounds": rounds}) == 15.0
