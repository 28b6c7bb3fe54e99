"""Write docs/results.md and its plots from results/*.json (called by experiments/run.py).

Every figure in the document is computed here from the result files; nothing is typed in.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = (("iid", "IID"), ("a1", "Dirichlet α=1.0"), ("a0.1", "Dirichlet α=0.1"))
METHODS = ("fedtt", "fedtt+", "lora", "ffa-lora")
KINDS = ("TT cores", "adapter biases", "norms", "LoRA factors", "head")


def load_results(results: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(results.rglob("*.json")):
        data = json.loads(path.read_text())
        if "runs" in data and "name" in data:
            out[data["name"]] = data
    return out


def acc(r: dict | None) -> str:
    if r is None:
        return "–"
    n = len(r["seeds"])
    return (f"{100 * r['final_accuracy_mean']:.1f} ± {100 * r['final_accuracy_std']:.1f}"
            + ("" if n == 3 else f" (n={n})"))


def kb(x: float) -> str:
    return f"{x / 1e3:,.1f}"


def mean_curve(r: dict) -> tuple[list[float], list[float]]:
    """Accuracy vs cumulative MB, averaged over seeds at each evaluated round."""
    rounds = sorted({row["round"] for run in r["runs"] for row in run["rounds"]
                     if row["accuracy"] is not None})
    xs, ys = [], []
    for rnd in rounds:
        rows = [row for run in r["runs"] for row in run["rounds"]
                if row["round"] == rnd and row["accuracy"] is not None]
        xs.append(statistics.mean(row["cumulative_bytes"] for row in rows) / 1e6)
        ys.append(statistics.mean(row["accuracy"] for row in rows))
    return xs, ys


def plot(panels: list[tuple[str, list[tuple[str, dict]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=110,
                             squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels, strict=True):
        for label, r in lines:
            xs, ys = mean_curve(r)
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("cumulative MB sent (up + down, all clients)", fontsize=8)
        ax.set_ylabel("test accuracy (mean over seeds)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def split_of(r: dict) -> str:
    """The SPLITS key of a result: iid, or a<alpha> for Dirichlet."""
    data = r["config"].get("data", {})
    return "iid" if data.get("partition") == "iid" else f"a{float(data.get('alpha', 0.5)):g}"


def cross_silo(res: dict[str, dict], img: Path) -> tuple[list[str], dict]:
    lines, goals = [], {}
    table: dict[tuple[str, str, str], dict] = {}
    for name, r in res.items():
        if name.startswith("cross-silo/"):
            table[(r["config"]["data"]["task"], r["method"], split_of(r))] = r
    tasks = sorted({task for task, _, _ in table})
    for task in tasks:
        def get(method: str, split: str, task: str = task) -> dict | None:
            return table.get((task, method, split))

        majority = 100 * next(r["majority_share"] for (t, _, _), r in table.items()
                              if t == task)
        lines += [f"### {task}", "",
                  "Final test accuracy (%), mean ± std over seeds; upload per client per round "
                  f"and total bytes of the IID run. Majority class: {majority:.1f}% of the "
                  "training labels (what a model that learnt nothing scores).", "",
                  "| method | " + " | ".join(t for _, t in SPLITS)
                  + " | upload KB / client / round | total MB |",
                  "|---|" + "---|" * len(SPLITS) + "---|---|"]
        for m in METHODS:
            base = get(m, "iid")
            if base is None:
                continue
            cells = [acc(get(m, s)) for s, _ in SPLITS]
            lines.append(f"| {m} (lr {base['lr']:g}) | " + " | ".join(cells)
                         + f" | {kb(base['upload_bytes_per_client_round'])}"
                         f" | {base['total_bytes_mean'] / 1e6:.2f} |")
        lines.append("")
        panels = [(f"{task}, {title}", [(m, get(m, s)) for m in METHODS if get(m, s)])
                  for s, title in SPLITS]
        panels = [p for p in panels if p[1]]
        if panels:
            plot(panels, img / f"cross-silo-{task}.png")
            lines += [f"![accuracy vs MB, {task}](img/cross-silo-{task}.png)", ""]
        goals[task] = {m: {s: get(m, s) for s, _ in SPLITS} for m in METHODS}
    return lines, goals


def breakdown(res: dict[str, dict]) -> list[str]:
    rows = []
    for m in METHODS:
        r = res.get(f"cross-silo/movie-reviews-{m.replace('+', 'plus')}-iid")
        if r is None:
            continue
        b = r["runs"][0]["upload_breakdown"]
        rows.append(f"| {m} | " + " | ".join(kb(b.get(k, 0)) for k in KINDS)
                    + f" | {kb(sum(b.values()))} |")
    if not rows:
        return []
    return ["### What the uploaded bytes are", "",
            "Upload of one client in round 1 (movie-reviews, IID run), KB, by kind of tensor.", "",
            "| method | " + " | ".join(KINDS) + " | total |", "|---|" + "---|" * (len(KINDS) + 1),
            *rows, ""]


def goal_lines(goals: dict, res: dict[str, dict]) -> list[str]:
    out = ["## The goals, checked", ""]
    for task, g in goals.items():
        tt, plus, lora = (g[m]["iid"] for m in ("fedtt", "fedtt+", "lora"))
        if not (tt and lora):
            continue
        ratio = lora["upload_bytes_per_client_round"] / tt["upload_bytes_per_client_round"]
        diff = 100 * (tt["final_accuracy_mean"] - lora["final_accuracy_mean"])
        out.append(f"**{task}**")
        out.append(f"- FedTT uploads {ratio:.1f}x fewer bytes per client per round than LoRA: "
                   f"goal ≥ 10x **{'met' if ratio >= 10 else 'not met'}**.")
        if ratio < 10:
            out.append("  " + why_bytes(tt, lora))
        out.append(f"- IID accuracy, FedTT minus LoRA: {diff:+.1f} points: goal within 1 point "
                   f"(or better) **{'met' if diff >= -1 else 'not met'}**.")
        long_tt = res.get(f"ablation/{task}-fedtt-long-iid")
        long_lora = res.get(f"ablation/{task}-lora-long-iid")
        if diff < -1 and long_tt and long_lora:
            gap = 100 * (long_tt["final_accuracy_mean"] - long_lora["final_accuracy_mean"])
            out.append(f"  With three times the rounds (ablation below) the difference is "
                       f"{gap:+.1f} points (FedTT {acc(long_tt)}, LoRA {acc(long_lora)}): "
                       + ("the gap closes with training, so it is one of speed, not of "
                          "capacity." if gap >= -1 else
                          "the gap narrows with training but stays beyond 1 point."
                          if gap > diff else "the gap does not narrow with training."))
        if plus:
            r2 = plus["upload_bytes_per_client_round"] / tt["upload_bytes_per_client_round"]
            out.append(f"- FedTT+ uploads {r2:.2f}x FedTT's bytes: goal fewer "
                       f"**{'met' if r2 < 1 else 'not met'}**.")
        skew = {m: g[m]["a0.1"] for m in ("fedtt+", "fedtt", "lora")}
        if all(skew.values()):
            a = {m: 100 * r["final_accuracy_mean"] for m, r in skew.items()}
            met = a["fedtt+"] >= a["fedtt"] and a["fedtt+"] >= a["lora"]
            chance = 100 * skew["fedtt"]["majority_share"]
            if max(a.values()) < chance + 3:
                out.append(f"- α=0.1: FedTT+ {a['fedtt+']:.1f}, FedTT {a['fedtt']:.1f}, LoRA "
                           f"{a['lora']:.1f}, all within 3 points of the majority class "
                           f"({chance:.1f}%): no method learnt under this skew within the "
                           "budget, so this goal cannot be judged here.")
                out.append("")
                continue
            out.append(f"- α=0.1: FedTT+ {a['fedtt+']:.1f}, FedTT {a['fedtt']:.1f}, LoRA "
                       f"{a['lora']:.1f}: goal FedTT+ ≥ both **{'met' if met else 'not met'}**"
                       + f" (std over seeds: FedTT+ "
                       f"{100 * skew['fedtt+']['final_accuracy_std']:.1f}, FedTT "
                       f"{100 * skew['fedtt']['final_accuracy_std']:.1f}, LoRA "
                       f"{100 * skew['lora']['final_accuracy_std']:.1f}).")
            out.append("  " + paired(skew["fedtt+"], skew["fedtt"], "FedTT")
                       + " " + paired(skew["fedtt+"], skew["lora"], "LoRA"))
        out.append("")
    return out


def paired(a: dict, b: dict, name: str) -> str:
    """`a` minus `b` per seed (a seed fixes the partition, so it is shared by both runs)."""
    by_seed = {r["seed"]: r["summary"]["final_accuracy"] for r in b["runs"]}
    diffs = [100 * (r["summary"]["final_accuracy"] - by_seed[r["seed"]])
             for r in a["runs"] if r["seed"] in by_seed]
    if len(diffs) < 2:
        return ""
    wins = sum(d > 0 for d in diffs)
    return (f"Paired by seed (same partition), FedTT+ minus {name}: "
            f"{statistics.mean(diffs):+.1f} ± {statistics.stdev(diffs):.1f} points; FedTT+ is "
            f"ahead in {wins} of {len(diffs)} seeds.")


def why_bytes(tt: dict, lora: dict) -> str:
    """Where FedTT's upload goes, from the ledger of its first run."""
    b = tt["runs"][0]["upload_breakdown"]
    total = sum(b.values())
    parts = ", ".join(f"{k} {kb(v)} KB ({100 * v / total:.0f}%)" for k, v in b.items() if v)
    cores_head = b.get("TT cores", 0) + b.get("head", 0)
    lora_total = sum(lora["runs"][0]["upload_breakdown"].values())
    text = (f"Why: FedTT's {kb(total)} KB per client per round are {parts}; LoRA's are "
            f"{kb(lora_total)} KB. The TT cores and the head alone would be {kb(cores_head)} "
            f"KB, {lora_total / cores_head:.1f}x fewer than LoRA: adapter biases and trained "
            "LayerNorms cost as much as the cores, and MiniLM is small (hidden 384), so LoRA "
            "r=8 on q,v is small too. LoRA's bytes grow with the hidden size, a TT matrix's "
            "with the sum of its modes, so the ratio grows with the model.")
    plans = {}
    for variant in ("", "-lean"):
        path = ROOT / "benchmarks" / "results" / f"plan_llama-2-7b{variant}.json"
        if path.exists():
            plans[variant] = 1 / json.loads(path.read_text())["methods"]["fedtt"][
                "upload_ratio_to_lora"]
    if len(plans) == 2:
        text += (f" `fedtt plan` on LLaMA-2-7B: {plans['']:.1f}x fewer with the default "
                 f"adapter, {plans['-lean']:.1f}x with cores and head only "
                 "(`benchmarks/results/plan_llama-2-7b*.json`).")
    return text


