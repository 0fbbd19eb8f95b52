"""Per-deployable dependency sets (requirements/): one pin per package, the UI and client sets without torch,
and every image installing only its own set and copying only its own layers.

The sets are resolved against the package metadata of the installed dev environment (which holds
exactly these pins): each requirement's ``Requires-Dist`` is followed transitively, markers evaluated,
so a set that pulled torch in through any dependency would show it. No index is needed.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_deploy import STAGE_IMAGES, dockerfile_instructions

ROOT = Path(__file__).resolve().parents[1]
REQS = ROOT / "requirements"
TORCH = {"torch", "torchvision", "captum", "triton"}


def lines_of(path: Path, seen: set[Path] | None = None) -> list[str]:
    """The requirement lines of a file and of every file it includes with ``-r`` (in order)."""
    seen = set() if seen is None else seen
    if path in seen:
        return []
    seen.add(path)
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r"):
            out += lines_of(path.parent / line[2:].strip(), seen)
        else:
            out.append(line)
    return out


def included_files(path: Path) -> set[Path]:
    found = {path}
    for raw in path.read_text().splitlines():
        if raw.strip().startswith("-r"):
            found |= included_files(path.parent / raw.strip()[2:].strip())
    return found


def closure(path: Path) -> set[str]:
    """Every distribution a set installs: its requirements and, transitively, theirs (from installed metadata)."""
    todo = [Requirement(line) for line in lines_of(path)]
    for req in todo:  # the dev environment must hold the pinned versions, or its metadata would not apply
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req} pinned, {version} installed"
    found: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        found.add(name)
        for dep in importlib.metadata.requires(req.name) or []:
            todo.append(Requirement(dep))
    return found


def is_torch(name: str) -> bool:
    return name in TORCH or name.startswith("nvidia-")


def test_each_package_is_pinned_once_and_dev_installs_every_set():
    names: dict[str, Path] = {}
    for path in sorted(REQS.glob("*.txt")):
        for line in lines_of(path, {p for p in REQS.glob("*.txt") if p != path}):
            name = canonicalize_name(Requirement(line).name)
            assert name not in names, f"{name} is pinned in {names.get(name)} and in {path}"
            names[name] = path
    assert included_files(REQS / "dev.txt") == set(REQS.glob("*.txt"))  # `make setup` installs everything


@pytest.mark.parametrize("name", ["ui", "client", "contract"])
def test_torch_free_sets_resolve_without_torch(name):
    installed = closure(REQS / f"{name}.txt")
    assert {"numpy", "minio", "pydicom"} <= installed  # the resolver really walked the set
    assert not {n for n in installed if is_torch(n)}, sorted(n for n in installed if is_torch(n))


def test_engine_sets_do_pull_torch():
    """The check above can fail: the same resolver finds torch (and CUDA wheels, on Linux) in serve and batch."""
    for name in ("serve", "batch"):
        installed = closure(REQS / f"{name}.txt")
        assert {"torch", "torchvision", "captum"} <= installed
    assert "streamlit" not in closure(REQS / "serve.txt") and "torchserve" not in closure(REQS / "ui.txt")


IMAGES = {  # image -> (the sets it installs, the project packages it copies)
    "serve": ({"serve"}, {"medxplain_contract", "devstack"}),
    "batch": ({"batch"}, {"medxplain_contract", "medxplain_models", "medxplain_dicom", "medxplain_engine", "batch"}),
    "ui": ({"ui"}, {"medxplain_contract", "medxplain_client", "ui"}),
    # The KServe runtime builds on the serve image's virtualenv (serve.txt) and adds kserve.txt on top.
    "kserve": ({"serve", "kserve"}, {"medxplain_contract", "medxplain_models", "medxplain_dicom", "medxplain_engine",
                                     "batch", "medxplain_kserve"}),
}
PACKAGES = {"medxplain_contract", "medxplain_models", "medxplain_dicom", "medxplain_engine", "medxplain_client", "handlers",
            "model_store", "batch", "devstack", "ui", "medxplain_kserve"}


def dockerfile_of(image: str) -> tuple[Path, str | None]:
    folder, target = STAGE_IMAGES.get(image, (image, None))
    return ROOT / "docker" / folder / "Dockerfile", target


def image_lines(dockerfile: Path, target: str | None) -> list[str]:
    """The instruction lines of every stage the image is built from: the target (default: the last stage),
    the stages it is FROM, and the stages it copies from (``COPY --from=``), transitively."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: dict[str, tuple[str, list[str]]] = {}
    last = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            base, _, alias = rest.partition(" AS ")
            last = alias.strip() or f"stage{len(stages)}"
            stages[last] = (base.strip(), [])
        if last:  # global ARGs before the first FROM belong to no stage
            stages[last][1].append(line)
    todo, seen, lines = [target or last], set(), []
    while todo:
        name = todo.pop()
        if name in seen or name not in stages:
            continue
        seen.add(name)
        base, own = stages[name]
        lines += own
        todo += [base, *re.findall(r"--from=(\S+)", " ".join(own))]
    return lines


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_each_image_installs_only_its_set_and_its_layers(image):
    req_sets, packages = IMAGES[image]
    dockerfile, target = dockerfile_of(image)
    lines = image_lines(dockerfile, target)
    text = "\n".join(lines)
    # docker/wheelhouse.sh HOUSE REQUIREMENTS ... installs a set (tests/test_wheelhouse.py); plain pip -r too
    installed = set(re.findall(r"pip install [^&\n]*?-r (requirements/\S+)", text))
    installed |= set(re.findall(r"medxai-wheelhouse[ \t](?:[^\n]*\\\n)?[^\n]*?(requirements/\S+)", text))
    assert installed == {f"requirements/{s}.txt" for s in req_sets}, installed
    copied: set[str] = set()
    for line in lines:  # every stage it is built from: what the build copies is what the image can hold
        word, _, rest = line.strip().partition(" ")
        if word.upper() == "COPY" and "--from=" not in rest:
            copied |= set([p for p in rest.split() if not p.startswith("--")][:-1])  # sources, not the destination
    needed = {str(p.relative_to(ROOT)) for s in req_sets for p in included_files(REQS / f"{s}.txt")}
    assert needed <= copied, f"{image}: -r files not copied: {needed - copied}"
    assert not {c for c in copied if c.startswith("requirements/")} - needed  # no other set's file
    project = {c.split("/")[0] for c in copied} & PACKAGES
    assert project == packages, project
    final = dockerfile_instructions(dockerfile, target)
    assert final  # the final stage exists and parses
    # Other layers never enter the context: only what one of this Dockerfile's images copies is allowed.
    ignore = (dockerfile.parent / "Dockerfile.dockerignore").read_text()
    siblings = set().union(*(IMAGES[i][1] for i in IMAGES if dockerfile_of(i)[0] == dockerfile))
    assert not {p for p in PACKAGES - siblings if f"!{p}/" in ignore}


