"""Exact cosine top-k similarity over the run's embeddings, same case excluded (placeholder)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Neighbour:
    item_id: str
    score: float
    case_id: str
    truth: str | None
    predicted: str


class SimilarityIndex:
    """Placeholder until the implementation lands."""