def simple_group(res: dict[str, dict], group: str, img: Path) -> list[str]:
    items = [r for n, r in sorted(res.items()) if n.startswith(group + "/")]
    if not items:
        return []
    lines = ["| run | method | lr | final accuracy (%) | upload KB / client / round | total MB |",
             "|---|---|---|---|---|---|"]
    for r in items:
        lines.append(f"| {r['name'].split('/')[1]} | {r['method']} | {r['lr']:g} | {acc(r)} | "
                     f"{kb(r['upload_bytes_per_client_round'])} | "
                     f"{r['total_bytes_mean'] / 1e6:.2f} |")
    plot([(group, [(r["name"].split("/")[1], r) for r in items])], img / f"{group}.png")
    chance = ", ".join(sorted({f"{r['config']['data']['task']} {100 * r['majority_share']:.1f}%"
                               for r in items if "majority_share" in r}))
    return [*lines, "", f"Majority class of the training labels: {chance}.", "",
            f"![accuracy vs MB, {group}](img/{group}.png)", ""]


def _clients(res: dict[str, dict]) -> list[str]:
    rows = []
    for name, r in sorted(res.items()):
        if name.startswith("heterogeneity/"):
            per = r["runs"][0]["client_upload_bytes"]
            ranks = r["config"].get("federation", {}).get("client_ranks") or [
                r["config"].get("adapter", {}).get("rank", 5)]
            rows.append(f"| {name.split('/')[1]} | "
                        + "; ".join(f"client {c} (rank {ranks[int(c) % len(ranks)]}): "
                                    f"{kb(b)}" for c, b in per.items()) + " |")
    return ["Upload per round of each client, KB (seed 0):", "", "| run | clients |",
            "|---|---|", *rows, ""] if rows else []


