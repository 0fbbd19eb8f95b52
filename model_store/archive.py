"""Pack a model bundle into a TorchServe ``.mar`` with ``torch-model-archiver``.

The archive holds the bundle's files (weights as a state dict, model.json, model card, unit labels,
MRI normalisation volumes, brain mask and atlas), the per-model ``model-config.yaml``, a one-line
handler entry module and the engine code it runs: the packages of
:data:`medxplain_engine.version.ENGINE_PACKAGES` (contract, models, dicom, engine) and the TorchServe adapter
at the archive's root, plus ``engine.json`` (the engine's version and code digest). TorchServe puts the
unpacked archive on the worker's ``PYTHONPATH``, so a server needs only the third-party packages
(``requirements/serve.txt``) and the archive digest identifies all the code that drew a heatmap.

Next to each archive go ``<name>.mar.sha256`` (and ``.sha256.sig`` with a signing key, see
:mod:`medxplain_contract.integrity`): every loader refuses an archive that does not match them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from medxplain_contract.integrity import signing_key, write_digest
from medxplain_engine.version import contents_sha256, is_engine_member, loaded_code_files, record_of
from medxplain_models.bundle import MODEL_CARD, MODEL_JSON, WEIGHTS, mar_digest

CONFIG_DIR = Path(__file__).parent / "configs"
HANDLER_DIR = Path(__file__).resolve().parents[1] / "handlers"
HANDLER_ENTRY = {"ddsm": HANDLER_DIR / "ddsm_handler.py", "adni": HANDLER_DIR / "adni_handler.py"}
ADAPTER_FILES = ("handlers/__init__.py", "handlers/torchserve_adapter.py")  # what the entry modules import
ENGINE_JSON = "engine.json"


class ArchiveError(RuntimeError):
    pass


class UnitLabelsError(ValueError):
    """The unit-label file cannot go into an archive (the CLI prints it and exits 2)."""


def check_unit_labels(path: Path, include_demo_answers: bool = False) -> dict:
    """The consensus export, refused if it rests on demo-mode (unauthenticated) answers unless allowed.

    The UI's export records its answers (``answers.authenticated`` / ``answers.demo``); a file that
    does not say whose answers it holds is treated like one with demo answers.
    """
    try:
        labels = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UnitLabelsError(f"cannot read the unit-label file {path}: {err}") from None
    if not isinstance(labels, dict) or not isinstance(labels.get("units"), dict):
        raise UnitLabelsError(f"{path} is not a unit-label file (no 'units' object)")
    answers = labels.get("answers")
    if include_demo_answers:
        return labels
    if not isinstance(answers, dict):
        raise UnitLabelsError(f"{path} does not say whose answers it holds (export it from the UI's Units page); "
                         "pass --include-demo-answers to ship it anyway")
    if int(answers.get("demo") or 0) > 0:
        raise UnitLabelsError(f"{path} rests on {int(answers['demo'])} demo-mode (not logged-in) answers; "
                         "pass --include-demo-answers to ship them")
    return labels


def stage_engine_code(folder: Path) -> dict:
    """Copy the engine code this process imports and the TorchServe adapter into ``folder``; return the
    engine record (the adapter is not engine code: the archive digest covers it)."""
    files = loaded_code_files()
    for rel, path in [*files.items(), *((rel, HANDLER_DIR.parent / rel) for rel in ADAPTER_FILES)]:
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return record_of({rel: folder / rel for rel in files})


def check_carried_code(mar: Path, engine: dict) -> None:
    """The archive's engine files hash to its engine.json (the archiver skips hidden folders, for one)."""
    with zipfile.ZipFile(mar) as zf:
        carried = {n: zf.read(n) for n in zf.namelist() if is_engine_member(n)}
        recorded = json.loads(zf.read(ENGINE_JSON))
        missing = [rel for rel in ADAPTER_FILES if rel not in zf.namelist()]
    if recorded != engine or contents_sha256(carried) != engine["code_sha256"] or missing:
        raise ArchiveError(f"{mar}: the engine code it carries does not match its {ENGINE_JSON}")


def model_config(kind: str, device_type: str, folder: Path) -> Path:
    """The archive's model-config.yaml: the shipped one (``deviceType: cpu``), or for a GPU release the
    same with ``deviceType: gpu`` and ``deviceIds: [0]`` (TorchServe then hands each worker a gpu_id,
    which the handler uses; docs/deploy.md)."""
    shipped = CONFIG_DIR / f"{kind}.yaml"
    if device_type == "cpu":
        return shipped
    if device_type != "gpu":
        raise ArchiveError("device_type must be cpu or gpu")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / shipped.name).write_text(gpu_config(shipped.read_text()))
    return folder / shipped.name


def gpu_config(text: str) -> str:
    """A model-config.yaml's text with its ``deviceType`` line replaced by ``deviceType: gpu`` + ``deviceIds: [0]``."""
    lines = text.splitlines(keepends=True)
    return "".join("deviceType: gpu\ndeviceIds: [0]\n" if line.startswith("deviceType:") else line for line in lines)


def build_archive(bundle_dir: Path, export_dir: Path, model_name: str | None = None,
                  unit_labels: Path | None = None, include_demo_answers: bool = False,
                  device_type: str = "cpu") -> Path:
    """Build ``{name}.mar`` from a bundle directory and return its path.

    ``unit_labels`` replaces the bundle's unit-label file: this is how the experts' consensus
    export (from the annotation UI) goes into the next model version; only authenticated
    annotators' answers unless ``include_demo_answers``.
    """
    if unit_labels:
        check_unit_labels(unit_labels, include_demo_answers)
    meta = json.loads((bundle_dir / MODEL_JSON).read_text())
    kind, name, version = meta["kind"], model_name or meta["name"], meta["version"]
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mar-") as tmp:
        staging = Path(tmp)
        extra = []
        for path in sorted(bundle_dir.iterdir()):
            if path.name in (WEIGHTS, "metrics.json") or not path.is_file():
                continue
            target = staging / path.name
            source = unit_labels if (unit_labels and path.name == "unit_labels.json") else path
            shutil.copyfile(source, target)
            extra.append(str(target))
        engine = stage_engine_code(staging / "code")
        extra.append(str(staging / "code"))  # a folder: torch-model-archiver copies its children to the root
        (staging / ENGINE_JSON).write_text(json.dumps(engine, indent=2) + "\n")
        extra.append(str(staging / ENGINE_JSON))
        config = model_config(kind, device_type, staging / "config")
        cmd = [str(Path(sys.executable).with_name("torch-model-archiver")),
               "--model-name", name, "--version", version,
               "--serialized-file", str(bundle_dir / WEIGHTS),
               "--handler", str(HANDLER_ENTRY[kind]),
               "--extra-files", ",".join(extra),
               "--config-file", str(config),
               "--export-path", str(export_dir), "-f"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed:\n{result.stdout}\n{result.stderr}")
    mar = export_dir / f"{name}.mar"
    check_carried_code(mar, engine)
    card = json.loads((bundle_dir / MODEL_CARD).read_text())
    (export_dir / f"{name}.mar.json").write_text(json.dumps(
        {"model": name, "version": version, "kind": kind, "archive_digest": mar_digest(mar),
         "weights_sha256": card.get("weights_sha256"), "engine": engine}, indent=2) + "\n")
    write_digest(mar, signing_key())
    return mar
