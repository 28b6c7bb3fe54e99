"""Run configuration: TOML sections as dataclasses, `--set section.key=value` overrides.

Every field has a default and help text (`fedtt config` prints them). Unknown sections or keys
and values of the wrong type are errors that name the key. Besides the fixed sections below,
each registered method brings its own section (`[fedtt]`, `[lora]`, ...: `Method.section`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtt.adapters import AdapterConfig
from fedtt.devices import DEVICE_HELP, valid_device
from fedtt.errors import ConfigError
from fedtt.methods import METHODS, Method, MethodConfig, make_method, method_sections


@dataclass
class ModelConfig:
    """The frozen backbone."""

    name: str = field(default="minilm", metadata={
        "help": "Bundled name (minilm), architecture preset (arch:tiny-bert, ...), local "
                "Hugging Face model directory, or hub id when online."})
    max_length: int = field(default=64, metadata={
        "help": "Tokens per example (truncation).", "min": 2, "max": 32768})
    dtype: str = field(default="float32", metadata={
        "help": "The frozen backbone's dtype: float32, bfloat16 or float16. Whatever trains, "
                "and every master copy, stays float32; a half backbone runs its forward "
                "passes under autocast (float16 also scales the loss). What travels is set "
                "by federation.precision.", "choices": ("float32", "bfloat16", "float16")})
    head: str = field(default="classifier", metadata={
        "help": "classifier: a new classification head. verbalizer (decoder models): no new "
                "head; each text is put into model.template and each label scored by the LM "
                "head as the log-probability of its verbalizer word after the prompt "
                "(LoRETTA's way of running LLaMA on SuperGLUE-style tasks).",
        "choices": ("classifier", "verbalizer")})
    template: str = field(default="", metadata={
        "help": "verbalizer: the prompt, with {text} where the example goes; the label word "
                "follows it. Empty = the built-in \"{text}\\nLabel:\"."})
    verbalizers: list[str] = field(default_factory=list, metadata={
        "help": "verbalizer: one word per label, in label order (scored with a leading "
                "space; several tokens score as the sum of their log-probabilities). "
                "Empty = the task's label names."})
    max_new_tokens: int = field(default=32, metadata={
        "help": "causal-lm: tokens generated (greedily) for the recorded generations and by "
                "fedtt predict (which can override it).", "min": 1, "max": 4096})


@dataclass
class DataConfig:
    """The task and how it is split across clients."""

    task: str = field(default="movie-reviews", metadata={
        "help": "Built-in task name (see `fedtt data list`), 'synthetic', or a path to a "
                "CSV / JSON lines / parquet file or a saved Hugging Face dataset directory."})
    kind: str = field(default="auto", metadata={
        "help": "classification or causal-lm (instruction tuning: loss on the response "
                "tokens, held-out loss and perplexity, greedy generations); auto = the "
                "task's own (a built-in task's kind, else classification).",
        "choices": ("auto", "classification", "causal-lm")})
    text_column: str = field(default="text", metadata={"help": "Text column of a user file."})
    label_column: str = field(default="label", metadata={"help": "Label column of a user file."})
    prompt_column: str = field(default="prompt", metadata={
        "help": "causal-lm: prompt column of a user file."})
    response_column: str = field(default="response", metadata={
        "help": "causal-lm: response column of a user file."})
    partition_column: str = field(default="", metadata={
        "help": "causal-lm: a categorical column of a user file that dirichlet and "
                "pathological partitioning skew by (a built-in causal-lm task has its own "
                "categories); empty = none, so partition must be iid."})
    generations: int = field(default=3, metadata={
        "help": "causal-lm: greedy generations recorded every eval round (generations.jsonl) "
                "for the first N held-out prompts; 0 = none.", "min": 0})
    test_path: str = field(default="", metadata={
        "help": "Optional separate test file; otherwise a seeded split of the data."})
    test_fraction: float = field(default=0.2, metadata={
        "help": "Held-out share for testing.", "above": 0, "below": 1})
    split_seed: int = field(default=-1, metadata={
        "help": "Seed of the train/test split, the row samples and the validation split; "
                "-1 = training.seed. Fix it to score runs of different training.seed on the "
                "same test rows (and choose settings on validation rows none of them tests "
                "on); training.seed still draws the partition, the initialisation and the "
                "sampling.", "min": -1})
    val_fraction: float = field(default=0.0, metadata={
        "help": "Share of the training rows held out (seeded) as a validation split, for "
                "choosing settings without the test split: evaluated with the test split "
                "(val_accuracy, val_loss in rounds.jsonl); 0 = none.", "min": 0, "below": 1})
    partition: str = field(default="iid", metadata={
        "help": "iid, dirichlet (label skew with alpha) or pathological (k classes each).",
        "choices": ("iid", "dirichlet", "pathological")})
    alpha: float = field(default=0.5, metadata={
        "help": "Dirichlet concentration (> 0).", "above": 0})
    classes_per_client: int = field(default=2, metadata={"help": "Pathological: k.", "min": 1})
    max_train_examples: int = field(default=0, metadata={
        "help": "Use at most this many training rows (seeded sample); 0 = all.", "min": 0})
    max_test_examples: int = field(default=500, metadata={
        "help": "Evaluate on at most this many test rows (seeded sample); 0 = all.", "min": 0})


@dataclass
class FederationConfig:
    """Who takes part, and how often."""

    mode: str = field(default="cross-silo", metadata={
        "help": "cross-silo: every client every round, clients keep state; cross-device: a "
                "sample each round, clients stateless.",
        "choices": ("cross-silo", "cross-device")})
    num_clients: int = field(default=3, metadata={
        "help": "Number of clients (partitions).", "min": 1})
    clients_per_round: int = field(default=0, metadata={
        "help": "cross-device: clients sampled per round (0 = 10% of num_clients).", "min": 0})
    rounds: int = field(default=10, metadata={"help": "Communication rounds.", "min": 1})
    precision: str = field(default="float32", metadata={
        "help": "Tensors on the wire, both directions: float32, bfloat16 or float16 (each "
                "side keeps its master copy in float32).",
        "choices": ("float32", "bfloat16", "float16")})
    eval_every: int = field(default=1, metadata={
        "help": "Evaluate the global model every N rounds (round 0 and the last round "
                "always); rounds in between record bytes with null metrics.", "min": 1})
    client_eval: bool = field(default=False, metadata={
        "help": "Also evaluate the global model on each client's local test split."})
    min_replies: int = field(default=1, metadata={
        "help": "Fewest valid client updates a round needs; below it the round is retried, "
                "then the run stops with the global model unchanged.", "min": 1})
    round_retries: int = field(default=1, metadata={
        "help": "How often a round short of min_replies asks the missing clients again.",
        "min": 0})
    timeout: float = field(default=600.0, metadata={
        "help": "Seconds to wait for a client's reply (in-process: for each client in turn).",
        "above": 0})
    max_update_norm: float = field(default=0.0, metadata={
        "help": "Clip each client's update (all its tensors together) to this L2 norm; "
                "0 = no fixed bound.", "min": 0})
    update_norm_multiple: float = field(default=2.0, metadata={
        "help": "Clip each client's update to this multiple of the round's median update "
                "norm (with 3 or more replies), so one poisoned but finite update cannot "
                "outweigh an honest majority; 0 = off.", "min": 0})
    max_weight_share: float = field(default=1.0, metadata={
        "help": "Cap any client's share of the FedAvg weight (example counts are the "
                "clients' own claims on a deployment; in-process they are checked against "
                "the partitions); 1 = no cap.", "above": 0, "max": 1})
    max_abs_value: float = field(default=1e4, metadata={
        "help": "Reject a reply holding any value larger than this in magnitude.", "above": 0})
    secure_aggregation: bool = field(default=False, metadata={
        "help": "SecAgg+ (Flower's primitives): clients mask their updates and the server "
                "unmasks only their weighted sum (docs/design.md, Secure aggregation). Costs "
                "three extra message exchanges per round; per-reply checks give way to "
                "client-side bounds and a check of the aggregate."})
    secagg_threshold: float = field(default=0.5, metadata={
        "help": "Secure aggregation: a secret is rebuilt from the shares of more than this "
                "share of the round's clients (and at least 2); a round survives dropouts "
                "that leave that many.", "above": 0, "below": 1})
    secagg_clip: float = field(default=1.0, metadata={
        "help": "Secure aggregation: each client clips every value of its update (trained "
                "minus received) to [-clip, clip] before masking.", "above": 0, "max": 1e4})
    secagg_bits: int = field(default=40, metadata={
        "help": "Secure aggregation: bits per quantized value of one client's update; the "
                "modulus adds ceil(log2 clients) + 1 bits, and masked vectors travel as "
                "uint32 when that fits 32 bits, else uint64.", "min": 8, "max": 52})


@dataclass
class TrainingConfig:
    """Local training on each client."""

    local_steps: int = field(default=10, metadata={
        "help": "Optimizer steps per round.", "min": 1})
    batch_size: int = field(default=32, metadata={"help": "Examples per step.", "min": 1})
    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate.", "above": 0})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay.", "min": 0})
    eval_batch_size: int = field(default=128, metadata={
        "help": "Examples per eval batch.", "min": 1})
    seed: int = field(default=0, metadata={
        "help": "Seed for init, partition and sampling.", "min": 0, "max": 2**32 - 1})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads (0 = leave torch's default).", "min": 0})
    device: str = field(default="auto", metadata={
        "help": "Where the backbone runs: auto (CUDA when present, else CPU), cpu, cuda or "
                "cuda:N. In-process runs keep one shared backbone there; a SuperNode uses "
                "its own node config 'device' (default auto)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute each transformer block's activations in the backward pass "
                "(less memory, more compute)."})
    grad_accum_steps: int = field(default=1, metadata={
        "help": "Micro-batches of batch_size per optimizer step (an optimizer step sees "
                "grad_accum_steps x batch_size examples).", "min": 1})


@dataclass
class PrivacyConfig:
    """Local DP-SGD on every client (off by default)."""

    enabled: bool = field(default=False, metadata={"help": "Train every client with DP-SGD."})
    epsilon: float = field(default=0.0, metadata={
        "help": "Target epsilon per client for the whole planned run; the noise is computed "
                "from it for the rounds a client is planned to train (cross-device: the 95% "
                "quantile of how often it is sampled), and the server samples only clients "
                "with budget left. Set this or noise_multiplier.", "min": 0})
    noise_multiplier: float = field(default=0.0, metadata={
        "help": "Noise std as a multiple of max_grad_norm (no budget: never stops).", "min": 0})
    delta: float = field(default=1e-5, metadata={
        "help": "Target delta.", "above": 0, "below": 1})
    nominal_examples: int = field(default=0, metadata={
        "help": "Public nominal rows per client: the Poisson sample rate is batch_size / "
                "this, so nothing a client publishes depends on its own row count. 0 = the "
                "task's training rows / num_clients (set it on a deployment whose clients "
                "bring their own data).", "min": 0})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Clip each per-sample gradient (all trained tensors together) to this norm.",
        "above": 0})
    accountant: str = field(default="rdp", metadata={
        "help": "rdp or prv (Opacus).", "choices": ("rdp", "prv")})
    secure_mode: bool = field(default=False, metadata={
        "help": "Draw each client's Poisson sample and noise from the OS's cryptographic "
                "generator (os.urandom) instead of a generator seeded from training.seed, "
                "which the server knows. Off: runs are reproducible (for experiments). On: "
                "needed for the guarantee to hold against the server; runs are no longer "
                "reproducible."})

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for an enabled config that cannot run."""
        if self.enabled and (self.epsilon > 0) == (self.noise_multiplier > 0):
            return [("privacy.epsilon", "and privacy.noise_multiplier: exactly one must be > 0 "
                     "when privacy.enabled")]
        return []


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = field(default="runs/latest", metadata={"help": "Output directory."})
    plots: bool = field(default=True, metadata={"help": "Draw plots into DIR/plots."})


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    methods: dict[str, Any] = field(default_factory=dict, repr=False)
    """The registered methods' own sections by name (read as `cfg.fedtt`, `cfg.lora`, ...)."""

    def __post_init__(self) -> None:
        for section, kind in method_sections().items():
            self.methods.setdefault(section, kind())

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["methods"][name]
        except KeyError:
            raise AttributeError(f"RunConfig has no section {name!r}") from None

    def make_method(self, name: str | None = None) -> Method:
        """The method `name` (default: method.name) built from its section and [adapter]."""
        name = name or self.method.name
        section = METHODS[name].section if name in METHODS else ""
        return make_method(name, self.adapter, self.methods.get(section))

    def validate(self) -> None:
        """Every field within the bounds its metadata declares (see `check_fields`), then the
        rules that tie fields together; errors name the key."""
        for section in sections():
            check_fields(section, getattr(self, section))
        checks = [
            ("method.name", self.method.name in METHODS, f"must be one of {', '.join(METHODS)}"),
            ("federation.min_replies", self.federation.min_replies <= self.clients_per_round(),
             "must be between 1 and the clients per round"),
        ]
        checks += [(key, False, why) for key, why in self.privacy.problems()]
        if self.federation.secure_aggregation:
            checks += self._secagg_checks()
        checks += _scale_checks(self)
        if self.method.name in METHODS:
            try:
                self.adapter.validate()
                method = self.make_method()  # the method's own rules (e.g. fedtt+'s policy)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            checks += method.checks(self)
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} {why}, got {_get(self, key)!r}")

    def _secagg_checks(self) -> list[tuple[str, bool, str]]:
        """Rules for `federation.secure_aggregation` (the server sees only a sum)."""
        fed, n = self.federation, self.clients_per_round()
        checks = [
            ("federation.num_clients", n >= 2, "must give at least 2 clients per round with "
             "secure aggregation (a sum of one update is that update)"),
            ("federation.max_weight_share", fed.max_weight_share == 1.0, "must be 1 with "
             "secure aggregation: the server never sees a client's weight"),
            ("federation.secagg_bits", fed.secagg_bits + math.ceil(math.log2(max(n, 2))) + 1
             <= 64, f"leaves no room in 64 bits for the sum of {n} clients"),
        ]
        if self.method.name in METHODS:
            method = self.make_method()
            checks.append(("method.name", method.aggregates_by_mean, "with its settings does "
                           "not aggregate by a weighted mean, which secure aggregation needs "
                           "(fedtt: aggregation 'factor', and no client_ranks)"))
        return checks

    def clients_per_round(self) -> int:
        fed = self.federation
        if fed.mode == "cross-silo":
            return fed.num_clients
        return min(fed.num_clients, fed.clients_per_round or max(1, fed.num_clients // 10))


def _scale_checks(cfg: RunConfig) -> list[tuple[str, bool, str]]:
    """Rules for devices, precision, the verbalizer head and causal-lm tasks (issue #17)."""
    m, t, private = cfg.model, cfg.training, cfg.privacy.enabled
    checks = [("training.device", valid_device(t.device), f"must be {DEVICE_HELP}")]
    if task_kind(cfg) == "causal-lm":
        checks += [
            ("model.head", m.head == "classifier", "must be left at its default for a "
             "causal-lm task (no head: the LM head predicts the response)"),
            ("privacy.enabled", not private, "is not supported for causal-lm tasks yet"),
        ]
    else:
        checks.append(("data.partition_column", cfg.data.partition_column == "",
                       "is for causal-lm tasks (classification partitions by label)"))
    if m.head == "verbalizer":
        checks.append(("model.template", m.template == "" or m.template.count("{text}") == 1,
                       "must hold {text} exactly once"))
        checks.append(("model.verbalizers", all(w.strip() for w in m.verbalizers),
                       "must be non-empty words"))
    if private:
        checks += [
            ("model.dtype", m.dtype == "float32", "must be float32 under privacy.enabled "
             "(Opacus' per-sample gradients are not checked with a half backbone)"),
            ("training.grad_accum_steps", t.grad_accum_steps == 1, "must be 1 under "
             "privacy.enabled (DP-SGD draws its own Poisson batches)"),
            ("training.gradient_checkpointing", not t.gradient_checkpointing,
             "must be false under privacy.enabled (Opacus' hooks see each forward pass)"),
        ]
    return checks


def task_kind(cfg: RunConfig) -> str:
    """The run's task kind, classification or causal-lm (`fedtt.data.task_kind`)."""
    if cfg.data.kind != "auto":
        return cfg.data.kind
    from fedtt.data.loader import task_kind as resolve

    return resolve(cfg.data)


def _get(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_fields(section: str, values: Any) -> None:
    """Check a config section's fields against the bounds their metadata declares: "choices"
    (allowed values), "min" / "max" (inclusive), "above" / "below" (exclusive); on a list
    field, every item. The error names the key, the bounds and the value."""
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            why = _out_of_bounds(item, f.metadata)
            if why:
                key = f"{section}.{f.name}" + ("" if i is None else f"[{i}]")
                raise ConfigError(f"{key} {why}, got {item!r}")


# A bound's metadata key -> how it reads in a message and the test a value must pass.
BOUNDS = {"min": (">=", operator.ge), "above": (">", operator.gt),
          "max": ("<=", operator.le), "below": ("<", operator.lt)}


def _out_of_bounds(value: Any, rules: typing.Mapping[str, Any]) -> str | None:
    """What is wrong with `value` under `rules` (a field's metadata), or None."""
    if "choices" in rules:
        choices = [str(c) for c in rules["choices"]]
        allowed = ", ".join(choices[:-1]) + " or " + choices[-1]
        return None if value in rules["choices"] else f"must be {allowed}"
    declared = [key for key in BOUNDS if key in rules]
    if all(BOUNDS[key][1](value, rules[key]) for key in declared):
        return None
    return "must be " + " and ".join(f"{BOUNDS[key][0]} {rules[key]}" for key in declared)


def sections() -> dict[str, type]:
    """Section name -> dataclass: the fixed sections, then each registered method's own."""
    hints = typing.get_type_hints(RunConfig)
    fixed = {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if f.name != "methods"}
    return {**fixed, **method_sections()}


def _renamed(section: str, key: str) -> str:
    """' (moved to ...)' when a method's section replaced `section.key`, else ''."""
    for cls in METHODS.values():
        if f"{section}.{key}" in cls.renamed:
            return f" (it moved to {cls.section}.{cls.renamed[f'{section}.{key}']})"
    return ""


def _coerce(key: str, value: Any, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {kind}")


def apply(cfg: RunConfig, data: dict[str, Any]) -> RunConfig:
    """Overlay a nested dict (as parsed from TOML) onto `cfg`, checking keys and types."""
    known = sections()
    for section, values in data.items():
        if section not in known:
            raise ConfigError(f"unknown config section [{section}]; known: {', '.join(known)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown config key {section}.{key}{_renamed(section, key)}; "
                                  f"known in [{section}]: {', '.join(hints)}")
            setattr(target, key, _coerce(f"{section}.{key}", value, hints[key]))
    return cfg


def parse_override(text: str) -> dict[str, Any]:
    """`section.key=value` -> {section: {key: value}}; value parsed as TOML, else a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return {section: {key: value}}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values: typing.Mapping[str, Any] | None = None) -> RunConfig:
    """Defaults, then the TOML file at `path`, then `overrides` (`section.key=value` text),
    then `values` ({"section.key": value}, taken as data, never parsed as TOML); validated."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} "
                              + ("is a directory" if path.is_dir() else "does not exist"))
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        apply(cfg, data)
    for text in overrides or []:
        apply(cfg, parse_override(text))
    return from_flat(values or {}, cfg)


def from_flat(values: typing.Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """`base` (default: the defaults) with `values` ({"section.key": value}, taken as data)
    applied, validated: the way code and tests build a config without a file."""
    cfg = base or RunConfig()
    for dotted, value in values.items():
        if "." not in dotted:
            raise ConfigError(f"config key {dotted!r} must look like section.key")
        section, key = dotted.split(".", 1)
        apply(cfg, {section: {key: value}})
    cfg.validate()
    return cfg


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (written to every run's output directory)."""
    lines = []
    for section in sections():
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """A Python scalar or list of strings as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def describe() -> str:
    """Every section, key, default and help text."""
    out = []
    for section, kind in sections().items():
        out.append(f"[{section}]  {(kind.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(kind):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            out.append(f"  {f.name} = {toml_value(default)}\n      {f.metadata.get('help', '')}")
        out.append("")
    return "\n".join(out)