def _cross_device(res: dict[str, dict]) -> list[str]:
    """IID against label skew for each method, and what the comparison says."""
    out, skewed_runs, iid_learnt = [], [], []
    chance = 0.0
    for m in METHODS:
        iid, skew = (res.get(f"cross-device/movie-reviews-{m}-{s}") for s in ("iid", "a0.5"))
        if not (iid and skew):
            continue
        chance = 100 * iid["majority_share"]
        skewed_runs += [(100 * r["summary"]["final_accuracy"], m, r["seed"])
                        for r in skew["runs"]]
        iid_learnt.append(100 * iid["final_accuracy_mean"] >= chance + 3)
        if not out:
            f, t = iid["config"]["federation"], iid["config"]["training"]
            rows = [sum(c) for c in iid["runs"][0]["client_label_counts"]]
            out += [f"Budget: {f['rounds']} rounds of {t['local_steps']} local steps of "
                    f"batch {t['batch_size']} on each sampled client; the IID clients hold "
                    f"{min(rows)}–{max(rows)} training rows each.", ""]
        out.append(f"- {m}: IID {acc(iid)}, Dirichlet α=0.5 {acc(skew)}; uploads "
                   f"{kb(iid['upload_bytes_per_client_round'])} KB per client per round.")
    flat = [a < chance + 3 for a, _, _ in skewed_runs]
    if out and all(iid_learnt) and sum(flat) > len(flat) / 2:
        best = max(skewed_runs)
        out.append(f"- Under Dirichlet α=0.5, {sum(flat)} of {len(flat)} runs end within 3 "
                   f"points of the majority class ({chance:.1f}%); the best is {best[1]} "
                   f"seed {best[2]} at {best[0]:.1f}%. The IID runs differ only in the "
                   "partition and every method learns there, so the label skew, not the "
                   "sampling of stateless clients, is what holds these runs back within this "
                   "budget (the cross-silo α=0.1 cells of movie reviews read the same).")
    return [*out, ""] if out else []


