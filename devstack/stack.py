"""Start and stop the local stack (MinIO + TorchServe + Orthanc) and remember it in a state file.

MinIO's root user only creates buckets, users and policies (``devstack/iam.py``); every component
gets its own user and env file under the state folder: ``minio.env`` (batch: read inputs and
models, write runs; what the README's batch commands use), ``minio-ui.env`` (read runs, add
annotations), ``minio-serve.env`` (read models), ``minio-release.env`` (publish archives) and
``minio-admin.env`` (root: bucket and input staging, policies).

Orthanc (the local PACS, DICOMweb at ``/dicom-web``) listens on a free loopback port
(``MEDXAI_PORT_ORTHANC`` to choose one; never Orthanc's default 8042) with a new random password
per start, written to ``orthanc.env`` (0600: ``MEDXAI_DICOMWEB_*``, what ``--dicomweb-env`` reads).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from devstack import iam
from devstack.services import (
    MinioServer,
    OrthancServer,
    ServiceError,
    StreamlitServer,
    TorchServeServer,
    free_port,
    stop_process_group,
)
from medxplain_contract.storage import S3Config

DEFAULT_PORTS = {"minio": 9000, "minio_console": 9001, "inference": 8080, "management": 8081, "metrics": 8082,
                 "grpc": 7070, "grpc_management": 7071, "ui": 8501}


def _port(name: str) -> int:
    return int(os.environ.get(f"MEDXAI_PORT_{name.upper()}") or DEFAULT_PORTS[name])


def _state_file(state: Path) -> Path:
    return state / "stack.json"


def _check_ports_free(names: list[str]) -> None:
    """Fail with the fix in the message, before any service starts, if a port is taken."""
    for name in names:
        port = _port(name)
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                raise ServiceError(f"port {port} ({name}) is already in use on 127.0.0.1: stop what runs there "
                                   f"(`make stop` for an earlier stack) or set MEDXAI_PORT_{name.upper()}")


ORTHANC_ENV = "orthanc.env"


def _orthanc_port() -> int:
    """A free port unless MEDXAI_PORT_ORTHANC names one (checked with the others before anything starts)."""
    value = os.environ.get("MEDXAI_PORT_ORTHANC")
    return int(value) if value else free_port()


def start_orthanc(state: Path) -> tuple[OrthancServer, Path]:
    """The local PACS and its credentials file (a new password each start)."""
    orthanc = OrthancServer(workdir=state / "orthanc", port=_orthanc_port()).start()
    return orthanc, orthanc.write_env_file(state / ORTHANC_ENV).resolve()


def env_file_name(component: str) -> str:
    return "minio.env" if component == "batch" else f"minio-{component}.env"


def provision_storage(minio: MinioServer, state: Path) -> dict[str, str]:
    """Buckets, one user + policy per component, and their env files (0600); component -> env file."""
    users = {c: iam.Credentials.generate(c) for c in iam.COMPONENTS}
    iam.apply(minio.admin_config(), users)
    files = {}
    for component, creds in {**users, "admin": iam.Credentials(minio.access_key, minio.secret_key)}.items():
        path = state / env_file_name(component)
        path.write_text(S3Config(minio.endpoint, False, creds.access_key, creds.secret_key).env_lines())
        path.chmod(0o600)
        files[component] = str(path.resolve())
    return files


def start(state: Path, model_store: Path) -> dict:
    if _state_file(state).exists():
        stop(state)
    _check_ports_free(list(DEFAULT_PORTS) + (["orthanc"] if os.environ.get("MEDXAI_PORT_ORTHANC") else []))
    state.mkdir(parents=True, exist_ok=True)
    models = {p.stem: p.name for p in sorted(model_store.glob("*.mar"))}
    if not models:
        raise ServiceError(f"no .mar archives in {model_store}: run `make archives` first")
    minio = MinioServer(data_dir=state / "minio-data", log_path=state / "logs" / "minio.log",
                        port=_port("minio"), console_port=_port("minio_console"))
    minio.start()
    orthanc = None
    try:
        credentials = provision_storage(minio, state)
        orthanc, orthanc_env = start_orthanc(state)
        ts = TorchServeServer(workdir=state / "torchserve", model_store=model_store.resolve(), models=models,
                              inference_port=_port("inference"), management_port=_port("management"),
                              metrics_port=_port("metrics"), grpc_port=_port("grpc"),
                              grpc_management_port=_port("grpc_management"))
        ts.start()
    except BaseException:
        if orthanc is not None:
            orthanc.stop()
        minio.stop()
        raise
    info = {
        "minio": {"endpoint": minio.endpoint, "pid": minio.pid, "credentials_file": credentials["batch"],
                  "credentials": credentials},
        "torchserve": {"inference": ts.inference_url, "management": ts.management_url, "metrics": ts.metrics_url,
                       "grpc": f"127.0.0.1:{ts.grpc_port}", "pid": ts.pid, "token_file": str(ts.key_file),
                       "models": sorted(models)},
        "orthanc": {"dicomweb": orthanc.dicomweb_url, "explorer": orthanc.explorer_url, "pid": orthanc.pid,
                    "credentials_file": str(orthanc_env), "log": str(orthanc.log_path)},
    }
    _state_file(state).write_text(json.dumps(info, indent=2) + "\n")
    return info


def stop(state: Path) -> None:
    path = _state_file(state)
    if not path.exists():
        print("nothing running")
        return
    info = json.loads(path.read_text())
    for service in ("ui", "torchserve", "orthanc", "minio"):
        pid = info.get(service, {}).get("pid")
        if pid:
            stop_process_group(int(pid))
            print(f"stopped {service} (pid {pid})")
    path.unlink()


def ui_env(info: dict) -> dict[str, str]:
    """The UI's settings: its own storage user, how to reach TorchServe, and demo mode (no OIDC locally)."""
    return {"MEDXAI_S3_ENV_FILE": info["minio"]["credentials"]["ui"], "MEDXAI_UI_DEMO": "1",
            "MEDXAI_TORCHSERVE_URL": info["torchserve"]["inference"],
            "MEDXAI_TORCHSERVE_KEY_FILE": info["torchserve"]["token_file"]}


