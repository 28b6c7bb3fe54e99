"""fedtt's Flower ServerApp: build the strategy, run the rounds, evaluate and record each one.

The same app runs in-process (`fedtt run`, through `InProcessGrid`) and on Flower's
Deployment Engine; everything it needs comes from the run config.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterable
from typing import Protocol

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from fedtt import config as fconfig
from fedtt.federated import checkpoint, secagg
from fedtt.federated.runtime import get_runtime
from fedtt.federated.safeguards import RoundFailed, Safeguards
from fedtt.federated.strategy import FedTTStrategy
from fedtt.results import Recorder, RoundRecord

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(PollingGrid(grid), context)


class PollingGrid:
    """Flower's Deployment Engine grid, with `send_and_receive` pulling every `interval`
    seconds: Flower 1.41's own waits 3 s between pulls, which adds up to 3 s to every phase
    of every round. Only the grid's public push and pull are used; the rest is the grid's."""

    def __init__(self, grid: Grid, interval: float = 0.1) -> None:
        self._grid, self._interval = grid, interval

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """`Grid.send_and_receive` with the same meaning."""
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while pending and (end is None or time.time() < end):
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(self._interval)
        return replies


class ClientStore(Protocol):
    """The simulated clients' own state, which only an in-process grid holds."""

    def client_states(self) -> dict: ...

    def load_client_states(self, states: dict) -> None: ...


