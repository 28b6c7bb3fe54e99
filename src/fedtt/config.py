"""Run configuration: TOML sections as dataclasses, `--set section.key=value` overrides.

Every field has a default and help text (`fedtt config` prints them). Unknown sections or keys
and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtt.adapters import AdapterConfig
from fedtt.methods import MethodConfig


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


@dataclass
class ModelConfig:
    """The frozen backbone."""

    name: str = field(default="minilm", metadata={
        "help": "Bundled name (minilm), architecture preset (arch:tiny-bert, ...), local "
                "Hugging Face model directory, or hub id when online."})
    max_length: int = field(default=64, metadata={"help": "Tokens per example (truncation)."})


@dataclass
class DataConfig:
    """The task and how it is split across clients."""

    task: str = field(default="movie-reviews", metadata={
        "help": "Built-in task name (see `fedtt data list`), 'synthetic', or a path to a "
                "CSV / JSON lines / parquet file or a saved Hugging Face dataset directory."})
    text_column: str = field(default="text", metadata={"help": "Text column of a user file."})
    label_column: str = field(default="label", metadata={"help": "Label column of a user file."})
    test_path: str = field(default="", metadata={
        "help": "Optional separate test file; otherwise a seeded split of the data."})
    test_fraction: float = field(default=0.2, metadata={"help": "Held-out share for testing."})
    partition: str = field(default="dirichlet", metadata={
        "help": "iid, dirichlet (label skew with alpha) or pathological (k classes each)."})
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (> 0)."})
    classes_per_client: int = field(default=2, metadata={"help": "Pathological: k."})
    max_train_examples: int = field(default=0, metadata={
        "help": "Use at most this many training rows (seeded sample); 0 = all."})
    max_test_examples: int = field(default=500, metadata={
        "help": "Evaluate on at most this many test rows (seeded sample); 0 = all."})


@dataclass
class FederationConfig:
    """Who takes part, and how often."""

    mode: str = field(default="cross-silo", metadata={
        "help": "cross-silo: every client every round, clients keep state; cross-device: a "
                "sample each round, clients stateless."})
    num_clients: int = field(default=3, metadata={"help": "Number of clients (partitions)."})
    clients_per_round: int = field(default=0, metadata={
        "help": "cross-device: clients sampled per round (0 = 10% of num_clients)."})
    rounds: int = field(default=10, metadata={"help": "Communication rounds."})
    client_ranks: list[int] = field(default_factory=list, metadata={
        "help": "fedtt: each client's TT rank by partition id (cycled), e.g. [2, 5, 8]; a "
                "SuperNode's node config 'tt-rank' overrides. The global adapter keeps "
                "adapter.rank, aggregates exactly and each client gets its TT-SVD rounding. "
                "Empty = every client at adapter.rank."})
    precision: str = field(default="float32", metadata={
        "help": "Tensors on the wire, both directions: float32, bfloat16 or float16 (each "
                "side keeps its master copy in float32)."})
    eval_every: int = field(default=1, metadata={
        "help": "Evaluate the global model every N rounds (round 0 and the last round "
                "always); rounds in between record bytes with null metrics."})
    client_eval: bool = field(default=False, metadata={
        "help": "Also evaluate the global model on each client's local test split."})
    min_replies: int = field(default=1, metadata={
        "help": "Fewest valid client updates a round needs; below it the round is retried, "
                "then the run stops with the global model unchanged."})
    round_retries: int = field(default=1, metadata={
        "help": "How often a round short of min_replies asks the missing clients again."})
    timeout: float = field(default=600.0, metadata={
        "help": "Seconds to wait for a client's reply (in-process: for each client in turn)."})
    max_update_norm: float = field(default=0.0, metadata={
        "help": "Clip each client's update (all its tensors together) to this L2 norm; "
                "0 = off."})
    max_abs_value: float = field(default=1e4, metadata={
        "help": "Reject a reply holding any value larger than this in magnitude."})


@dataclass
class TrainingConfig:
    """Local training on each client."""

    local_steps: int = field(default=10, metadata={"help": "Optimizer steps per round."})
    batch_size: int = field(default=32, metadata={"help": "Examples per step."})
    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    eval_batch_size: int = field(default=128, metadata={"help": "Examples per eval batch."})
    seed: int = field(default=0, metadata={"help": "Seed for init, partition and sampling."})
    threads: int = field(default=0, metadata={
        "help": "torch CPU threads (0 = leave torch's default)."})


@dataclass
class PrivacyConfig:
    """Local DP-SGD on every client (off by default)."""

    enabled: bool = field(default=False, metadata={"help": "Train every client with DP-SGD."})
    epsilon: float = field(default=0.0, metadata={
        "help": "Target epsilon per client for the whole planned run; the noise is computed "
                "from it. Set this or noise_multiplier."})
    noise_multiplier: float = field(default=0.0, metadata={
        "help": "Noise std as a multiple of max_grad_norm (no budget: never stops)."})
    delta: float = field(default=1e-5, metadata={"help": "Target delta."})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "Clip each per-sample gradient (all trained tensors together) to this norm."})
    accountant: str = field(default="rdp", metadata={"help": "rdp or prv (Opacus)."})
    secure_mode: bool = field(default=False, metadata={
        "help": "Draw each client's Poisson sample and noise from the OS's cryptographic "
                "generator (os.urandom) instead of a generator seeded from training.seed, "
                "which the server knows. Off: runs are reproducible (for experiments). On: "
                "needed for the guarantee to hold against the server; runs are no longer "
                "reproducible."})

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for an enabled config that cannot run."""
        if not self.enabled:
            return []
        out = []
        if (self.epsilon > 0) == (self.noise_multiplier > 0):
            out.append(("privacy.epsilon", "and privacy.noise_multiplier: exactly one must be "
                        "> 0 when privacy.enabled"))
        if self.max_grad_norm <= 0:
            out.append(("privacy.max_grad_norm", "must be > 0"))
        if not 0 < self.delta < 1:
            out.append(("privacy.delta", "must be in (0, 1)"))
        if self.accountant not in ("rdp", "prv"):
            out.append(("privacy.accountant", "must be rdp or prv"))
        return out


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

    def validate(self) -> None:
        """Range checks that types alone cannot express; errors name the key."""
        checks = [
            ("federation.num_clients", self.federation.num_clients >= 1, "must be >= 1"),
            ("federation.rounds", self.federation.rounds >= 1, "must be >= 1"),
            ("federation.clients_per_round", self.federation.clients_per_round >= 0,
             "must be >= 0"),
            ("federation.mode", self.federation.mode in ("cross-silo", "cross-device"),
             "must be cross-silo or cross-device"),
            ("federation.min_replies", 1 <= self.federation.min_replies
             <= self.clients_per_round(), "must be between 1 and the clients per round"),
            ("federation.precision", self.federation.precision in
             ("float32", "bfloat16", "float16"), "must be float32, bfloat16 or float16"),
            ("federation.eval_every", self.federation.eval_every >= 1, "must be >= 1"),
            ("federation.round_retries", self.federation.round_retries >= 0, "must be >= 0"),
            ("federation.timeout", self.federation.timeout > 0, "must be > 0"),
            ("federation.max_update_norm", self.federation.max_update_norm >= 0,
             "must be >= 0"),
            ("federation.max_abs_value", self.federation.max_abs_value > 0, "must be > 0"),
            ("data.alpha", self.data.alpha > 0, "must be > 0"),
            ("data.partition", self.data.partition in ("iid", "dirichlet", "pathological"),
             "must be iid, dirichlet or pathological"),
            ("data.test_fraction", 0 < self.data.test_fraction < 1, "must be in (0, 1)"),
            ("training.local_steps", self.training.local_steps >= 1, "must be >= 1"),
            ("training.batch_size", self.training.batch_size >= 1, "must be >= 1"),
            ("training.lr", self.training.lr > 0, "must be > 0"),
            ("model.max_length", self.model.max_length >= 2, "must be >= 2"),
            ("adapter.rank", self.adapter.rank >= 1, "must be >= 1"),
            ("adapter.bottleneck", self.adapter.bottleneck >= 1, "must be >= 1"),
            ("method.aggregation", self.method.aggregation in ("factor", "exact"),
             "must be factor or exact"),
            ("method.lora_rank", self.method.lora_rank >= 1, "must be >= 1"),
        ]
        ranks = self.federation.client_ranks
        if ranks:
            checks += [
                ("federation.client_ranks", all(1 <= r <= self.adapter.rank for r in ranks),
                 f"must lie between 1 and adapter.rank = {self.adapter.rank} (the global "
                 "adapter's rank)"),
                ("method.name", self.method.name == "fedtt",
                 "must be fedtt when federation.client_ranks is set"),
                ("method.aggregation", self.method.aggregation == "exact",
                 "must be exact when federation.client_ranks is set (factors of different "
                 "ranks cannot be averaged)"),
            ]
        checks += [(key, False, why) for key, why in self.privacy.problems()]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key} {why}, got {_get(self, key)!r}")
        try:
            self.adapter.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def clients_per_round(self) -> int:
        fed = self.federation
        if fed.mode == "cross-silo":
            return fed.num_clients
        return min(fed.num_clients, fed.clients_per_round or max(1, fed.num_clients // 10))


def _get(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)}


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
                raise ConfigError(f"unknown config key {section}.{key}; known in [{section}]: "
                                  f"{', '.join(hints)}")
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
        apply(cfg, data)
    for text in overrides or []:
        apply(cfg, parse_override(text))
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
