"""Where the backbone runs and at what precision: `training.device`, `model.dtype`, autocast.

A run's `Compute` is a device (`auto` picks CUDA when present, else the CPU) and the dtype of
the frozen backbone. Everything that trains, and every master copy, stays float32; with a
half-precision backbone the forward pass runs under `torch.autocast`, so float32 tensors
(adapters, norms, a head) and half weights meet in low-precision matmuls. float16 also
scales the loss (`torch.amp.GradScaler`). The default, float32, runs no autocast and no
scaler at all: exactly the plain float32 code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

from fedtt.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


def resolve_device(spec: str, key: str = "training.device") -> torch.device:
    """The torch device `spec` names; a ConfigError naming `key` when it cannot be used."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key} = {spec!r} asks for CUDA, but torch sees no CUDA device "
                              f"here (torch {torch.__version__}); use 'auto' or 'cpu'")
        index = int(spec[5:]) if ":" in spec else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key} = {spec!r}: there are only {torch.cuda.device_count()} "
                              "CUDA devices")
        return torch.device("cuda", index)
    raise ConfigError(f"{key} must be {DEVICE_HELP}, got {spec!r}")


def half_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a float32 layer can train under autocast to `dtype` on `device` (a tiny
    forward and backward; some CPU builds have no float16 kernels)."""
    try:
        layer = nn.Linear(4, 4).to(device)
        x = torch.ones(2, 4, device=device, dtype=dtype)
        with torch.autocast(device.type, dtype=dtype):
            y = layer(x) @ torch.ones(4, 4, device=device, dtype=dtype)
        y.float().sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def resolve_dtype(name: str, device: torch.device, key: str = "model.dtype") -> torch.dtype:
    """The backbone dtype `name` on `device`; a ConfigError naming `key` when unusable."""
    if name not in DTYPES:
        raise ConfigError(f"{key} must be {', '.join(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if dtype is torch.float32:
        return dtype
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{key} = 'bfloat16': {torch.cuda.get_device_name(device)} has no "
                          "bfloat16 support; use float16 or float32")
    if not half_supported(dtype, device):
        raise ConfigError(f"{key} = {name!r} is not supported on {device} by this torch "
                          f"({torch.__version__}); use float32"
                          + (" or bfloat16" if dtype is torch.float16 else ""))
    return dtype


@dataclass
class Compute:
    """A device and the backbone's dtype; what training and evaluation need of both."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def mixed(self) -> bool:
        """Whether the backbone is half precision (forward passes run under autocast)."""
        return self.dtype is not torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the backbone dtype, or nothing at all for float32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A loss scaler for float16 (its gradients underflow without one), else None."""
        if self.dtype is torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None

    def to(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` on this device (the same tensors when they are there already)."""
        if self.device.type == "cpu":
            return dict(batch)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


CPU = Compute()


def resolve(device: str, dtype: str, *, device_key: str = "training.device",
            dtype_key: str = "model.dtype") -> Compute:
    """A run's Compute from its config values; errors name the keys."""
    dev = resolve_device(device, device_key)
    return Compute(dev, resolve_dtype(dtype, dev, dtype_key))


def float32_trainables(model: nn.Module, owns: Callable[[str], bool] = lambda _: False
                        ) -> None:
    """Make every trainable tensor, and every tensor `owns` names (a method's frozen ones,
    such as FFA-LoRA's A), float32: with a half backbone, the norms and the head a method
    trains would otherwise stay half."""
    for name, p in model.named_parameters():
        if (p.requires_grad or owns(name)) and p.dtype is not torch.float32:
            p.data = p.data.float()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward (Hugging Face's
    non-reentrant checkpointing, which also works when no input requires grad)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    target = next((m for m in inner.modules() if isinstance(m, PreTrainedModel)), None)
    if target is None or not target.supports_gradient_checkpointing:
        raise ConfigError("training.gradient_checkpointing: this model does not support "
                          "gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def valid_device(spec: str) -> bool:
    """Whether `spec` is a device name `resolve_device` knows (whether or not it is here)."""
    spec = str(spec).strip().lower()
    return spec in ("auto", "cpu", "cuda") or (spec.startswith("cuda:") and spec[5:].isdigit())
