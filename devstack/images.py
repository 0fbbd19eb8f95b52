"""Build, start and measure the five container images with buildah (no Docker daemon needed).

`make base-images` builds local stand-ins for the public base images (a Debian bookworm rootfs made
by debootstrap from the host's Debian mirror, Python 3.11 at /usr/local/bin/python like
python:3.11-slim, and a Go builder with the host's Go toolchain copied in) for machines that cannot
pull from a registry. `make images` builds serve, batch, ui and minio from docker/*/Dockerfile (and
kserve, the KServe runtime, from docker/serve/Dockerfile's kserve stage) with
`buildah build --layers` (unchanged steps are reused; pip and Go caches are build mounts).
`make images-test` (and tests/test_images.py) starts each image with its own ENTRYPOINT, CMD, USER
and WORKDIR through `buildah run` (chroot isolation shares the host network, so loopback works).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("devstack.images")

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER = REPO_ROOT / "docker"
IMAGES = ("minio", "ui", "batch", "serve", "kserve")  # cheapest first: a broken tool chain fails early
# Images built from a stage of another image's Dockerfile: name -> (docker/<folder>, --target stage).
STAGES = {"kserve": ("serve", "kserve")}
TAG = "0.1.0"
BASE_PYTHON = "localhost/medxai-base/python:3.11-bookworm"
BASE_DEBIAN = "localhost/medxai-base/debian:12-minbase"
BASE_GO = "localhost/medxai-base/golang:host-bookworm"
PUBLIC_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
ISOLATION = "chroot"  # the only isolation that works without a daemon, user namespaces or cgroups here


class ImageError(RuntimeError):
    """A build or run step that failed (the message names the step)."""


def cache_dir() -> Path:
    return Path(os.environ.get("MEDXAI_CACHE", Path.home() / ".cache" / "medxai")) / "images"


def buildah_available() -> str | None:
    """The reason image work cannot run here, or None when buildah can build as this user."""
    if shutil.which("buildah") is None:
        return "buildah is not installed (make check-buildah installs it as root on Debian)"
    if os.geteuid() != 0:
        return "buildah with chroot isolation needs root here (no user namespaces configured)"
    return None


def buildah(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["buildah", *args]
    log.debug("%s", " ".join(cmd))
    proc = subprocess.run(cmd, text=True, capture_output=capture, check=False)
    if check and proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] if capture else ""
        raise ImageError(f"buildah {args[0]} failed (exit {proc.returncode}) {detail}".strip())
    return proc


def image_exists(ref: str) -> bool:
    return buildah("inspect", "--type", "image", ref, capture=True, check=False).returncode == 0


# --- base images ------------------------------------------------------------------------------------

def debian_mirror() -> str:
    """The Debian mirror of the host's apt sources (the only archive reachable on a closed network)."""
    texts = [p.read_text() for p in sorted(Path("/etc/apt").glob("sources.list*")) if p.is_file()]
    texts += [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*")) if p.is_file()]
    for text in texts:
        for url in re.findall(r"(?:URIs:|deb)\s+(https?://\S+/debian)\b(?!-)", text):
            return url
    return "http://deb.debian.org/debian"


SOURCES = """Types: deb
URIs: {mirror}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {mirror}-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def rootfs_tarball(mirror: str) -> Path:
    """A minbase bookworm rootfs, cached as a tarball outside the checkout (debootstrap takes minutes)."""
    key = hashlib.sha256(f"bookworm minbase {mirror}".encode()).hexdigest()[:12]
    tarball = cache_dir() / f"bookworm-minbase-{key}.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is not installed (make check-buildah installs it)")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    root = tarball.parent / f"rootfs-{key}"
    shutil.rmtree(root, ignore_errors=True)
    log.info("debootstrap bookworm from %s (a few minutes) ...", mirror)
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), mirror], check=True)
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(SOURCES.format(mirror=mirror))
    # Like the slim images: no apt caches or lists in the layer, no docs that dpkg would keep.
    subprocess.run(["chroot", str(root), "apt-get", "clean"], check=True)
    for sub in ("var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info"):
        for child in (root / sub).glob("*"):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    partial = tarball.with_suffix(".part")
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True)
    partial.rename(tarball)
    shutil.rmtree(root)
    return tarball


def extra_cas() -> list[Path]:
    """Host CAs to trust in the stand-ins: MEDXAI_IMAGE_EXTRA_CA (colon-separated) or the local ones."""
    env = os.environ.get("MEDXAI_IMAGE_EXTRA_CA")
    if env is not None:
        return [Path(p) for p in env.split(":") if p]
    return sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))


def _commit(ctr: str, ref: str, config: list[str]) -> None:
    try:
        if config:
            buildah("config", *config, ctr)
        buildah("commit", "--rm", ctr, ref)
    except ImageError:
        buildah("rm", ctr, check=False, capture=True)
        raise


def _new_container(base: str) -> str:
    return buildah("from", "--pull-never", base, capture=True).stdout.strip().splitlines()[-1]


def build_base_images(force: bool = False) -> None:
    """Local stand-ins for debian:12-slim, python:3.11-slim and golang:1.24-bookworm."""
    mirror = debian_mirror()
    if force or not image_exists(BASE_DEBIAN):
        tarball = rootfs_tarball(mirror)
        ctr = buildah("from", "scratch", capture=True).stdout.strip()
        buildah("add", ctr, str(tarball), "/")
        # A TLS-intercepting egress proxy (like this machine's) re-signs PyPI and the Go proxy with its
        # own CA: the host's local CAs go where ca-certificates' update-ca-certificates picks them up.
        for crt in extra_cas():
            buildah("copy", ctr, str(crt), f"/usr/local/share/ca-certificates/{crt.name}")
        _commit(ctr, BASE_DEBIAN, ["--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                   "--env", "LANG=C.UTF-8", "--cmd", "bash"])
        log.info("built %s", BASE_DEBIAN)
    if force or not image_exists(BASE_PYTHON):
        ctr = _new_container(BASE_DEBIAN)
        # python:3.11-slim puts python/python3 in /usr/local/bin; Debian's 3.11 lives in /usr/bin.
        script = ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                  "python3.11 python3.11-venv python3-venv ca-certificates && apt-get clean "
                  "&& rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/* "
                  "&& ln -sf /usr/bin/python3.11 /usr/local/bin/python3 "
                  "&& ln -sf /usr/bin/python3.11 /usr/local/bin/python")
        try:
            buildah("run", "--isolation", ISOLATION, ctr, "--", "sh", "-c", script)
        except ImageError:
            buildah("rm", ctr, check=False, capture=True)
            raise
        # Debian's pip reads the system bundle only when told (its vendored certifi lacks local CAs).
        _commit(ctr, BASE_PYTHON, ["--cmd", "python3", "--env", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt"])
        log.info("built %s", BASE_PYTHON)
    if force or not image_exists(BASE_GO):
        goroot = Path(subprocess.run(["go", "env", "GOROOT"], capture_output=True, text=True,
                                     check=True).stdout.strip())
        version = subprocess.run(["go", "env", "GOVERSION"], capture_output=True, text=True, check=True).stdout.strip()
        ctr = _new_container(BASE_DEBIAN)
        try:
            buildah("run", "--isolation", ISOLATION, ctr, "--", "sh", "-c",
                    "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                    "ca-certificates git && apt-get clean && rm -rf /var/lib/apt/lists/*")
            # Debian bookworm's golang (1.19) is too old for MinIO: the host's toolchain is copied in.
            buildah("copy", ctr, str(goroot), "/usr/local/go")
        except ImageError:
            buildah("rm", ctr, check=False, capture=True)
            raise
        _commit(ctr, BASE_GO, ["--env", "GOPATH=/go", "--env", "GOTOOLCHAIN=local",
                               "--env", "PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                               "--env", f"GOLANG_VERSION={version.removeprefix('go')}", "--workingdir", "/go"])
        log.info("built %s (%s from the host)", BASE_GO, version)


# --- application images -----------------------------------------------------------------------------

def image_ref(name: str) -> str:
    return f"localhost/medxai/{name}:{TAG}"


def build_args(name: str, torch_index: str | None, base: str) -> list[str]:
    """--build-arg list: the local stand-ins with base=local, the Dockerfiles' pinned tags otherwise."""
    args: list[str] = []
    if name == "minio":
        if base == "local":
            args += ["--build-arg", f"GO_IMAGE={BASE_GO}", "--build-arg", f"RUNTIME_IMAGE={BASE_DEBIAN}"]
    else:
        if base == "local":
            args += ["--build-arg", f"PYTHON_IMAGE={BASE_PYTHON}"]
        if torch_index and name in ("serve", "batch", "kserve"):
            args += ["--build-arg", f"TORCH_INDEX_URL={torch_index}"]
    return args


def build_image(name: str, torch_index: str | None = None, base: str = "local") -> float:
    """Build one image with reusable layers; returns the wall time in seconds."""
    folder, target = STAGES.get(name, (name, None))
    dockerfile = DOCKER / folder / "Dockerfile"
    context = DOCKER / folder if folder == "minio" else REPO_ROOT
    cmd = ["build", "--isolation", ISOLATION, "--layers", "--force-rm", "--format", "docker", "-f", str(dockerfile),
           *build_args(name, torch_index, base), *(["--target", target] if target else []), "-t", image_ref(name)]
    ignore = DOCKER / folder / "Dockerfile.dockerignore"
    if ignore.exists():  # buildah 1.28 reads only <context>/.dockerignore by itself
        cmd += ["--ignorefile", str(ignore)]
    start = time.monotonic()
    log.info("building %s ...", image_ref(name))
    buildah(*cmd, str(context))
    took = time.monotonic() - start
    log.info("built %s in %.0f s", image_ref(name), took)
    return took


def image_size(ref: str) -> int:
    """Uncompressed size in bytes (sum of the layers, what `docker images` shows)."""
    out = buildah("images", "--json", ref, capture=True).stdout
    size = json.loads(out)[0]["size"]  # buildah 1.28 prints go-units' decimal HumanSize, e.g. "362 MB"
    if isinstance(size, int | float):
        return int(size)
    number, unit = size.split()
    return int(float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit])


