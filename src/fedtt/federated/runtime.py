"""What both Flower apps need, built once per process from the run config and then reused.

One frozen backbone with the method's adapters, the tokenised task (classification, or a
causal-lm task's prompt/response pairs: `fedtt.causal_lm`), the client partitions and the
initial trainable tensors. In-process runs share one `Runtime` between the ServerApp
and every simulated client: a client costs its adapter tensors, never a model copy.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedtt import backbone, causal_lm, devices, privacy, tt
from fedtt import data as fdata
from fedtt.config import RunConfig, apply
from fedtt.methods import core_groups, largest_core_rank
from fedtt.models import load_tokenizer
from fedtt.train import Encoded, evaluate, train_local

CONFIG_KEY = "fedtt-config"  # run_config key holding the resolved config as TOML text
INPROCESS_KEY = "fedtt-inprocess"  # run_config key: clients share the server's Runtime


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from Flower's run config: TOML text under CONFIG_KEY, then any flat
    `section.key` entries as overrides (how `flwr run --run-config` passes values). An entry
    whose value is "" is unset: Flower merges an app's declared keys into every run config, and
    the repository's app declares its overridable keys as "" so they leave the TOML alone."""
    import tomllib

    cfg = RunConfig()
    text = run_config.get(CONFIG_KEY)
    if text:
        apply(cfg, tomllib.loads(str(text)))
    for key, value in run_config.items():
        if key != CONFIG_KEY and "." in key and value != "":
            apply(cfg, {key.split(".", 1)[0]: {key.split(".", 1)[1]: value}})
    cfg.validate()
    return cfg


def split_seed(cfg: RunConfig) -> int:
    """The seed of a run's train/test split, row samples and validation split:
    `data.split_seed`, else `training.seed`."""
    return cfg.data.split_seed if cfg.data.split_seed >= 0 else cfg.training.seed


def load_task_data(cfg: RunConfig) -> fdata.TaskData:
    """The run's task, as its `[data]` section names it (`fedtt.data.load`)."""
    return fdata.load(cfg.data, seed=split_seed(cfg))


def sample_rows(ds, limit: int, seed: int):
    """At most `limit` rows of `ds` (a seeded sample; 0 = all): the rows a run uses."""
    if limit and len(ds) > limit:
        return ds.shuffle(seed=seed).select(range(limit))
    return ds


def split_rows(cfg: RunConfig) -> tuple[fdata.TaskData, Any, Any, Any]:
    """The run's task and the rows it trains, tests and validates on (validation None when
    `data.val_fraction` is 0), all drawn with `split_seed`."""
    task = load_task_data(cfg)
    rows = split_seed(cfg)
    train = sample_rows(task.train, cfg.data.max_train_examples, rows)
    test = sample_rows(task.test, cfg.data.max_test_examples, rows)
    val = None
    if cfg.data.val_fraction > 0:  # held out of training, for choosing settings
        split = train.train_test_split(test_size=cfg.data.val_fraction, seed=rows)
        train, val = split["train"], split["test"]
    return task, train, test, val


