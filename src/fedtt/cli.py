"""The `fedtt` command line: plan, run, deploy, report, config, data."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedtt.config import RunConfig


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set federation.rounds=5 (repeatable)")


def cmd_plan(args: argparse.Namespace) -> int:
    from fedtt.config import ConfigError, load_config
    from fedtt.methods import METHODS
    from fedtt.plan import format_plan, plan

    if args.num_labels < 2:
        raise ConfigError(f"--num-labels must be >= 2, got {args.num_labels}")
    cfg = load_config(args.config, args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; use {', '.join(METHODS)}")
    result = plan(args.model or cfg.model.name, methods, cfg.adapter, cfg,
                  num_labels=args.num_labels, precision=cfg.federation.precision)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of `run`/`deploy` (see `_load_run_config`), with a note when DP runs
    reproducibly, i.e. with noise the server could regenerate; with --resume, once the
    checkpoint has been checked."""
    cfg = _load_run_config(args)
    if cfg.privacy.enabled and not cfg.privacy.secure_mode:
        print("fedtt: note: privacy.secure_mode is off, so each client's noise comes from "
              "training.seed, which the server knows: fine for experiments, but set "
              "privacy.secure_mode = true before training on data that needs the guarantee.",
              file=sys.stderr)
    if args.resume:
        _check_resume(cfg, in_process=args.command == "run")
    return cfg


def _check_resume(cfg: RunConfig, *, in_process: bool) -> None:
    """Refuse a resume from a checkpoint that is damaged, or that lacks client state the run
    needs (in-process clients get theirs back from the checkpoint, fresh SuperNodes do not),
    before anything is started or changed."""
    from fedtt.federated import checkpoint

    resumed = checkpoint.load(cfg.output.dir)
    checkpoint.check_resumable(
        resumed, restores_clients=in_process and resumed["clients"] is not None,
        private=cfg.privacy.enabled, local_only=cfg.adapter.head == "keep-local")


def _load_run_config(args: argparse.Namespace) -> RunConfig:
    """From --config/--set/--out into a new (or, with --overwrite, reused) run directory;
    or with --resume the killed run's own config.toml, writing into that directory again."""
    from fedtt.config import ConfigError, load_config

    rounds = getattr(args, "rounds", None)  # `deploy` has no --rounds
    if not args.resume:
        if rounds is not None:
            raise ConfigError("--rounds continues a run with --resume DIR; a new run takes "
                              "--set federation.rounds=N")
        cfg = load_config(args.config, args.overrides,
                          {"output.dir": args.out} if args.out else None)
        _claim_run_dir(Path(cfg.output.dir), overwrite=args.overwrite)
        return cfg
    if args.config or args.overrides or args.out or args.overwrite:
        raise ConfigError("--resume continues a run with its own config.toml: leave out "
                          "--config, --set, --out and --overwrite")
    run_dir = Path(args.resume)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} is not a fedtt run directory (no config.toml)")
    if _status(run_dir) == "completed" and rounds is None:
        hint = " (fedtt run --rounds N continues it to N rounds)" if args.command == "run" else ""
        raise ConfigError(f"{run_dir} finished already; nothing to resume{hint}")
    cfg = load_config(run_dir / "config.toml", values={"output.dir": str(run_dir)})
    return cfg if rounds is None else _extended(cfg, rounds)


def _extended(cfg: RunConfig, rounds: int) -> RunConfig:
    """`cfg` with `rounds` rounds in all: a finished or killed run continued past its end,
    to what a run of `rounds` rounds from the start would have recorded (save an evaluation
    at its old last round). Refused under DP, whose noise and budget were set for its rounds."""
    from fedtt.config import ConfigError, from_flat

    planned = cfg.federation.rounds
    if rounds <= planned:
        raise ConfigError(f"--rounds {rounds}: the run in {cfg.output.dir} has {planned} "
                          f"rounds; --rounds continues it to more")
    if cfg.privacy.enabled:
        raise ConfigError(f"--rounds: the run in {cfg.output.dir} is private, and its noise and "
                          f"privacy budget were set for {planned} rounds; start a new run "
                          "with --set federation.rounds instead")
    return from_flat({"federation.rounds": rounds}, cfg)