def image_config(ref: str) -> dict:
    """The OCI config of an image: Entrypoint, Cmd, User, WorkingDir, Env, Healthcheck (docker format)."""
    data = json.loads(buildah("inspect", "--type", "image", ref, capture=True).stdout)
    config = dict(data.get("OCIv1", {}).get("config") or {})
    docker = data.get("Docker", {}).get("config") or {}
    if docker.get("Healthcheck"):
        config["Healthcheck"] = docker["Healthcheck"]
    return config


# --- running an image -------------------------------------------------------------------------------

@dataclass
class Running:
    """One image started with `buildah run` from a working container (removed again by stop())."""

    name: str
    container: str
    config: dict
    log_path: Path
    volumes: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None

    def exec(self, argv: list[str], timeout: float = 60.0, user: str | None = None) -> subprocess.CompletedProcess:
        """Run a second command in the same container (e.g. the image's HEALTHCHECK), with the same
        host folders mounted (`buildah run` mounts per command, not per container)."""
        cmd = ["buildah", "run", "--isolation", ISOLATION, "--network", "host",
               "--user", user or self.config.get("User") or "0:0"]
        for volume in self.volumes:
            cmd += ["--volume", volume]
        cmd += [self.container, "--", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def healthcheck(self, replace: dict[str, str] | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """The image's own HEALTHCHECK command (CMD form), with the port of this run substituted."""
        test = list((self.config.get("Healthcheck") or {}).get("Test") or [])
        if not test or test[0] != "CMD":
            raise ImageError(f"{self.name}: the image has no exec-form HEALTHCHECK")
        argv = test[1:]
        for old, new in (replace or {}).items():
            argv = [a.replace(old, new) for a in argv]
        return self.exec(argv, timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        from devstack.services import stop_process_group
        if self.proc is not None and self.proc.poll() is None:
            stop_process_group(self.proc.pid)
        self.proc = None
        buildah("rm", self.container, check=False, capture=True)


def run_image(name: str, args: list[str] | None, log_path: Path, env: dict[str, str] | None = None,
              volumes: list[str] | None = None, ref: str | None = None) -> Running:
    """Start the image's ENTRYPOINT (+ its CMD, or ``args`` in CMD's place) as its USER in its WORKDIR.

    `buildah run` applies none of these by itself, so they are read from the image config. Chroot
    isolation with ``--network host`` shares the host's network namespace: servers listen on loopback.
    """
    ref = ref or image_ref(name)
    config = image_config(ref)
    argv = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [] if args is None else args)
    if not argv:
        raise ImageError(f"{ref} has neither ENTRYPOINT nor CMD")
    container = buildah("from", "--pull-never", "--name", f"medxai-{name}-{os.getpid()}-{time.time_ns() % 10**6}",
                        ref, capture=True).stdout.strip().splitlines()[-1]
    # buildah 1.28 mounts an anonymous volume for each VOLUME over a --volume at the same path: drop
    # the declaration from this working container so the host folder is what the process sees.
    for volume in volumes or []:
        target = volume.split(":")[1]
        if target in (config.get("Volumes") or {}):
            buildah("config", "--volume", f"{target}-", container)
    cmd = ["buildah", "run", "--isolation", ISOLATION, "--network", "host",
           "--user", config.get("User") or "0:0", "--workingdir", config.get("WorkingDir") or "/"]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    for volume in volumes or []:
        cmd += ["--volume", volume]
    cmd += [container, "--", *argv]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    running = Running(name, container, config, log_path, tuple(volumes or ()))
    with open(log_path, "ab") as out:
        running.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
    log.info("started %s as user %s: %s", ref, config.get("User"), " ".join(argv))
    return running


def wait_for(check, what: str, running: Running, timeout: float) -> None:
    """Poll ``check()`` until true; fail early (with the log tail) when the container's process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if running.proc is not None and running.proc.poll() is not None:
            break
        time.sleep(1.0)
    tail = running.log_path.read_text(errors="replace")[-3000:] if running.log_path.exists() else ""
    state = "exited" if running.proc is not None and running.proc.poll() is not None else "timed out"
    raise ImageError(f"{what} {state}; log tail:\n{tail}")


# --- what each image must answer -------------------------------------------------------------------

def _owned_dir(path: Path, uid: int = 10001) -> Path:
    """A host folder the image's non-root user (uid 10001 in all five images) can write."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int | None, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return None, b""


def check_minio(workdir: Path, timeout: float = 60.0) -> dict:
    """The MinIO image on a loopback port: ready, its own HEALTHCHECK exits 0, a bucket round trip."""
    import secrets

    from minio import Minio

    from devstack.services import free_port
    port, console = free_port(), free_port()
    user, password = "images-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    args = [a.replace(":9000", f"127.0.0.1:{port}").replace("127.0.0.1:9001", f"127.0.0.1:{console}")
            for a in image_config(image_ref("minio")).get("Cmd") or []]
    data = _owned_dir(workdir / "minio-data")
    running = run_image("minio", args, workdir / "minio.log", volumes=[f"{data}:/data"],
                        env={"MINIO_ROOT_USER": user, "MINIO_ROOT_PASSWORD": password})
    try:
        start = time.monotonic()
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/minio/health/ready")[0] == 200, "minio image", running, timeout)
        ready = time.monotonic() - start
        health = running.healthcheck({"127.0.0.1:9000": f"127.0.0.1:{port}"})
        if health.returncode != 0:
            raise ImageError(f"minio HEALTHCHECK exited {health.returncode}: {health.stderr[-500:]}")
        client = Minio(f"127.0.0.1:{port}", access_key=user, secret_key=password, secure=False)
        import io
        payload = secrets.token_bytes(4096)
        client.make_bucket("roundtrip")
        client.put_object("roundtrip", "probe.bin", io.BytesIO(payload), len(payload))
        response = client.get_object("roundtrip", "probe.bin")
        try:
            back = response.read()
        finally:
            response.close()
            response.release_conn()
        if back != payload:
            raise ImageError("minio image returned different bytes than were stored")
        client.remove_object("roundtrip", "probe.bin")
        client.remove_bucket("roundtrip")
        return {"ready_s": round(ready, 1), "healthcheck": health.returncode, "roundtrip_bytes": len(payload)}
    finally:
        running.stop()


def serve_config(ports: dict[str, int]) -> str:
    """The image's config.properties with loopback addresses and free ports only (folders stay the image's)."""
    from devstack.services import read_properties
    props = read_properties(DOCKER / "serve" / "config.properties")
    props.update({
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_address": "127.0.0.1", "grpc_inference_port": str(ports["grpc"]),
        "grpc_management_address": "127.0.0.1", "grpc_management_port": str(ports["grpc_management"]),
    })
    return "".join(f"{k}={v}\n" for k, v in props.items())


def check_serve(workdir: Path, model_store: Path, sample: Path, model: str = "ddsm",
                timeout: float = 420.0) -> dict:
    """The serve image on loopback ports with ``model_store`` mounted: authenticated /ping and prediction,
    a request without the token refused, and the image's HEALTHCHECK (healthcheck.py) exiting 0."""
    from devstack.services import free_port
    ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc", "grpc_management")}
    conf = workdir / "serve-conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "config.properties").write_text(serve_config(ports))
    run_dir, logs = _owned_dir(workdir / "serve-run"), _owned_dir(workdir / "serve-logs")
    # CMD's shape (--ts-config FILE) with a config that differs only in addresses and ports.
    running = run_image("serve", ["--ts-config", "/opt/medxai-test/config.properties"], workdir / "serve.log",
                        volumes=[f"{model_store.resolve()}:/home/model-server/model-store:ro",
                                 f"{conf}:/opt/medxai-test:ro", f"{run_dir}:/home/model-server/run",
                                 f"{logs}:/home/model-server/logs"])
    base = f"http://127.0.0.1:{ports['inference']}"

    def key() -> str | None:
        try:
            return json.loads((run_dir / "key_file.json").read_text())["inference"]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    try:
        start = time.monotonic()
        wait_for(lambda: key() is not None and _get(f"{base}/ping", {"Authorization": f"Bearer {key()}"})[0] == 200,
                 "serve image /ping", running, timeout)
        ready = time.monotonic() - start
        body = sample.read_bytes()
        raw = {"Content-Type": "application/octet-stream"}  # urllib's form default makes Netty parse a form
        url = f"{base}/predictions/{model}"
        answer = check_answers(
            "serve", model, running,
            refused=urllib.request.Request(url, data=body, headers=raw),
            request=urllib.request.Request(url, data=body, headers={**raw, "Authorization": f"Bearer {key()}"}),
            parse=lambda data, _headers: json.loads(data),
            health_urls={"http://127.0.0.1:8080/ping": f"{base}/ping"})
        return {"ready_s": round(ready, 1), **answer}
    finally:
        running.stop()


def check_answers(name: str, model: str, running: Running, refused: urllib.request.Request,
                  request: urllib.request.Request, parse, health_urls: dict[str, str]) -> dict:
    """What both servers' images must do once ready: refuse ``refused`` (no token), answer ``request``
    with ``model``'s probabilities (``parse(body, headers)`` gives the result JSON), and pass their
    HEALTHCHECK (its URLs rewritten by ``health_urls`` to the loopback ports)."""
    try:
        urllib.request.urlopen(refused, timeout=60)
        raise ImageError(f"{name} image answered a request without the token")
    except urllib.error.HTTPError as err:
        refused_status = err.code
    t0 = time.monotonic()
    with urllib.request.urlopen(request, timeout=300) as r:
        result = parse(r.read(), r.headers)
    latency = time.monotonic() - t0
    probabilities = result["prediction"]["probabilities"]
    if result["model"]["name"] != model or abs(sum(probabilities.values()) - 1) > 1e-4:
        raise ImageError(f"{name} image: unexpected result for {model}")
    health = running.healthcheck(health_urls)
    if health.returncode != 0:
        raise ImageError(f"{name} HEALTHCHECK exited {health.returncode}: {(health.stdout + health.stderr)[-500:]}")
    return {"unauthenticated_status": refused_status, "answer_s": round(latency, 2), "probabilities": probabilities,
            "healthcheck": health.returncode}


def oip_v2_body(data: bytes) -> tuple[bytes, dict[str, str]]:
    """An OIP v2 REST infer request with the file as BYTES input ``data`` (binary tensor extension), asking
    for the ``result`` output: what medxplain_client's oip-rest transport sends."""
    element = len(data).to_bytes(4, "little") + data
    header = json.dumps({"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(element)}}],
                         "outputs": [{"name": "result"}]}).encode()
    return header + element, {"Inference-Header-Content-Length": str(len(header)),
                              "Content-Type": "application/octet-stream"}


def oip_v2_result(body: bytes, headers) -> dict:
    """The JSON of the ``result`` output of an OIP v2 answer (JSON, or binary extension)."""
    if headers.get("Inference-Header-Content-Length") is None:
        return json.loads(json.loads(body)["outputs"][0]["data"][0])
    n = int(headers["Inference-Header-Content-Length"])
    out = json.loads(body[:n])["outputs"][0]
    return json.loads(body[n + 4:n + out["parameters"]["binary_data_size"]])


def check_kserve(workdir: Path, model_store: Path, sample: Path, model: str = "ddsm", timeout: float = 300.0) -> dict:
    """The KServe runtime image on loopback ports with ``model_store`` at its /mnt/models/model-store and a
    token file where the Secret goes: /v2/health/ready, an infer without the token refused, an
    authenticated OIP v2 infer, and the image's HEALTHCHECK exiting 0."""
    import secrets

    from devstack.services import free_port
    http, grpc = free_port(), free_port()
    token = secrets.token_urlsafe(32)
    secret_dir = _owned_dir(workdir / "kserve-secret")
    (secret_dir / "token").write_text(token + "\n")
    os.chown(secret_dir / "token", 10001, 10001)
    os.chmod(secret_dir / "token", 0o400)
    tmp = _owned_dir(workdir / "kserve-tmp")
    tmp.chmod(0o1777)
    cmd = list(image_config(image_ref("kserve")).get("Cmd") or [])
    # CMD's shape with loopback and free ports only (and just ``model``: the store may hold one archive).
    values = {"--host": "127.0.0.1", "--http-port": str(http), "--grpc-port": str(grpc), "--models": model}
    args = [values.get(cmd[i - 1], a) if i else a for i, a in enumerate(cmd)]
    running = run_image("kserve", args, workdir / "kserve.log",
                        volumes=[f"{model_store.resolve()}:/mnt/models/model-store:ro",
                                 # /var/run links to /run in Debian; buildah 1.28 (chroot) silently skips a
                                 # mount whose target path crosses that link, so the real path is mounted.
                                 f"{secret_dir}:/run/secrets/medxai:ro", f"{tmp}:/tmp"])
    base = f"http://127.0.0.1:{http}"
    try:
        start = time.monotonic()
        wait_for(lambda: _get(f"{base}/v2/health/ready")[0] == 200, "kserve image /v2/health/ready", running, timeout)
        ready = time.monotonic() - start
        body, headers = oip_v2_body(sample.read_bytes())
        url = f"{base}/v2/models/{model}/infer"
        # The refusal comes before the body is read, and the server then closes the connection: a large
        # body would still be in flight (connection reset), so the unauthenticated request is small.
        small, small_headers = oip_v2_body(sample.read_bytes()[:64])
        answer = check_answers(
            "kserve", model, running,
            refused=urllib.request.Request(url, data=small, headers=small_headers),
            request=urllib.request.Request(url, data=body, headers={**headers, "Authorization": f"Bearer {token}"}),
            parse=oip_v2_result, health_urls={"http://127.0.0.1:8080/": f"{base}/"})
        return {"ready_s": round(ready, 1), **answer}
    finally:
        running.stop()


def s3_env_lines(endpoint: str, access_key: str, secret_key: str) -> str:
    return f"MEDXAI_S3_ENDPOINT=http://{endpoint}\nMEDXAI_S3_ACCESS_KEY={access_key}\nMEDXAI_S3_SECRET_KEY={secret_key}\n"


def check_batch(workdir: Path, archive: Path, data_dir: Path, s3_env: str, output: str, client,
                model: str = "ddsm", timeout: float = 900.0) -> dict:
    """The batch image runs one item of ``data_dir``'s index into a real MinIO (``output``, bucket existing)."""
    import csv
    index = "images.csv" if model == "ddsm" else "subjects.csv"
    with open(data_dir / index, newline="") as f:
        rows = list(csv.DictReader(f))
    row = next((r for r in rows if r.get("split") == "test"), rows[0])
    inputs = workdir / "batch-input"
    (inputs / row["path"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(data_dir / row["path"], inputs / row["path"])
    with open(inputs / index, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    secrets_dir = workdir / "batch-secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    (secrets_dir / "s3.env").write_text(s3_env)
    os.chmod(secrets_dir / "s3.env", 0o644)  # read by uid 10001 inside; a throwaway test user's keys
    models = workdir / "batch-models"
    models.mkdir(parents=True, exist_ok=True)
    for sidecar in sorted(archive.parent.glob(f"{archive.name}*")):  # the .mar, its .sha256 and .json
        shutil.copyfile(sidecar, models / sidecar.name)
    args = ["run", "--model", model, "--archive", f"/home/medxai/models/{archive.name}",
            "--input", "/home/medxai/input", "--output", output, "--s3-env", "/home/medxai/secrets/s3.env",
            "--threads", "2", "--no-progress"]
    start = time.monotonic()
    running = run_image("batch", args, workdir / "batch.log",
                        volumes=[f"{inputs}:/home/medxai/input:ro", f"{models}:/home/medxai/models:ro",
                                 f"{secrets_dir}:/home/medxai/secrets:ro"])
    try:
        try:
            code = running.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - start
        if code != 0:
            tail = running.log_path.read_text(errors="replace")[-3000:]
            raise ImageError(f"batch image exited {code}; log tail:\n{tail}")
    finally:
        running.stop()
    bucket, _, prefix = output.removeprefix("s3://").partition("/")
    names = [o.object_name for o in client.list_objects(bucket, prefix=f"{prefix}/", recursive=True)]
    items = {n.split("/")[2] for n in names if n.startswith(f"{prefix}/items/")}
    if f"{prefix}/run.json" not in names or len(items) != 1:
        raise ImageError(f"batch image: expected run.json and 1 item under {output}, found {len(items)} items")
    return {"run_s": round(took, 1), "items": len(items), "objects": len(names)}


def check_ui(workdir: Path, s3_env: str, runs: str, timeout: float = 120.0, browser: bool = True) -> dict:
    """The UI image: Streamlit's health endpoint, its HEALTHCHECK, and the Cases page of a real run
    (rendered by Debian's chromium when it is installed: the page's HTML is built client-side)."""
    from devstack.services import free_port
    port = free_port()
    env = {k: v for k, v in (line.split("=", 1) for line in s3_env.splitlines() if "=" in line)}
    env.update({"MEDXAI_UI_RUNS": runs, "MEDXAI_UI_DEMO": "1"})
    # The ENTRYPOINT names port 8501; Streamlit takes the last of repeated options, so CMD moves it.
    running = run_image("ui", [f"--server.port={port}", "--server.address=127.0.0.1"], workdir / "ui.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        wait_for(lambda: _get(f"{url}/_stcore/health") == (200, b"ok"), "ui image /_stcore/health", running, timeout)
        ready = time.monotonic() - start
        health = running.healthcheck({"127.0.0.1:8501": f"127.0.0.1:{port}"})
        if health.returncode != 0:
            raise ImageError(f"ui HEALTHCHECK exited {health.returncode}: {health.stderr[-500:]}")
        status, html = _get(f"{url}/")
        if status != 200 or b'id="root"' not in html:
            raise ImageError(f"ui image: the Cases page (/) answered {status} without Streamlit's app root")
        result = {"ready_s": round(ready, 1), "healthcheck": health.returncode, "cases_html_bytes": len(html)}
        chromium = shutil.which("chromium")
        if browser and chromium:
            result["cases_rendered"] = render_cases(url, chromium)
        return result
    finally:
        running.stop()


def render_cases(url: str, chromium: str, wait_ms: int = 90_000) -> str:
    """Open the Cases page in headless chromium, sign in (demo mode) and wait for the run's first case."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(url)
            box = page.get_by_label("Annotator name")
            box.wait_for(timeout=wait_ms)
            box.fill("Image Test")
            box.press("Enter")
            page.get_by_role("heading", name="Cases").first.wait_for(timeout=wait_ms)
            page.get_by_text("Class probabilities").first.wait_for(timeout=wait_ms)
            return "Class probabilities"
        finally:
            browser.close()


# --- the whole check, for `make images-test` --------------------------------------------------------

def sizes(names: tuple[str, ...] = IMAGES) -> dict[str, int]:
    return {name: image_size(image_ref(name)) for name in names if image_exists(image_ref(name))}


def check_all(workdir: Path, model_store: Path, data_dir: Path, model: str = "ddsm") -> dict:
    """Every image answering as docs/deploy.md says; a host MinIO (devstack) holds the batch run."""
    from devstack.services import MinioServer
    index = "images.csv" if model == "ddsm" else "subjects.csv"
    import csv
    with open(data_dir / index, newline="") as f:
        row = next(r for r in csv.DictReader(f))
    report: dict = {}
    t0 = time.monotonic()
    report["minio"] = check_minio(workdir)
    log.info("minio image: %s", report["minio"])
    report["serve"] = check_serve(workdir, model_store, data_dir / row["path"], model)
    log.info("serve image: %s", report["serve"])
    report["kserve"] = check_kserve(workdir, model_store, data_dir / row["path"], model)
    log.info("kserve image: %s", report["kserve"])
    minio = MinioServer(data_dir=workdir / "host-minio" / "data", log_path=workdir / "host-minio" / "minio.log").start()
    try:
        client = minio.client()
        client.make_bucket("images-test")
        env = s3_env_lines(minio.endpoint, minio.access_key, minio.secret_key)
        report["batch"] = check_batch(workdir, model_store / f"{model}.mar", data_dir, env,
                                      "s3://images-test/runs/one", client, model)
        log.info("batch image: %s", report["batch"])
        report["ui"] = check_ui(workdir, env, "s3://images-test/runs")
        log.info("ui image: %s", report["ui"])
    finally:
        minio.stop()
    report["test_s"] = round(time.monotonic() - t0, 1)
    report["sizes_mb"] = {k: round(v / 1e6) for k, v in sizes().items()}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.images", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="build the local base stand-ins (debootstrap; cached)")
    base.add_argument("--force", action="store_true", help="rebuild them even if present")
    build = sub.add_parser("build", help="build the images (buildah build --layers)")
    build.add_argument("names", nargs="*", default=list(IMAGES), help="images to build (default: all five)")
    build.add_argument("--base", choices=["local", "public"], default="local",
                       help="local: the stand-ins of `base`; public: the Dockerfiles' pinned tags (needs a registry)")
    build.add_argument("--torch-index", default=None,
                       help=f"index for torch/torchvision (default: the Dockerfiles' {PUBLIC_TORCH_INDEX})")
    test = sub.add_parser("test", help="start each image and check its answers")
    test.add_argument("--model-store", type=Path, required=True, help="folder with ddsm.mar (+ .sha256)")
    test.add_argument("--data", type=Path, required=True, help="the ddsm data folder (images.csv + images/)")
    test.add_argument("--workdir", type=Path, default=Path("build/images-test"))
    sub.add_parser("sizes", help="print the images' sizes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    reason = buildah_available()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    try:
        if args.command == "base":
            t0 = time.monotonic()
            build_base_images(force=args.force)
            print(f"base images ready in {time.monotonic() - t0:.0f} s")
        elif args.command == "build":
            unknown = sorted(set(args.names) - set(IMAGES))
            if unknown:
                parser.error(f"unknown image(s) {', '.join(unknown)}: choose from {', '.join(IMAGES)}")
            times = {n: round(build_image(n, args.torch_index, args.base)) for n in args.names}
            for name, took in times.items():
                print(f"{image_ref(name)}: {took} s, {image_size(image_ref(name)) / 1e6:.0f} MB")
        elif args.command == "test":
            workdir = args.workdir.resolve()
            shutil.rmtree(workdir, ignore_errors=True)
            print(json.dumps(check_all(workdir, args.model_store.resolve(), args.data.resolve()), indent=2))
        else:
            for name, size in sizes().items():
                print(f"{image_ref(name)}: {size / 1e6:.0f} MB")
    except (ImageError, subprocess.CalledProcessError) as err:
        print(f"images: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