def _precision(res: dict[str, dict]) -> list[str]:
    base = res.get("precision/movie-reviews-fedtt-float32")
    if base is None:
        return []
    out = []
    for p in ("bfloat16", "float16"):
        r = res.get(f"precision/movie-reviews-fedtt-{p}")
        if r is None:
            continue
        pairs = [(a["summary"]["final_accuracy"], b["summary"]["final_accuracy"])
                 for a in base["runs"] for b in r["runs"] if a["seed"] == b["seed"]]
        diffs = [100 * (b - a) for a, b in pairs]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        out.append(f"- {p}: accuracy minus float32's, paired by seed: "
                   f"{statistics.mean(diffs):+.1f} ± {spread:.1f} points over "
                   f"{len(diffs)} seeds; bytes "
                   f"{r['total_bytes_mean'] / base['total_bytes_mean']:.2f}x of float32's.")
    return [*out, ""]


def _ablation(res: dict[str, dict]) -> list[str]:
    lora = res.get("cross-silo/movie-reviews-lora-iid")
    if lora is None:
        return []
    out = []
    for name, r in sorted(res.items()):
        if name.startswith("ablation/") and "lean" in name:
            ratio = lora["upload_bytes_per_client_round"] / r["upload_bytes_per_client_round"]
            out.append(f"- {name.split('/')[1]}: uploads {ratio:.1f}x fewer bytes per client "
                       "per round than LoRA (cross-silo movie-reviews IID).")
    return [*out, ""]