def _claim_run_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse to write a new run into a directory that holds anything, unless `overwrite`."""
    from fedtt.config import ConfigError
    from fedtt.results import CHECKPOINT, clear_finished

    if not _directory(out, "output.dir").exists() or not any(out.iterdir()):
        return
    if overwrite:
        clear_finished(out)
        return
    unfinished = (out / CHECKPOINT).exists() and _status(out) != "completed"
    hint = f"continue its run with --resume {out}, " if unfinished else ""
    raise ConfigError(f"output directory {out} is not empty: {hint}choose another --out, or "
                      "pass --overwrite to replace the run in it")


def _directory(path: Path, what: str) -> Path:
    """`path`, a directory to write into (it may not exist yet): refused if it is a file."""
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file, not a directory")
    return path


def _status(run_dir: Path) -> str | None:
    """The status its summary.json records (completed, stopped), None without one."""
    from fedtt.config import ConfigError
    from fedtt.results import SUMMARY, read_summary

    try:
        summary = read_summary(run_dir)
        return None if summary is None else summary["status"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{run_dir / SUMMARY} is damaged ({exc!r}); move it away first") \
            from None


def cmd_run(args: argparse.Namespace) -> int:
    from fedtt.data import format_label_table
    from fedtt.federated.inprocess import run_inprocess
    from fedtt.results import read_labels, read_run

    cfg = _run_config(args)
    summary = run_inprocess(cfg, quiet=args.quiet, verbose=args.verbose,
                            resume=bool(args.resume))
    out = Path(cfg.output.dir)
    labels = read_labels(out)
    if not args.quiet:
        print("clients' training labels:")
        print(format_label_table(labels["counts"], labels["label_names"]))
        print()
    run = read_run(out)
    lora = ""
    from fedtt.plan import BASELINE, baseline_wire_bytes

    if summary["method"] != BASELINE:
        would = baseline_wire_bytes(cfg, run["rounds"], len(labels["label_names"]))
        lora = (f" ({cfg.make_method(BASELINE).label} would send {would / 1e6:.2f} MB, "
                "fedtt plan)")
    print(f"{summary['method']} on {summary['model']} / {summary['task']}, "
          f"{summary['num_clients']} clients, {summary['rounds']} rounds: {_score(summary)}, "
          f"{summary['wall_seconds']:.0f} s. Results in {run['dir']}\n"
          f"{summary['total_wire_bytes'] / 1e6:.2f} MB sent on the wire{lora}; "
          f"{summary['total_upload_wire_bytes'] / 1e6:.2f} up, "
          f"{summary['total_download_wire_bytes'] / 1e6:.2f} down, of which tensor payload "
          f"{summary['total_bytes'] / 1e6:.2f}")
    return 0


def _score(summary: dict) -> str:
    """A summary's headline: final and best accuracy, or (causal-lm) loss and perplexity."""
    if summary.get("final_accuracy") is None:
        return (f"final loss {summary['final_loss']:.4f}, perplexity "
                f"{summary['final_perplexity']:.4g} (best {summary['best_perplexity']:.4g})")
    return (f"final accuracy {summary['final_accuracy']:.4f} "
            f"(best {summary['best_accuracy']:.4f})")


def cmd_deploy(args: argparse.Namespace) -> int:
    from fedtt.federated.deploy import run_deployed

    cfg = _run_config(args)
    secure = not args.insecure

    def started(deployment) -> None:
        print(f"SuperLink on {deployment.address} "
              f"({'TLS + SuperNode authentication' if secure else 'insecure'}), "
              f"{cfg.federation.num_clients} SuperNodes; running...", flush=True)

    run = run_deployed(cfg, resume=bool(args.resume), secure=secure, timeout=args.timeout,
                       on_start=started)
    result, summary = run.result, run.summary
    if summary is None:
        print(f"fedtt: error: run {result.run_id} ended {result.status} without a summary; "
              f"its log:\n{result.log[-3000:]}", file=sys.stderr)
        return 1
    traffic = summary["flower_traffic"]
    print(f"run {result.run_id} {result.status}: {_score(summary)}; "
          f"Flower moved {traffic['flower']['total_bytes'] / 1e6:.2f} MB; the ledger counts "
          f"{traffic['ledger']['total_wire_bytes'] / 1e6:.2f} MB of messages "
          f"({traffic['ledger']['total_bytes'] / 1e6:.2f} MB of tensors). Results in "
          f"{run.out_dir}")
    return 0 if run.completed else 3


