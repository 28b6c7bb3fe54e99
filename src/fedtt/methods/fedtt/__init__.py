"""FedTT and FedTT+ (tensor-train adapters): the `[fedtt]` section, the TT cores by name, the
FedTT+ freezing policy and the two methods."""

from fedtt.methods.fedtt.config import FedTTConfig
from fedtt.methods.fedtt.cores import CORE, core_groups, largest_core_rank
from fedtt.methods.fedtt.freeze import FreezePolicy
from fedtt.methods.fedtt.method import FedTT, FedTTPlus

__all__ = ["CORE", "FedTT", "FedTTConfig", "FedTTPlus", "FreezePolicy", "core_groups",
           "largest_core_rank"]