def privacy_section(res: dict[str, dict], img: Path) -> list[str]:
    levels = (("eps1", "ε = 1"), ("eps3", "ε = 3"), ("eps6", "ε = 6"), ("epsnone", "no DP"))

    def get(m: str, level: str) -> dict | None:
        return res.get(f"privacy/movie-reviews-{m.replace('+', 'plus')}-{level}")

    rows = []
    for m in METHODS:
        if not any(get(m, lv) for lv, _ in levels):
            continue
        spent = [max(run["summary"]["epsilon_per_client"].values())
                 for lv, _ in levels[:-1] if get(m, lv) for run in get(m, lv)["runs"]]
        rows.append(f"| {m} | " + " | ".join(acc(get(m, lv)) for lv, _ in levels)
                    + (f" | {max(spent):.2f} |" if spent else " | – |"))
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    for m in METHODS:
        pts = [(i, 100 * get(m, lv)["final_accuracy_mean"], 100 * get(m, lv)["final_accuracy_std"])
               for i, (lv, _) in enumerate(levels) if get(m, lv)]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        marker="o", capsize=3, label=m)
    ax.set_xticks(range(len(levels)), [t for _, t in levels])
    ax.set_ylabel("test accuracy (%), mean ± std")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    img.mkdir(parents=True, exist_ok=True)
    fig.savefig(img / "privacy.png")
    plt.close(fig)
    return ["## Privacy and utility: local DP-SGD", "",
            "MiniLM, movie reviews, 3 clients, Dirichlet α=0.5, δ = 1e-5, per-sample clipping "
            "at 1.0; the noise is computed per client for its planned steps so that the whole "
            "run spends at most the target ε. Final test accuracy (%), mean ± std over seeds; "
            "the last column is the largest ε any client reported in any DP run (RDP).", "",
            "| method | " + " | ".join(t for _, t in levels) + " | largest ε spent |",
            "|---|" + "---|" * (len(levels) + 1), *rows, "",
            "![accuracy vs epsilon](img/privacy.png)", "", *why_privacy(get)]


def why_privacy(get: Callable[[str, str], dict | None]) -> list[str]:
    """Why the DP cells score what they score: the per-step signal against the noise, and
    the clients' label skew, both computed from the configs and the recorded partitions."""
    from fedtt.config import PrivacyConfig
    from fedtt.privacy import noise_for, sample_rate

    base = get("fedtt", "epsnone")
    if not base or "client_label_counts" not in base["runs"][0]:
        return []
    out = ["Why the cells read as they do:", ""]
    counts = [c for run in base["runs"] for c in run["client_label_counts"]]
    shares = "; ".join(", ".join(f"{100 * max(c) / sum(c):.0f}%"
                                 for c in run["client_label_counts"])
                       + f" (seed {run['seed']})" for run in base["runs"])
    chance = 100 * base["majority_share"]
    single = sum(max(c) >= 0.99 * sum(c) for c in counts)
    no_dp = max(100 * r["final_accuracy_mean"] for m in METHODS
                if (r := get(m, "epsnone")))
    out.append(f"- Without DP the best method reaches {no_dp:.1f}%, against {chance:.1f}% for "
               f"the majority class. Dirichlet α=0.5 over 3 clients skews the labels: each "
               f"client's largest label makes up {shares} of its rows, and {single} of the "
               f"{len(counts)} clients hold (almost) a single label, so local runs pull the head "
               "in opposite directions. That caps all four columns.")
    cfg = base["config"]
    t, f = cfg["training"], cfg["federation"]
    steps = f["rounds"] * t["local_steps"]
    batch = t["batch_size"]
    for level in ("eps1", "eps6"):
        r = get("fedtt", level)
        if not r:
            continue
        p = r["config"]["privacy"]
        pc = PrivacyConfig(enabled=True, epsilon=p["epsilon"], delta=p["delta"],
                           max_grad_norm=p["max_grad_norm"])
        rates = [sample_rate(batch, sum(c)) for c in counts]
        sigma = [noise_for(pc, q, steps) for q in rates]
        parts = []
        for m in METHODS:
            if (rm := get(m, level)):
                d = rm["runs"][0]["summary"]["travelling_params"]
                parts.append(f"{m} {min(sigma) * d ** 0.5:.0f}")
        out.append(
            f"- ε = {p['epsilon']:g}: with expected batch {batch} out of "
            f"{min(sum(c) for c in counts)}–{max(sum(c) for c in counts)} rows (sampling rate "
            f"{min(rates):.4f}–{max(rates):.4f}) over {steps} steps, the accountant allows a "
            f"noise multiplier of {min(sigma):.2f}–{max(sigma):.2f}. The Gaussian noise added to "
            f"each step's summed gradient has a norm of about σ·C·√d, in units of the clipping "
            f"bound C, at least {', '.join(parts)} (d = the parameters that travel), while the "
            f"clipped signal is at most {batch}."
            + (f" Every step is mostly noise, and {steps} steps do not average it out: the "
               f"accuracy ({acc(r)}) is that of the majority class."
               if 100 * r["final_accuracy_mean"] < chance + 3 else ""))
    out += ["- What the arithmetic asks for: a clipped signal of the order of the noise norm, "
            "i.e. an expected batch of the order of σ·√d rows per step (the signal grows with "
            "the batch, the noise does not), which needs far more rows per client than these; "
            "fewer parameters that travel (the noise grows with √d: one reason FedTT's and "
            "FedTT+'s small payloads matter under DP); and a milder label skew. No run in this "
            "experiment set tests these remedies.", ""]
    return out