def cmd_report(args: argparse.Namespace) -> int:
    from fedtt.results import format_table, plot_runs, read_run

    runs = [read_run(d) for d in args.dirs]
    plots = _directory(Path(args.plots), "--plots") if args.plots else None
    print(format_table(runs))
    if plots:
        for path in plot_runs(args.dirs, plots):
            print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedtt.export import export_run

    out = export_run(args.run_dir, _directory(Path(args.out), "--out"), merge=args.merge)
    kind = "a Hugging Face model directory (adapters merged)" if args.merge else \
        "adapters and a manifest (fedtt predict loads them)"
    print(f"wrote {kind} to {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from fedtt.data import DataError
    from fedtt.export import load_exported

    texts = list(args.texts)
    if args.file:
        texts += read_texts(Path(args.file), args.text_column)
    if not texts:
        raise DataError("nothing to predict: give texts or --file")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise DataError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    predictor = load_exported(args.model_dir)
    if predictor.kind == "causal-lm":
        outputs = predictor.generate(texts, args.max_new_tokens)
        for text, output in zip(texts, outputs, strict=True):
            print(json.dumps({"prompt": text, "output": output}, ensure_ascii=False)
                  if args.json else f"{text}\t{output}")
        return 0
    if args.json:
        probs = predictor.scores(texts)
        for text, row in zip(texts, probs, strict=True):
            scores = dict(zip(predictor.label_names, map(float, row), strict=True))
            print(json.dumps({"text": text, "label": max(scores, key=scores.get),
                              "scores": scores}))
    else:
        for text, (label, score) in zip(texts, predictor.predict(texts), strict=True):
            print(f"{label}\t{score:.4f}\t{text}")
    return 0


def read_texts(path: Path, column: str) -> list[str]:
    """The texts of --file, from its column `column`: the data package's reader
    (`fedtt.data.read_texts`), so .txt (one per line) or any file a run reads."""
    from fedtt.data import read_texts as read

    return read(path, column)


def cmd_config(args: argparse.Namespace) -> int:
    from fedtt.config import describe, load_config, to_toml

    if args.config or args.overrides:
        print(to_toml(load_config(args.config, args.overrides)))
    else:
        print(describe())
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from fedtt import data

    if args.action == "list":
        for t in data.list_tasks():
            print(f"{t['name']:<16} {t['description']}")
        return 0
    names = args.names or [t["name"] for t in data.list_tasks()]
    for name in names:
        task = data.load_task(name)
        print(f"{name}: {len(task.train)} train / {len(task.test)} test, "
              f"labels {task.label_names}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtt", description="Federated fine-tuning with tensor-train adapters.")
    from fedtt.results import versions

    found = versions()
    parser.add_argument("--version", action="version", version=f"fedtt {found.pop('fedtt')} ("
                        + ", ".join(f"{k} {v}" for k, v in found.items()) + ")")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="trainable parameters and bytes per round, per method")
    p.add_argument("--model", help="model spec (default: the config's model.name)")
    p.add_argument("--methods", default="fedtt,fedtt+,lora,ffa-lora")
    p.add_argument("--num-labels", type=int, default=2)
    p.add_argument("--config", help="TOML config (adapter/method settings)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_overrides(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run a federation in this process")
    p.add_argument("--config", help="TOML config file (default: built-in defaults)")
    p.add_argument("--out", help="output directory (overrides output.dir); must be new or "
                                 "empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show Flower's log")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the killed run in DIR from its last checkpoint")
    p.add_argument("--rounds", type=int, metavar="N",
                   help="with --resume: continue the run (finished or not) to N rounds in all")
    _add_overrides(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("deploy", help="run on Flower's Deployment Engine on this machine: a "
                                      "SuperLink and one SuperNode per client, over TLS")
    p.add_argument("--config", help="TOML config file (default: built-in defaults)")
    p.add_argument("--out", help="output directory (overrides output.dir); must be new or "
                                 "empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty output directory")
    p.add_argument("--insecure", action="store_true",
                   help="plain HTTP without SuperNode authentication (local trials only)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the killed run in DIR from its last checkpoint on fresh "
                        "SuperNodes (they get every tensor again in their first round)")
    _add_overrides(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("report", help="compare finished runs: table and plots")
    p.add_argument("dirs", nargs="+", help="run directories")
    p.add_argument("--plots", help="write comparison plots to this directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="print every config key with its default and help, "
                                      "or the resolved config of --config/--set")
    p.add_argument("--config")
    _add_overrides(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("export", help="write a finished run's model: adapters, or a merged "
                                      "Hugging Face model directory (LoRA)")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--merge", action="store_true",
                   help="fold LoRA into the weights (not possible for TT adapters)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="label texts with an exported model (a causal-lm "
                                       "model: generate greedily from prompts)")
    p.add_argument("model_dir")
    p.add_argument("texts", nargs="*", help="texts to label")
    p.add_argument("--file", help=".txt (one text per line), .csv, .jsonl or .parquet")
    p.add_argument("--text-column", default="text", help="text column of --file")
    p.add_argument("--json", action="store_true", help="one JSON object per text, all scores "
                   "(a causal-lm model: prompt and output)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="causal-lm: tokens to generate (default: the run's model.max_new_tokens)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("data", help="built-in tasks: list, or fetch and prepare")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("names", nargs="*")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from fedtt.config import ConfigError
    from fedtt.data import DataError
    from fedtt.export import ExportError
    from fedtt.federated.checkpoint import CheckpointError
    from fedtt.federated.safeguards import RoundFailed
    from fedtt.fetch import FetchError

    # The user's mistakes, each reported in one line; anything else is a bug: its traceback
    # is kept.
    user_errors = (ConfigError, DataError, CheckpointError, ExportError, FetchError,
                   FileNotFoundError, NotADirectoryError)
    from fedtt.federated.deploy import DeploymentTimeout

    try:
        return args.func(args)
    except (RoundFailed, DeploymentTimeout) as exc:
        print(f"fedtt: stopped: {exc}", file=sys.stderr)
        return 3
    except user_errors as exc:
        print(f"fedtt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
