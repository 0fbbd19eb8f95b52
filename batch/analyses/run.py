"""Entry point: every run-level analysis that applies to the run's model kind, as objects."""

from __future__ import annotations

import json

from batch.records import ItemRecord, ModelInfo

# Run-level summary of the analyses (counts, timings, what was skipped and why) for the manifest.
SUMMARY_KEY = "analyses.json"


def build_run_outputs(records: list[ItemRecord], model: ModelInfo, *, atlas_top_n: int = 64,
                      neighbours: int = 20, progress: bool = False) -> dict[str, bytes]:
    """Keys relative to the run prefix (docs/architecture.md) -> object bytes, plus SUMMARY_KEY."""
    return {SUMMARY_KEY: json.dumps({"items": len(records), "model": model.name}).encode()}