class Runtime:
    """Model, data and method for one run configuration, in this process."""

    BUILD_LOG_ENV = "FEDTT_BUILD_LOG"  # instrumentation: see `_log_build`

    def __init__(self, cfg: RunConfig, device: str | None = None) -> None:
        """`device`: a SuperNode's own (its node config `device`); None = training.device."""
        import time

        started = time.time()
        self.cfg = cfg
        seed = cfg.training.seed
        if cfg.training.threads:
            torch.set_num_threads(cfg.training.threads)
        self.compute = devices.resolve(
            cfg.training.device if device is None else device, cfg.model.dtype,
            device_key="training.device" if device is None else "the node config's device")
        task, train, test, val = split_rows(cfg)
        self.kind = task.kind  # classification or causal-lm
        self.label_names = task.label_names
        self.num_labels = task.num_labels
        parts = fdata.partition(train.add_column("row", list(range(len(train)))),
                                cfg.federation.num_clients, scheme=cfg.data.partition,
                                alpha=cfg.data.alpha,
                                classes_per_partition=cfg.data.classes_per_client, seed=seed)
        self.partitions: list[list[int]] = [list(p["row"]) for p in parts]
        self.label_counts = fdata.label_counts(parts, self.num_labels)

        self.tokenizer = load_tokenizer(cfg.model.name)
        # model.head = "verbalizer": prompts, and the labels scored by the LM head
        self.verbalizer = backbone.verbalizer_for(cfg, self.tokenizer, self.label_names)
        length = cfg.model.max_length
        # causal-lm: the chat template, and the held-out prompts generated from each eval
        self.chat: causal_lm.ChatFormat | None = None
        self.sample_prompts: list[str] = []
        if self.kind == "causal-lm":
            self.chat = causal_lm.ChatFormat.build(self.tokenizer)
            self.sample_prompts = list(test["prompt"][:cfg.data.generations])

            def enc(ds) -> Encoded:
                return self.chat.encode(self.tokenizer, ds["prompt"], ds["response"], length)
        else:
            def enc(ds) -> Encoded:
                return backbone.encode(self.tokenizer, ds["text"], ds["label"], length,
                                       self.verbalizer)
        self.train_data: Encoded = enc(train)
        self.test_data: Encoded = enc(test)
        self.val_data: Encoded | None = None if val is None else enc(val)

        self.method = cfg.make_method()
        self.model = backbone.build_model(cfg, self.method, self.num_labels,
                                          verbalizer=self.verbalizer, compute=self.compute)
        if cfg.training.gradient_checkpointing:
            devices.enable_gradient_checkpointing(self.model)
        self.model.eval()
        self.params = dict(self.model.named_parameters())
        self.trainable = [n for n, p in self.params.items() if p.requires_grad]
        self.sent = self.method.sent_names(self.model)
        self.local_only = [n for n in self.trainable if n not in set(self.sent)]
        self.initial = {n: _host(self.params[n]) for n in self.trainable}  # float32, CPU
        # A kept-local head exists only on its client: such runs are scored by the clients.
        self.client_eval = cfg.federation.client_eval or bool(self.local_only)
        self.test_partitions: list[list[int]] = []
        if self.client_eval:
            tparts = fdata.partition(test.add_column("row", list(range(len(test)))),
                                     cfg.federation.num_clients, scheme="iid", seed=seed)
            self.test_partitions = [list(p["row"]) for p in tparts]
        self.tt_groups = core_groups(self.sent)  # TT layer -> its travelling cores
        self.tt_rank = largest_core_rank({n: self.params[n] for n in self.sent})
        self._privacy: privacy.Plan | None = None
        self._layouts: dict[int | None, dict[str, torch.Size]] = {}
        # Whoever uses the shared model (a client's restore-train-snapshot, the server's
        # evaluation) holds this lock and loads a complete state first, so a client abandoned
        # after a timeout can never interleave with another.
        self.lock = threading.RLock()
        self._log_build(started)

    @classmethod
    def _log_build(cls, started: float) -> None:
        """Instrumentation: with the environment variable `FEDTT_BUILD_LOG` naming a file,
        append one JSON line per model build, `{"pid", "start", "seconds"}`, so tests and
        benchmarks can count builds per process (`fedtt.federated.deploy.read_build_log`)."""
        import json
        import os
        import time

        if path := os.environ.get(cls.BUILD_LOG_ENV):
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps({"pid": os.getpid(), "start": started,
                                      "seconds": time.time() - started}) + "\n")

    # --- state swapping -------------------------------------------------------------------
    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors into the shared model (unknown names are an error). A TT core of a
        lower rank than the model's fills the leading block; the rest becomes zero."""
        with torch.no_grad():
            for name, value in state.items():
                param = self.params[name]
                if value.shape == param.shape:
                    param.copy_(value)
                else:
                    param.zero_()
                    param[tuple(slice(0, d) for d in value.shape)].copy_(value)

    # --- per-client TT ranks (fedtt.client_ranks) -----------------------------------------
    def fit_rank(self, rank: int) -> None:
        """Round every TT layer that exceeds `rank` to it (TT-SVD), kept zero-padded."""
        full, masks = self.cfg.adapter.rank, self._rank_masks(rank)
        with torch.no_grad():
            for cores in self.tt_groups.values():
                params = [self.params[c] for c in cores]
                if not any(bool((p * (1 - masks[c])).any()) for c, p in zip(cores, params,
                                                                             strict=True)):
                    continue  # already of rank `rank` (a rounded payload)
                rounded = tt.pad_cores(tt.round_cores(params, rank), full)
                for p, value in zip(params, rounded, strict=True):
                    p.copy_(value)

    def at_rank(self, tensors: Mapping[str, torch.Tensor], rank: int
                ) -> dict[str, torch.Tensor]:
        """`tensors` with each TT layer's cores cut to their rank-`rank` block."""
        out = dict(tensors)
        for cores in self.tt_groups.values():
            if all(c in out for c in cores):
                sliced = tt.slice_cores([out[c] for c in cores], rank)
                out.update({c: v.contiguous() for c, v in zip(cores, sliced, strict=True)})
        return out

    def _rank_masks(self, rank: int) -> dict[str, torch.Tensor]:
        """1 inside each core's rank-`rank` block, 0 in the padding around it."""
        masks = {}
        for cores in self.tt_groups.values():
            ones = tt.slice_cores([torch.ones_like(self.params[c]) for c in cores], rank)
            masks.update(zip(cores, tt.pad_cores(ones, self.cfg.adapter.rank), strict=True))
        return masks

    def layout(self, names: Sequence[str], rank: int | None = None
               ) -> list[tuple[str, torch.Size]]:
        """(name, shape) of travelling tensors as a client of TT rank `rank` holds them: the
        layout of a packed payload (`payload.py`)."""
        if rank not in self._layouts:
            shapes = {n: self.params[n] for n in self.sent}
            if rank:
                shapes = self.at_rank(shapes, rank)
            self._layouts[rank] = {n: t.shape for n, t in shapes.items()}
        return [(n, self._layouts[rank][n]) for n in names]

    def snapshot(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Copies of `names` on the CPU (where payloads and the server's masters live)."""
        return {n: _host(self.params[n]) for n in names}

    def set_trainable(self, names: Sequence[str]) -> None:
        wanted = set(names)
        for n in self.trainable:
            self.params[n].requires_grad_(n in wanted)

    # --- local DP (privacy.enabled) ---------------------------------------------------------
    @property
    def privacy_plan(self) -> privacy.Plan:
        """Every client's DP-SGD plan (public values only, see `privacy.plan`)."""
        if self._privacy is None:
            self._privacy = privacy.plan(self.cfg, len(self.train_data))
        return self._privacy

    # --- work -------------------------------------------------------------------------------
    def train_client(self, partition_id: int, server_round: int, names: Sequence[str],
                     rank: int | None = None) -> tuple[float, int]:
        """Train `names` (plus local-only tensors) on a partition; (mean loss, examples).
        With `rank`, TT cores train only inside their rank-`rank` block (masked gradients
        keep the zero padding zero, so the adapter stays of that rank)."""
        t = self.cfg.training
        rows = self.partitions[partition_id]
        self.set_trainable(list(names) + self.local_only)
        seed = int(hashlib.sha256(f"{t.seed}/{server_round}/{partition_id}".encode())
                   .hexdigest()[:8], 16)
        trained = list(names) + self.local_only
        params = [self.params[n] for n in trained]
        masks = self._rank_masks(rank) if rank else {}
        # Dropout draws from torch's global generator: seed it per client and round (and
        # restore it after), so results do not depend on what this process ran before.
        # DP-SGD masks its per-sample gradients itself; plain training masks `.grad`.
        hooks = [] if self.cfg.privacy.enabled else [
            self.params[n].register_hook(lambda g, m=mask: g * m) for n, mask in masks.items()]
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                generator = torch.Generator().manual_seed(seed)
                if self.cfg.privacy.enabled:
                    dp = self.privacy_plan
                    loss = privacy.train_private(
                        self.model, self.train_data, rows, params, steps=t.local_steps,
                        rate=dp.rate, expected_batch=dp.expected_batch, lr=t.lr,
                        weight_decay=t.weight_decay, noise_multiplier=dp.noise_multiplier,
                        max_grad_norm=self.cfg.privacy.max_grad_norm,
                        generator=(privacy.SecureRandom() if self.cfg.privacy.secure_mode
                                   else generator),
                        masks=[masks.get(n) for n in trained], compute=self.compute)
                else:
                    loss = train_local(self.model, self.train_data, rows, params,
                                       steps=t.local_steps, batch_size=t.batch_size, lr=t.lr,
                                       weight_decay=t.weight_decay, generator=generator,
                                       accum_steps=t.grad_accum_steps, compute=self.compute)
        finally:
            for hook in hooks:
                hook.remove()
        self.set_trainable(self.trainable)
        return loss, len(rows)

    def _evaluate(self, data: Encoded, rows: Sequence[int] | None = None) -> dict[str, float]:
        """Classification: accuracy, loss, macro_f1; causal-lm: loss and perplexity."""
        if self.kind == "causal-lm":
            return causal_lm.evaluate_lm(self.model, data, rows,
                                         batch_size=self.cfg.training.eval_batch_size,
                                         compute=self.compute)
        return evaluate(self.model, data, rows, batch_size=self.cfg.training.eval_batch_size,
                        num_labels=self.num_labels, compute=self.compute)

    def evaluate_global(self) -> dict[str, float]:
        """The loaded model on the test split, and (`val_*`) on the validation split."""
        metrics = self._evaluate(self.test_data)
        if self.val_data is not None:
            metrics.update({f"val_{k}": v for k, v in self._evaluate(self.val_data).items()})
        return metrics

    def evaluate_client(self, partition_id: int) -> tuple[dict[str, float], int]:
        rows = self.test_partitions[partition_id]
        return self._evaluate(self.test_data, rows), len(rows)

    def generate_samples(self) -> list[dict[str, str]]:
        """causal-lm: the loaded model's greedy outputs for the fixed held-out prompts."""
        if self.chat is None or not self.sample_prompts:
            return []
        outputs = causal_lm.generate(self.model, self.tokenizer, self.chat,
                                     self.sample_prompts,
                                     max_new_tokens=self.cfg.model.max_new_tokens,
                                     max_length=self.cfg.model.max_length,
                                     compute=self.compute)
        return [{"prompt": p, "output": o}
                for p, o in zip(self.sample_prompts, outputs, strict=True)]


def _host(param: torch.Tensor) -> torch.Tensor:
    """A detached copy of `param` on the CPU."""
    value = param.detach()
    return value.clone() if value.device.type == "cpu" else value.cpu()


_CACHE: dict[str, Runtime] = {}


def get_runtime(run_config: Mapping[str, Any], device: str | None = None) -> Runtime:
    """The process-wide Runtime for this run config (built on first use). `device`: a
    SuperNode's own device (node config `device`); None = the config's training.device."""
    key = hashlib.sha256(repr((sorted(run_config.items()), device)).encode()).hexdigest()
    if key not in _CACHE:
        _CACHE.clear()  # one run at a time per process: free the previous model
        _CACHE[key] = Runtime(config_from_run_config(run_config), device)
    return _CACHE[key]

