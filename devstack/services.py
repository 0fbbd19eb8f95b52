"""Real MinIO, TorchServe, KServe and Orthanc processes on 127.0.0.1, for the tests, `make serve` and `make demo`.

Each server runs in its own process group with its own working and temporary folders, so several
can run side by side (TorchServe keeps its pid file in the temp dir and writes ``key_file.json``
to its working dir) and a stop always takes the whole tree down.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_TORCHSERVE_CONFIG = REPO_ROOT / "docker" / "serve" / "config.properties"
MINIO_RELEASE = "v0.0.0-20260212201848-7aac2a2c5b7c"  # keep in sync with the Makefile's MINIO_VERSION
ORTHANC_BIN = "/usr/sbin/Orthanc"  # Debian's orthanc package (`make setup`: check-orthanc)
ORTHANC_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb


class ServiceError(RuntimeError):
    """A service that did not come up (its log tail is in the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_dir() -> Path:
    return Path(os.environ.get("MEDXAI_CACHE", Path.home() / ".cache" / "medxai"))


def minio_binary() -> Path:
    path = Path(os.environ.get("MEDXAI_MINIO_BIN", cache_dir() / f"minio-{MINIO_RELEASE}" / "minio"))
    if not path.exists():
        raise ServiceError(f"MinIO server binary not found at {path}: run `make setup` (it builds it with go install)")
    return path


def _start(cmd: list[str], log_path: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop_process_group(pid: int, timeout: float = 30.0) -> None:
    """SIGTERM the group, then SIGKILL whatever is left (TorchServe's Python workers included)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(check, what: str, timeout: float, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with {proc.returncode}:\n{_tail(log_path)}")
        if check():
            return
        time.sleep(0.25)
    raise ServiceError(f"{what} not ready after {timeout:.0f}s:\n{_tail(log_path)}")


def _http_status(url: str, headers: dict[str, str] | None = None) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


@dataclass
class MinioServer:
    data_dir: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    console_port: int = field(default_factory=free_port)
    access_key: str = field(default_factory=lambda: "medxai-" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    pid: int | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> MinioServer:
        self.data_dir, self.log_path = self.data_dir.resolve(), self.log_path.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MINIO_ROOT_USER": self.access_key, "MINIO_ROOT_PASSWORD": self.secret_key,
               "MINIO_BROWSER": "off", "MINIO_UPDATE": "off", "MINIO_CALLHOME_ENABLE": "off"}
        cmd = [str(minio_binary()), "server", "--quiet", "--address", self.endpoint,
               "--console-address", f"127.0.0.1:{self.console_port}", str(self.data_dir)]
        proc = _start(cmd, self.log_path, self.data_dir.parent, env)
        self.pid = proc.pid
        _wait(lambda: _http_status(f"http://{self.endpoint}/minio/health/ready") == 200,
              "MinIO", timeout, proc, self.log_path)
        return self

    def stop(self) -> None:
        if self.pid:
            stop_process_group(self.pid)
            self.pid = None

    def client(self):
        """The root user's SDK client, made by the contract's storage layer like every other one."""
        return self.admin_config().client()

    def admin_config(self):
        """The root user's settings: for creating buckets, users and policies only (devstack/iam.py)."""
        from medxplain_contract.storage import S3Config
        return S3Config(self.endpoint, False, self.access_key, self.secret_key)


@dataclass
class TorchServeServer:
    workdir: Path
    model_store: Path
    models: dict[str, str]  # name -> archive file name in model_store
    inference_port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    grpc_management_port: int = field(default_factory=free_port)
    token_auth: bool = True
    extra_config: dict[str, str] = field(default_factory=dict)
    pid: int | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "logs" / "torchserve.out"

    def config(self) -> dict[str, str]:
        """The production config with only loopback addresses, ports and folders replaced."""
        props = read_properties(BASE_TORCHSERVE_CONFIG)
        props.update({
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "grpc_inference_address": "127.0.0.1",
            "grpc_inference_port": str(self.grpc_port),
            "grpc_management_address": "127.0.0.1",
            "grpc_management_port": str(self.grpc_management_port),
            "model_store": str(self.model_store),
            "workflow_store": str(self.workdir / "workflow-store"),
            "allowed_urls": f"^file://{self.model_store}/.*\\\\.mar$",
            "load_models": ",".join(f"{n}={f}" for n, f in self.models.items()),
            **self.extra_config,
        })
        if "vmargs" in props:  # the image's log4j2.xml sits next to its config.properties: use the repo's copy
            props["vmargs"] = props["vmargs"].replace("file:///opt/medxai/", f"file://{BASE_TORCHSERVE_CONFIG.parent}/")
        if not self.token_auth:
            props["disable_token_authorization"] = "true"
        return props

    def verify_archives(self) -> dict[str, str]:
        """Every archive to load must match its published sha256 (and signature): the ``.mar`` carries
        handler code that TorchServe executes."""
        from medxplain_contract.integrity import ArchiveIntegrityError, signing_key, verify_archive

        try:
            key = signing_key()
            return {name: verify_archive(self.model_store / file, key) for name, file in self.models.items()}
        except ArchiveIntegrityError as err:
            raise ServiceError(f"TorchServe not started: {err}") from None

    def start(self, timeout: float = 240.0) -> TorchServeServer:
        self.workdir, self.model_store = self.workdir.resolve(), self.model_store.resolve()  # it runs in workdir
        self.verify_archives()
        for sub in ("tmp", "logs", "workflow-store"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "config.properties"
        config_path.write_text("".join(f"{k}={v}\n" for k, v in self.config().items()))
        # No PYTHONPATH: TorchServe puts it *before* the unpacked archive on its workers' path, so the
        # repository there would shadow the engine code the .mar carries (the worker's path is
        # $PYTHONPATH : model dir : cwd, see docs/deploy.md); the archive alone must be enough.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update({"TMPDIR": str(self.workdir / "tmp"), "TEMP": str(self.workdir / "tmp"),
                    "LOG_LOCATION": str(self.workdir / "logs"), "METRICS_LOCATION": str(self.workdir / "logs")})
        torchserve = Path(sys.executable).with_name("torchserve")
        cmd = [str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(config_path),
               "--model-store", str(self.model_store)]
        proc = _start(cmd, self.log_path, self.workdir, env)
        self.pid = proc.pid
        _wait(self._healthy, "TorchServe", timeout, proc, self.log_path)
        return self

    def _healthy(self) -> bool:
        try:  # TorchServe creates key_file.json before it writes it: an empty file is "not yet"
            headers = self.auth_header("inference")
        except (OSError, ValueError, KeyError):
            return False
        return _http_status(f"{self.inference_url}/ping", headers) == 200

    def keys(self) -> dict[str, str]:
        """{'inference': ..., 'management': ...} from TorchServe's key_file.json."""
        data = json.loads(self.key_file.read_text())
        return {name: entry["key"] for name, entry in data.items() if isinstance(entry, dict) and "key" in entry}

    def auth_header(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[api]}"} if self.token_auth else {}

    def stop(self) -> None:
        if self.pid:
            stop_process_group(self.pid)
            self.pid = None

    def describe(self) -> dict:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


@dataclass
class KServeServer:
    """``python -m medxplain_kserve``: the same archives under KServe's ModelServer (OIP v1/v2 REST + gRPC).

    Loopback only, token auth on unless ``token_auth=False`` (then ``--no-auth``); the token is a random
    one-line file in ``workdir``. Archives are verified by the server itself (sha256 files, as TorchServe's
    entrypoint does). The repository is on its ``PYTHONPATH``: unlike TorchServe it imports the engine
    installed with it (the archive's engine.json must match that code, batch/archive.check_engine_code).
    """

    workdir: Path
    model_store: Path
    models: tuple[str, ...] = ("ddsm", "adni")
    token_auth: bool = True
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    pid: int | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def token_file(self) -> Path:
        return self.workdir / "token"

    @property
    def log_path(self) -> Path:
        return self.workdir / "kserve.log"

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"} if self.token_auth else {}

    def start(self, timeout: float = 180.0) -> KServeServer:
        self.workdir, self.model_store = self.workdir.resolve(), self.model_store.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.token_auth and not self.token_file.exists():
            self.token_file.touch(mode=0o600)
            self.token_file.write_text(secrets.token_urlsafe(32) + "\n")
        auth = ["--token-file", str(self.token_file)] if self.token_auth else ["--no-auth"]
        cmd = [sys.executable, "-m", "medxplain_kserve", "--model-store", str(self.model_store),
               "--models", ",".join(self.models), "--host", "127.0.0.1", "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), *auth, *self.extra_args]
        env = {**os.environ, "TMPDIR": str(self.workdir), "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        proc = _start(cmd, self.log_path, self.workdir, env)
        self.pid = proc.pid
        _wait(lambda: all(_http_status(f"{self.inference_url}/v2/models/{m}/ready", self.auth_header()) == 200
                          for m in self.models), "KServe", timeout, proc, self.log_path)
        return self

    def stop(self) -> None:
        if self.pid:
            stop_process_group(self.pid, timeout=15.0)
            self.pid = None


@dataclass
class StreamlitServer:
    """``streamlit run ui/app.py`` on 127.0.0.1, configured through environment variables only."""

    workdir: Path
    env: dict[str, str]  # MEDXAI_* settings for the UI (storage env file, TorchServe URL and key file)
    port: int = field(default_factory=free_port)
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "streamlit.log"

    def start(self, timeout: float = 90.0) -> StreamlitServer:
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "HOME": os.environ.get("HOME", str(self.workdir)),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "streamlit", "run", str(REPO_ROOT / "ui" / "app.py"),
               "--server.headless=true", "--server.address=127.0.0.1", f"--server.port={self.port}",
               "--browser.gatherUsageStats=false", "--server.fileWatcherType=none", "--client.toolbarMode=minimal"]
        proc = _start(cmd, self.log_path, REPO_ROOT, env)
        self.pid = proc.pid
        _wait(lambda: _http_status(f"{self.url}/_stcore/health") == 200, "Streamlit", timeout, proc, self.log_path)
        return self

    def stop(self) -> None:
        if self.pid:
            stop_process_group(self.pid)
            self.pid = None


def orthanc_binary() -> Path:
    path = Path(os.environ.get("MEDXAI_ORTHANC_BIN", ORTHANC_BIN))
    plugin = Path(os.environ.get("MEDXAI_ORTHANC_DICOMWEB_PLUGIN", ORTHANC_DICOMWEB_PLUGIN))
    for needed, package in ((path, "orthanc"), (plugin, "orthanc-dicomweb")):
        if not needed.exists():
            raise ServiceError(f"{needed} not found: run `make setup` (it installs Debian's {package} package)")
    return path


@dataclass
class OrthancServer:
    """Orthanc with its DICOMweb plugin: the hospital PACS of the tests and the devstack.

    HTTP only, on a free loopback port (``RemoteAccessAllowed: false``: other hosts are refused), with
    HTTP basic authentication and a random password per start; its DICOM (DIMSE) listener is off, since
    everything here speaks DICOMweb, so nothing else opens a port. Storage and index live in ``workdir``.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    username: str = "medxai"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def explorer_url(self) -> str:
        """Orthanc's built-in web explorer (studies, series, instances; same credentials)."""
        return f"{self.url}/app/explorer.html"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def auth(self) -> tuple[str, str]:
        return self.username, self.password

    def config(self) -> dict:
        plugin = os.environ.get("MEDXAI_ORTHANC_DICOMWEB_PLUGIN", ORTHANC_DICOMWEB_PLUGIN)
        return {
            "Name": "medxai-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [plugin],
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomServerEnabled": False,
            "WebDavEnabled": False,
            "HttpDescribeErrors": False,  # no request details in error bodies
            "OverwriteInstances": False,  # a SOP instance already stored keeps its first copy (docs/deploy.md)
            "SaveJobs": False,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False,
                         "Host": f"127.0.0.1:{self.port}"},
        }

    def start(self, timeout: float = 60.0) -> OrthancServer:
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = orthanc_binary()
        config_path = self.workdir / "orthanc.json"
        config_path.touch(mode=0o600)  # it holds the password
        config_path.write_text(json.dumps(self.config(), indent=2) + "\n")
        config_path.chmod(0o600)
        proc = _start([str(binary), str(config_path)], self.log_path,
                      self.workdir, dict(os.environ))
        self.pid = proc.pid
        _wait(self._healthy, "Orthanc", timeout, proc, self.log_path)
        return self

    def _headers(self) -> dict[str, str]:
        import base64
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {token}"}

    def _healthy(self) -> bool:
        # the DICOMweb plugin answers once it is loaded: QIDO on the (empty or not) study list
        return _http_status(f"{self.dicomweb_url}/studies?limit=1", self._headers()) == 200

    def env_lines(self) -> str:
        """The env-file form of its credentials (``MEDXAI_DICOMWEB_ENV_FILE``; medxplain_contract/dicomweb.py)."""
        return (f"MEDXAI_DICOMWEB_URL={self.dicomweb_url}\nMEDXAI_DICOMWEB_USERNAME={self.username}\n"
                f"MEDXAI_DICOMWEB_PASSWORD={self.password}\n")

    def write_env_file(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(self.env_lines())
        return path

    def stop(self) -> None:
        if self.pid:
            stop_process_group(self.pid)
            self.pid = None


def read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
