"""Build, start and measure the four container images with buildah (no Docker daemon needed).

`make base-images` builds local stand-ins for the public base images (a Debian bookworm rootfs made
by debootstrap from the host's Debian mirror, Python 3.11 at /usr/local/bin/python like
python:3.11-slim, and a Go builder with the host's Go toolchain copied in) for machines that cannot
pull from a registry. `make images` builds serve, batch, ui and minio from docker/*/Dockerfile with
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
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("devstack.images")

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER = REPO_ROOT / "docker"
IMAGES = ("minio", "ui", "batch", "serve")  # cheapest first: a broken tool chain fails early
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
        _commit(ctr, BASE_PYTHON, ["--cmd", "python3"])
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
        if torch_index and name in ("serve", "batch"):
            args += ["--build-arg", f"TORCH_INDEX_URL={torch_index}"]
    return args


def build_image(name: str, torch_index: str | None = None, base: str = "local") -> float:
    """Build one image with reusable layers; returns the wall time in seconds."""
    dockerfile = DOCKER / name / "Dockerfile"
    context = DOCKER / name if name == "minio" else REPO_ROOT
    cmd = ["build", "--isolation", ISOLATION, "--layers", "--format", "docker", "-f", str(dockerfile),
           *build_args(name, torch_index, base), "-t", image_ref(name)]
    ignore = DOCKER / name / "Dockerfile.dockerignore"
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
    return int(json.loads(out)[0]["size"])


def image_config(ref: str) -> dict:
    """The OCI config of an image: Entrypoint, Cmd, User, WorkingDir, Env, Healthcheck (docker format)."""
    data = json.loads(buildah("inspect", "--type", "image", ref, capture=True).stdout)
    config = dict(data.get("OCIv1", {}).get("config") or {})
    docker = data.get("Docker", {}).get("config") or {}
    if docker.get("Healthcheck"):
        config["Healthcheck"] = docker["Healthcheck"]
    return config
