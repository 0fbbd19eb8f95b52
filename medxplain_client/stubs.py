"""gRPC stubs for TorchServe, generated on demand from the ``.proto`` files inside its wheel.

TorchServe ships its ``inference.proto`` / ``management.proto`` only inside
``ts/frontend/model-server.jar``, so the stubs are compiled from the installed version (they then
always match the server's API) into ``medxplain_client/_generated/`` (gitignored, never committed).
The protos are compiled under the path ``medxplain_client/_generated/`` so protoc writes package
imports (``from medxplain_client._generated import inference_pb2``) and nothing needs patching.
Builds go to a temporary folder that is renamed into place, so concurrent first uses cannot see
half-written modules. ``google/rpc/status_pb2`` comes from googleapis-common-protos at run time.

    python -m medxplain_client.stubs    # build (again only when TorchServe / grpcio-tools changed)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

PACKAGE = __spec__.parent  # "medxplain_client", also under `python -m`
GENERATED = Path(__file__).resolve().parent / "_generated"
STAMP = "STAMP.json"
PROTOS = ("inference.proto", "management.proto", "open_inference_grpc.proto")
# TorchServe's copy of the Open Inference Protocol proto (KServe's grpc_predict_v2.proto) renamed its package;
# restored here so the stubs call /inference.GRPCInferenceService/* as every OIP server (KServe) serves it.
OIP_PROTO = "open_inference_grpc.proto"
OIP_PACKAGE = (b"package org.pytorch.serve.grpc.openinference;", b"package inference;")
INCLUDES = ("google/rpc/status.proto",)  # imported by inference.proto; compiled by googleapis-common-protos


class StubsError(RuntimeError):
    """The stubs are missing and cannot be built here (no TorchServe / grpcio-tools, read-only install)."""


def ensure_stubs() -> ModuleType:
    """The ``_generated`` package with ``inference_pb2`` and ``inference_pb2_grpc`` imported."""
    if not _up_to_date():
        _build()
    importlib.invalidate_caches()
    package = importlib.import_module(f"{PACKAGE}._generated")
    for name in ("inference_pb2", "inference_pb2_grpc", "management_pb2", "management_pb2_grpc",
                 "open_inference_grpc_pb2", "open_inference_grpc_pb2_grpc"):
        importlib.import_module(f"{package.__name__}.{name}")
    return package


def _versions() -> dict[str, str | None]:
    """What the generated code depends on; a change triggers a rebuild."""
    found: dict[str, str | None] = {"protos": ",".join(PROTOS)}
    for dist in ("torchserve", "grpcio-tools"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def _up_to_date() -> bool:
    """Existing stubs are kept if they match, or if there is nothing installed to rebuild them from."""
    try:
        stamp = json.loads((GENERATED / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return all(v is None or stamp.get(k) == v for k, v in _versions().items())


def _jar() -> Path:
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise StubsError("TorchServe is not installed: `pip install torchserve` to build the gRPC stubs")
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise StubsError(f"{jar} not found: the TorchServe install is incomplete")
    return jar


def _build() -> None:
    try:
        from grpc_tools import protoc
    except ImportError:
        raise StubsError("grpcio-tools is needed to build the gRPC stubs: `pip install grpcio-tools`") from None
    jar = _jar()
    try:
        work = Path(tempfile.mkdtemp(prefix="._generated-", dir=GENERATED.parent))
    except OSError as err:
        raise StubsError(f"cannot write the gRPC stubs next to {GENERATED}: {err}; run "
                         f"`{Path(sys.executable).name} -m {PACKAGE}.stubs` as the user who installed the package") from err
    try:
        src, out = work / "src", work / "out"
        package_dir = Path(*PACKAGE.split("."), "_generated")
        with zipfile.ZipFile(jar) as zf:
            for name in PROTOS:
                _extract(zf, name, src / package_dir / name)
            for name in INCLUDES:
                _extract(zf, name, src / name)
        (out / package_dir).mkdir(parents=True)
        well_known = Path(protoc.__file__).parent / "_proto"
        args = ["grpc_tools.protoc", f"-I{src}", f"-I{well_known}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", *(str(package_dir / name) for name in PROTOS)]
        if protoc.main(args) != 0:
            raise StubsError(f"protoc failed on the protos of {jar} (its message is above)")
        built = out / package_dir
        (built / "__init__.py").write_text('"""Generated by medxplain_client.stubs from TorchServe\'s protos."""\n')
        (built / STAMP).write_text(json.dumps(_versions(), indent=1) + "\n")
        _install(built)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract(zf: zipfile.ZipFile, name: str, dest: Path) -> None:
    try:
        data = zf.read(name)
    except KeyError:
        raise StubsError(f"{name} is not in TorchServe's model-server.jar: unsupported TorchServe version") from None
    if name == OIP_PROTO:
        if OIP_PACKAGE[0] not in data:
            raise StubsError(f"{name} in TorchServe's jar has an unexpected package: unsupported TorchServe version")
        data = data.replace(OIP_PACKAGE[0], OIP_PACKAGE[1])
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)


def _install(built: Path) -> None:
    """Rename the finished build into place; a stale copy is first moved aside (rename is atomic)."""
    if GENERATED.exists() and not _up_to_date():
        stale = Path(tempfile.mkdtemp(prefix="._stale-", dir=GENERATED.parent))
        try:
            os.replace(GENERATED, stale / "old")
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(built, GENERATED)
    except OSError:  # another process installed its build first (the folder is not empty)
        if not _up_to_date():
            raise


def main() -> int:
    try:
        package = ensure_stubs()
    except StubsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"gRPC stubs ready in {Path(package.__file__).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
