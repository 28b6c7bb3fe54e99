"""Flower's own byte counts for a deployed run, set against fedtt's ledger of the same rounds.

`traffic_report` is what `fedtt deploy` adds to summary.json as `flower_traffic`; see
docs/deployment.md for what each figure counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtt.results import read_rounds, read_summary

if TYPE_CHECKING:
    from fedtt.federated.deploy.local import RunResult


def traffic_report(run_dir: str | Path, result: RunResult) -> dict[str, Any]:
    """Flower's byte counts for a run next to fedtt's ledger of the same run.

    Flower counts Fleet API payloads (protobuf messages and object contents, not HTTP or
    TLS framing) between the SuperLink and the SuperNodes: `inbound` is what the nodes
    sent (uploads), `outbound` what they received (downloads). The ledger counts each
    message as Flower deflates it (`wire_bytes`) and, inside it, the tensor payload
    (`bytes`); the ratios say how much the Fleet API adds on top of the messages. After
    `--resume`, only the rounds this Flower run made (those after `resumed_from_round` in
    summary.json) are set against its counts.
    """
    after = (read_summary(run_dir) or {}).get("resumed_from_round")
    rounds = [r for r in read_rounds(run_dir) if after is None or r["round"] > after]

    def total(key: str) -> int:
        return sum(int(r.get(key, 0)) for r in rounds)

    up, down = total("upload_bytes"), total("download_bytes")
    up_wire, down_wire = total("upload_wire_bytes"), total("download_wire_bytes")
    return {
        "run_id": result.run_id,
        "rounds": [r["round"] for r in rounds],
        "flower": {"inbound_bytes": result.inbound_bytes,
                   "outbound_bytes": result.outbound_bytes,
                   "total_bytes": result.total_bytes},
        "ledger": {"upload_bytes": up, "download_bytes": down, "total_bytes": up + down,
                   "upload_wire_bytes": up_wire, "download_wire_bytes": down_wire,
                   "total_wire_bytes": up_wire + down_wire},
        "upload_ratio": result.inbound_bytes / up_wire if up_wire else None,
        "download_ratio": result.outbound_bytes / down_wire if down_wire else None,
        "overhead_ratio": (result.total_bytes / (up_wire + down_wire)
                           if up_wire + down_wire else None),
    }