def test_ui_image_has_no_torch():
    text = (ROOT / "docker" / "ui" / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in instructions if "torch" in line.lower()]  # no torch index, no torch wheel
    assert not {n for n in closure(REQS / "ui.txt") if is_torch(n)}


# --- every import of a deployable's code is installed by its own set ------------------------------------

PROJECT = {"ui", "medxplain_client", "medxplain_kserve", "medxplain_contract", "medxplain_models", "medxplain_dicom", "medxplain_engine", "handlers",
           "batch", "model_store", "devstack", "tests", "docker"}
CODE_OF_SET = {"contract": ("medxplain_contract",), "client": ("medxplain_client", "medxplain_contract"),
               "ui": ("ui", "medxplain_client", "medxplain_contract"),
               "serve": ("handlers", "medxplain_engine", "medxplain_dicom", "medxplain_models", "medxplain_contract"),
               "batch": ("batch", "medxplain_engine", "medxplain_dicom", "medxplain_models", "medxplain_contract"),
               # the KServe runtime imports batch/archive.py only (its imports: stdlib, contract, engine)
               "kserve": ("medxplain_kserve", "medxplain_engine", "medxplain_dicom", "medxplain_models",
                          "medxplain_contract")}
# Imported only where their own set is installed: the client's gRPC stubs are generated at setup (grpcio-tools
# is a build tool), and the stub generator is not run inside the images that lack it.
OPTIONAL = {("client", "grpc_tools"), ("ui", "grpc_tools")}


def third_party_imports(package: str) -> dict[str, str]:
    """{top-level module: first file importing it} for every import (lazy ones included) of a package's code."""
    import ast
    import sys

    found: dict[str, str] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "_generated" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in PROJECT:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def missing_imports(set_name: str, packages: tuple[str, ...]) -> dict[str, str]:
    """{module: file} of the packages' imports that requirements/<set_name>.txt does not install."""
    provided = importlib.metadata.packages_distributions()
    installed = closure(REQS / f"{set_name}.txt")
    missing = {}
    for package in packages:
        for module, where in third_party_imports(package).items():
            dists = {canonicalize_name(d) for d in provided.get(module, [])}
            if not dists & installed and (set_name, module) not in OPTIONAL:
                missing[module] = where
    return missing


@pytest.mark.parametrize("name", sorted(CODE_OF_SET))
def test_every_import_is_installed_by_the_deployables_own_set(name):
    """A module the UI (or client, batch, serve) imports must come from its own requirement set: the torch-free
    test runs in the full dev environment, so only this check finds a package that the UI image would lack."""
    missing = missing_imports(name, CODE_OF_SET[name])
    assert not missing, f"requirements/{name}.txt does not install: {missing}"


def test_the_import_check_reports_a_package_the_set_lacks():
    """The check can fail: the UI's code against the contract's set lacks streamlit (and the engine's torch)."""
    assert "streamlit" in missing_imports("contract", ("ui",))
    assert "torch" in missing_imports("ui", ("medxplain_engine",))