def start_ui(state: Path) -> dict:
    """Start the Streamlit UI next to a running stack and record it in the state file."""
    info = json.loads(_state_file(state).read_text())
    ui = StreamlitServer(workdir=state / "ui", env=ui_env(info), port=_port("ui")).start()
    info["ui"] = {"url": ui.url, "pid": ui.pid, "log": str(ui.log_path)}
    _state_file(state).write_text(json.dumps(info, indent=2) + "\n")
    return info


def print_endpoints(info: dict) -> None:
    ts, minio = info["torchserve"], info["minio"]
    print(f"TorchServe REST  {ts['inference']}/predictions/{{{','.join(ts['models'])}}}")
    print(f"TorchServe gRPC  {ts['grpc']}")
    print(f"management       {ts['management']} (loopback only)   metrics {ts['metrics']}/metrics")
    print(f"token file       {ts['token_file']}  (send 'Authorization: Bearer <inference key>')")
    print(f"MinIO            http://{minio['endpoint']}  per-component credentials: "
          + ", ".join(f"{c} {Path(f).name}" for c, f in minio.get("credentials", {}).items())
          + f" (in {Path(minio['credentials_file']).parent})")
    if "orthanc" in info:
        pacs = info["orthanc"]
        print(f"Orthanc (PACS)   DICOMweb {pacs['dicomweb']}  explorer {pacs['explorer']}  "
              f"(user and password in {pacs['credentials_file']})")
    if "ui" in info:
        print(f"UI               {info['ui']['url']}  (log {info['ui']['log']})")
