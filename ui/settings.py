"""Where the UI finds runs, annotations and TorchServe: environment variables, read in one place.

Storage credentials come from :class:`medxplain_contract.storage.S3Config` (``MEDXAI_S3_*``); this module
adds only what the UI needs on top of them.

| variable | default | meaning |
| --- | --- | --- |
| ``MEDXAI_UI_RUNS`` | ``s3://medxai/runs`` | prefix holding batch runs (a run itself, or runs up to two levels below) |
| ``MEDXAI_UI_ANNOTATIONS`` | ``s3://<runs bucket>/annotations`` | where unit annotations are written |
| ``MEDXAI_TORCHSERVE_URL`` | ``http://127.0.0.1:8080`` | TorchServe inference API (Analyse, Similar upload) |
| ``MEDXAI_TORCHSERVE_KEY_FILE`` | unset | TorchServe ``key_file.json`` (token authorization) |
| ``MEDXAI_UI_DEMO`` | unset | ``1``: without ``[auth]``, run in demo mode (typed names); unset: an error page |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from medxplain_contract.storage import S3ConfigError, parse_s3_url

DEFAULT_RUNS = "s3://medxai/runs"
_TRUE = ("1", "true", "yes", "on")


def demo_mode_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Demo mode (no login, typed names) only when asked for: the UI fails closed otherwise."""
    env = os.environ if environ is None else environ
    return (env.get("MEDXAI_UI_DEMO") or "").strip().lower() in _TRUE


@dataclass(frozen=True)
class UISettings:
    runs_bucket: str
    runs_prefix: str
    annotations_bucket: str
    annotations_prefix: str
    torchserve_url: str
    torchserve_key_file: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> UISettings:
        env = os.environ if environ is None else environ
        runs_bucket, runs_prefix = parse_s3_url(env.get("MEDXAI_UI_RUNS") or DEFAULT_RUNS)
        annotations = env.get("MEDXAI_UI_ANNOTATIONS") or f"s3://{runs_bucket}/annotations"
        ann_bucket, ann_prefix = parse_s3_url(annotations)
        if not ann_prefix:
            raise S3ConfigError("MEDXAI_UI_ANNOTATIONS needs a prefix, e.g. s3://medxai/annotations")
        return cls(runs_bucket, runs_prefix, ann_bucket, ann_prefix,
                   (env.get("MEDXAI_TORCHSERVE_URL") or "http://127.0.0.1:8080").rstrip("/"),
                   env.get("MEDXAI_TORCHSERVE_KEY_FILE") or None)
