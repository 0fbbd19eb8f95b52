"""Unit annotations in object storage: one immutable object per save, so nothing is ever lost.

Key layout (zero-padded unit, UTC timestamp first so listings sort by time)::

    <prefix>/<model>/<version key>/unit-0042/<annotator id>/<YYYYmmddTHHMMSS.ffffffZ>-<uuid4>.json

Each save writes a new key (timestamp + random uuid), so two annotators (or two tabs of one)
saving at the same moment can never overwrite each other, and the full history stays readable.
The *version key* is the model version plus the first 12 hex digits of its weights' sha256:
units keep their meaning exactly as long as the weights do (the seed keyed annotations to the
architecture name, which silently mixed checkpoints).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from medxplain_contract.layout import (
    annotation_key,
    annotation_parts,
    annotation_unit_prefix,
    annotation_version_prefix,
)
from medxplain_contract.storage import Bucket
from ui import lexicon
from ui.runs import UI_RETRY

SCHEMA = 1
MAX_TEXT = 2000
CONFIDENCE = (1, 2, 3, 4, 5)
_SAFE = re.compile(r"[^a-z0-9._-]+")


def safe_id(text: str, limit: int = 64) -> str:
    """Lower-case key segment from free text (names, versions); never empty."""
    cleaned = _SAFE.sub("-", text.strip().lower()).strip("-.")[:limit]
    return cleaned or "unknown"


def version_key(version: str, weights_sha256: str | None) -> str:
    return safe_id(f"{version}-{weights_sha256[:12]}" if weights_sha256 else str(version))


@dataclass(frozen=True)
class Annotator:
    id: str  # key segment: demo-<name> or oidc-<hash of the subject>
    name: str  # shown in the UI and stored with each annotation
    mode: str  # "oidc" | "demo"


@dataclass
class Annotation:
    model: str
    version_key: str
    unit: int
    annotator_id: str
    annotator_name: str
    recognisable: bool
    concepts: list[str] = field(default_factory=list)
    free_text: str = ""
    confidence: int = 3
    created_at: str = ""
    annotation_id: str = ""
    context: dict = field(default_factory=dict)  # where it was made: run prefix, identity mode
    authenticated: bool = False  # made by an OIDC-logged-in user (demo-mode answers are not)
    schema: int = SCHEMA

    def validated(self) -> Annotation:
        if self.unit < 0:
            raise ValueError("unit must be >= 0")
        if self.confidence not in CONFIDENCE:
            raise ValueError(f"confidence must be one of {CONFIDENCE}")
        concepts = lexicon.validate(list(self.concepts)) if self.recognisable else []
        return Annotation(**{**asdict(self), "concepts": concepts, "free_text": self.free_text.strip()[:MAX_TEXT],
                             "authenticated": self.authenticated is True})

    @classmethod
    def from_dict(cls, data: dict) -> Annotation:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        if "authenticated" not in data:  # saved before the field existed: the identity mode tells
            values["authenticated"] = (data.get("context") or {}).get("identity") == "oidc"
        return cls(**values)

    @property
    def labels(self) -> list[str]:
        return [lexicon.label(c) for c in self.concepts]


class AnnotationStore:
    def __init__(self, client, bucket: str, prefix: str) -> None:
        self.store = Bucket.of(client, bucket, UI_RETRY)
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")

    def ensure_bucket(self) -> None:
        self.store.ensure(create=True)

    def _unit_prefix(self, model: str, version: str, unit: int) -> str:
        return annotation_unit_prefix(self.prefix, safe_id(model), safe_id(version), unit)

    def _version_prefix(self, model: str, version: str) -> str:
        return annotation_version_prefix(self.prefix, safe_id(model), safe_id(version))

    def save(self, annotation: Annotation, now: datetime | None = None) -> str:
        """Write one new object and return its key; raises ValueError for invalid answers."""
        ann = annotation.validated()
        now = now or datetime.now(UTC)
        ann.annotation_id = str(uuid.uuid4())
        ann.created_at = now.isoformat(timespec="microseconds").replace("+00:00", "Z")
        key = annotation_key(self._unit_prefix(ann.model, ann.version_key, ann.unit), safe_id(ann.annotator_id),
                             f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{ann.annotation_id}")
        self.store.put(key, json.dumps(asdict(ann), indent=1, sort_keys=True).encode(), "application/json")
        return key

    def _read(self, key: str) -> Annotation:
        return Annotation.from_dict(json.loads(self.store.read(key)))

    def _keys(self, prefix: str) -> list[str]:
        return sorted(key for key, _ in self.store.list(prefix) if key.endswith(".json"))

    def history(self, model: str, version: str, unit: int, annotator_id: str) -> list[Annotation]:
        """Every save of one annotator for one unit, oldest first."""
        keys = self._keys(f"{self._unit_prefix(model, version, unit)}{safe_id(annotator_id)}/")
        return self._read_many(keys)

    def latest(self, model: str, version: str, unit: int, annotator_id: str) -> Annotation | None:
        keys = self._keys(f"{self._unit_prefix(model, version, unit)}{safe_id(annotator_id)}/")
        return self._read(keys[-1]) if keys else None

    def progress(self, model: str, version: str) -> dict[int, set[str]]:
        """unit -> annotator ids who answered (from the listing alone, no reads)."""
        out: dict[int, set[str]] = {}
        for key in self._keys(self._version_prefix(model, version)):
            unit, annotator = annotation_parts(key)
            out.setdefault(unit, set()).add(annotator)
        return out

    def latest_all(self, model: str, version: str) -> dict[int, dict[str, Annotation]]:
        """unit -> annotator id -> that annotator's current (latest) answer."""
        newest: dict[tuple[int, str], str] = {}
        for key in self._keys(self._version_prefix(model, version)):
            newest[annotation_parts(key)] = key  # keys are sorted: last wins
        out: dict[int, dict[str, Annotation]] = {}
        for (unit, annotator), ann in zip(newest, self._read_many(list(newest.values()))):
            out.setdefault(unit, {})[annotator] = ann
        return out

    def count(self, model: str, version: str) -> int:
        return len(self._keys(self._version_prefix(model, version)))

    def _read_many(self, keys: Iterable[str]) -> list[Annotation]:
        keys = list(keys)
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(self._read, keys))