def run(grid: Grid, context: Context, clients: ClientStore | None = None) -> dict:
    """Run every round (or, with run config `fedtt-resume`, those after the checkpoint in
    the output directory); write the run directory; return the summary. `clients` is the
    in-process clients' state (None on a Deployment Engine, where the SuperNodes keep it)."""
    rt = get_runtime(context.run_config)
    cfg = rt.cfg
    in_process = clients is not None
    resumed = checkpoint.load(cfg.output.dir) if context.run_config.get("fedtt-resume") else None
    # Clients' own state comes back only in-process, from an in-process checkpoint;
    # otherwise they start empty and get every tensor again in their first round.
    restores = resumed is not None and in_process and resumed["clients"] is not None
    if resumed:
        checkpoint.check_resumable(resumed, restores_clients=restores,
                                   private=cfg.privacy.enabled, local_only=bool(rt.local_only),
                                   travelling={n: rt.initial[n] for n in rt.sent})
    progress = tqdm(total=cfg.federation.rounds, desc=f"{rt.method.name} rounds",
                    initial=resumed["round"] if resumed else 0,
                    disable=not context.run_config.get("fedtt-progress", False), file=sys.stderr)
    recorder = Recorder(cfg.output.dir, fconfig.to_toml(cfg),
                        resume_round=resumed["round"] if resumed else None)
    recorder.labels(rt.label_names, rt.label_counts)
    initial = {n: rt.initial[n] for n in rt.sent}
    strategy = FedTTStrategy(
        rt.method, initial, stateful=cfg.federation.mode == "cross-silo",
        num_clients=cfg.federation.num_clients, clients_per_round=cfg.clients_per_round(),
        seed=cfg.training.seed, client_eval=rt.client_eval,
        ledger=recorder.ledger, guard=Safeguards(
            min_replies=cfg.federation.min_replies, round_retries=cfg.federation.round_retries,
            timeout=cfg.federation.timeout, max_update_norm=cfg.federation.max_update_norm,
            update_norm_multiple=cfg.federation.update_norm_multiple,
            max_abs_value=cfg.federation.max_abs_value, max_examples=len(rt.train_data),
            max_eval_examples=len(rt.test_data),
            client_examples=({i: len(rows) for i, rows in enumerate(rt.partitions)}
                             if in_process else None),
            max_weight_share=cfg.federation.max_weight_share),
        precision=cfg.federation.precision, private=cfg.privacy.enabled,
        max_participations=(rt.privacy_plan.participations
                            if cfg.privacy.enabled and cfg.privacy.epsilon > 0 else None),
        secure=(secagg.settings_of(cfg.federation) if cfg.federation.secure_aggregation
                else None))
    if resumed:
        strategy.load_state(resumed["strategy"], clients_kept_state=restores)
        if restores:
            clients.load_client_states(resumed["clients"])
    last = recorder.rows[-1] if recorder.rows else {}
    state = {"cumulative": last.get("cumulative_bytes", 0),
             "cumulative_wire": last.get("cumulative_wire_bytes", 0),
             "last": time.perf_counter()}
    # A kept-local head lives only on its client: the server's copy of the model is not what
    # any client predicts with, so trained rounds are scored by the clients' evaluations.
    scored_by_clients = bool(rt.local_only)

    def evaluate_fn(server_round: int) -> None:
        eval_start = time.perf_counter()
        due = (server_round % cfg.federation.eval_every == 0
               or server_round == cfg.federation.rounds)
        metrics: dict = dict.fromkeys(("accuracy", "loss", "macro_f1"))
        record = strategy.stats.get(server_round) or RoundRecord(server_round, rt.method.name)
        if due and scored_by_clients and server_round > 0:
            metrics = {k: getattr(record, f"local_{k}") for k in metrics}
        elif due:
            with rt.lock:
                rt.load({**rt.initial, **strategy.global_state})  # the float32 master
                metrics = rt.evaluate_global()
                samples = rt.generate_samples()  # causal-lm: greedy outputs, fixed prompts
            if samples:
                recorder.generations(server_round, samples)
        # accuracy, loss, macro_f1 (and val_* with a validation split); causal-lm: loss,
        # perplexity, the accuracies left null
        record.update(metrics)
        record.eval_seconds = time.perf_counter() - eval_start
        state["cumulative"] += record.upload_bytes + record.download_bytes
        state["cumulative_wire"] += record.upload_wire_bytes + record.download_wire_bytes
        record.cumulative_bytes = state["cumulative"]
        record.cumulative_wire_bytes = state["cumulative_wire"]
        now = time.perf_counter()
        record.seconds = now - state["last"]
        record.epsilon = max(strategy.epsilon.values()) if strategy.epsilon else None
        record.clients_out_of_budget = strategy.out_of_budget()
        recorder.round(record)
        state["last"] = now
        if server_round > 0:
            progress.update(1)
            if due and metrics.get("accuracy") is not None:
                progress.set_postfix(acc=f"{metrics['accuracy']:.3f}",
                                     MB=f"{state['cumulative_wire'] / 1e6:.2f}")
            elif due and metrics.get("perplexity") is not None:
                progress.set_postfix(ppl=f"{metrics['perplexity']:.3g}",
                                     MB=f"{state['cumulative_wire'] / 1e6:.2f}")

    def after_round(server_round: int) -> None:
        checkpoint.save(recorder.dir, server_round, strategy.state(),
                        clients.client_states() if clients is not None else None)

    stopped = None
    try:
        strategy.run_rounds(grid, first_round=resumed["round"] + 1 if resumed else 0,
                            num_rounds=cfg.federation.rounds, timeout=cfg.federation.timeout,
                            evaluate_fn=evaluate_fn, after_round=after_round)
    except RoundFailed as exc:
        stopped = exc
    finally:
        recorder.close()
        progress.close()
    recorder.save_global(strategy.global_state)
    trainable = sum(rt.params[n].numel() for n in rt.trainable)
    failed_round = None
    if stopped:
        record = strategy.stats[stopped.server_round]
        failed_round = {"round": stopped.server_round, "failed": record.failed,
                        "rejected": record.rejected, "retries": record.retries}
    summary = recorder.finish({
        "status": "stopped" if stopped else "completed",
        "stop_reason": str(stopped) if stopped else None, "stopped_round": failed_round,
        "method": rt.method.name, "model": cfg.model.name, "task": cfg.data.task,
        "kind": rt.kind,
        "mode": cfg.federation.mode, "num_clients": cfg.federation.num_clients,
        "trainable_params": trainable, "seed": cfg.training.seed,
        "travelling_params": sum(rt.params[n].numel() for n in rt.sent),
        "precision": cfg.federation.precision,
        "epsilon_per_client": ({str(c): e for c, e in sorted(strategy.epsilon.items())}
                               if cfg.privacy.enabled else None),
        "privacy": dataclasses.asdict(cfg.privacy),
        "accuracy_source": "clients" if scored_by_clients else "server",
        "clients_out_of_budget": strategy.out_of_budget(),
        "resumed_from_round": resumed["round"] if resumed else None,
    }, plots=cfg.output.plots)
    if stopped:
        raise stopped
    return summary