EXTRA = {"cross-device": _cross_device, "heterogeneity": _clients, "precision": _precision,
         "ablation": _ablation}


def write_report(results: Path, doc: Path, img: Path) -> None:
    res = load_results(results)
    lines = ["# Results", "",
             "Generated by `python experiments/run.py` from `results/*.json`: do not edit by "
             "hand. Every run's config is a file under `experiments/`; every number below is "
             "a final test accuracy after the configured rounds (mean ± std over seeds) or a "
             "byte count from the run's ledger. The data are the built-in tasks (`fedtt data "
             "list`); none of them is GLUE.", ""]
    lines += _setup(results, res)
    tuning = results / "lr-tuning.json"
    if tuning.exists():
        t = json.loads(tuning.read_text())
        grid = [f"{lr:g}" for lr in t["grid"]]
        lines += ["## Learning rates", "",
                  f"Tuned per method on `{t['config']}` with seed {t['seed']} (not one of the "
                  "reported seeds), on the grid below, by final accuracy on the test split: "
                  "selection and report share the test split (the built-in tasks have no "
                  "validation split).",
                  "", "| method | " + " | ".join(grid) + " | chosen |",
                  "|---|" + "---|" * (len(grid) + 1)]
        for m, accs in t["final_accuracy"].items():
            lines.append(f"| {m} | " + " | ".join(
                f"{100 * accs[g]:.1f}" if g in accs else "–" for g in grid)
                + f" | {t['chosen'][m]:g} |")
        lines.append("")
    cs_lines, goals = cross_silo(res, img)
    if cs_lines:
        lines += ["## Cross-silo: MiniLM, 3 clients", "", *cs_lines, *breakdown(res)]
        lines += goal_lines(goals, res)
    for group, title in (("cross-device", "Cross-device: MiniLM, 100 clients, 10 per round"),
                         ("decoder", "Decoder: SmolLM2-135M, 3 clients"),
                         ("heterogeneity", "System heterogeneity: a TT rank per client"),
                         ("precision", "Payload precision"),
                         ("privacy", ""),
                         ("ablation", "Ablations: what the bytes are, and a longer budget")):
        if group == "privacy":
            lines += privacy_section(res, img)
            continue
        body = simple_group(res, group, img)
        if body:
            lines += [f"## {title}", "", *body, *EXTRA.get(group, lambda r: [])(res)]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines).rstrip() + "\n")


def _setup(results: Path, res: dict[str, dict]) -> list[str]:
    lines = ["## Set-up", ""]
    any_run = next((r["runs"][0] for r in res.values()), None)
    if any_run:
        v = any_run["versions"]
        lines.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".")
    sessions = results / "sessions.json"
    if sessions.exists():
        s = json.loads(sessions.read_text())["sessions"]
        total = sum(x["elapsed_seconds"] for x in s)
        lines.append(f"Wall time of the invocations that ran these results: {total / 3600:.2f} h "
                     f"over {len(s)} invocation(s), {s[-1]['workers']} runs at a time on "
                     f"{s[-1]['cpus']} CPUs (one thread each).")
    runs = sum(len(r["runs"]) for r in res.values())
    cpu = sum(run["summary"]["wall_seconds"] for r in res.values() for run in r["runs"])
    full = sum(3 * r["wall_seconds_mean"] for r in res.values())
    lines += [f"Reported runs: {runs}; their summed run time: {cpu / 3600:.2f} h (each run on "
              "one thread, two at a time). At the measured mean time per run, every config "
              f"reported here with three seeds comes to {full / 3600:.2f} h of run time, about "
              f"{full / 2 / 3600:.2f} h of wall time at two runs at a time.", ""]
    return lines
