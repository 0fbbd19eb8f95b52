"""The settings an archive is served with: its model-config.yaml ``handler:`` keys.

TorchServe hands them to the adapter as ``context.model_yaml_config``; in-process callers (batch jobs,
evaluation, benches) read the same file from the unpacked archive, so the engine they build applies the
same speed-ups as the served one and online and batch results stay identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


class ServedSettingsError(ValueError):
    """The archive's manifest or model-config cannot be read."""


def served_config(model_dir: Path) -> dict:
    """The whole model-config of an unpacked archive (MAR-INF/MANIFEST.json names it); {} for a bare bundle."""
    manifest_path = Path(model_dir) / "MAR-INF" / "MANIFEST.json"
    if not manifest_path.is_file():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
        name = manifest["model"].get("configFile")
        config = yaml.safe_load((Path(model_dir) / name).read_text()) if name else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as err:
        raise ServedSettingsError(f"unreadable model-config in the archive ({type(err).__name__})") from None
    return config if isinstance(config, dict) else {}


def served_settings(model_dir: Path) -> dict:
    """``handler:`` of the archive's model-config: the keys our handler reads (speed-ups, budgets, amp)."""
    settings = served_config(model_dir).get("handler") or {}
    return settings if isinstance(settings, dict) else {}
