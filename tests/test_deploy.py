"""Deployment files checked offline: images (docker/), compose, Kubernetes manifests (k8s/).

The tools come from requirements-deploy.txt, installed by `make deploy-tools` into their own
virtualenv; `make test` passes its bin/ folder as MEDXAI_DEPLOY_TOOLS.

- `kubectl kustomize` renders every target (dev, prod overlays; the batch Job; the optional KServe
  variant) and `kubernetes-validate --strict` accepts every built-in object of them. It has no
  schemas for KServe's CRDs (InferenceService, ServingRuntime): those are the only objects allowed
  to be reported as unknown, and get a structural check here instead.
- `checkov --framework kubernetes` passes on what each environment applies (an overlay plus a batch
  Job), with the skips listed in CHECKOV_SKIPS, each with its reason.
- `hadolint` passes on every Dockerfile.
- Consistency: every command the images and manifests run exists in the project (their `--help` is
  run), and ports, probe paths, paths and environment variables agree between
  docker/serve/config.properties, the Dockerfiles, compose.yaml and the rendered manifests.
Each tool and checker is also shown a broken input it must reject.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
import yaml

from devstack.services import MINIO_RELEASE, read_properties

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = ROOT / "k8s"
TARGETS = {"dev": "k8s/overlays/dev", "prod": "k8s/overlays/prod", "batch": "k8s/batch", "kserve": "k8s/kserve"}
# What one environment applies together: an overlay plus a batch run (k8s/batch uses the overlay's
# ConfigMap, Secret and NetworkPolicies); KServe on its own.
CHECKOV_SETS = {"dev": ["dev", "batch"], "prod": ["prod", "batch"], "kserve": ["kserve"]}
# Custom resources kubernetes-validate has no schema for (checked structurally in test_kserve_variant).
CRD_KINDS = {("serving.kserve.io/v1beta1", "InferenceService"), ("serving.kserve.io/v1alpha1", "ServingRuntime")}

# Checks allowed to fail, each with its reason (the test reports them as skipped, per resource).
CHECKOV_SKIPS = {
    # Image should use digest: the images are this project's own, built and pushed by the release
    # pipeline, which pins them by digest in the overlay (`kustomize edit set image
    # medxai/serve=REGISTRY/medxai/serve@sha256:...`, see docs/deploy.md). A digest written in the
    # repository before the image exists would be made up. Tags are fixed (CKV_K8S_14 is enforced).
    "CKV_K8S_43",
}
K8S_CONFIG_OVERRIDES = {"metrics_address", "disable_token_authorization"}  # see k8s/base/torchserve/config.properties


# --------------------------------------------------------------------------------------------------
# tools


@pytest.fixture(scope="session")
def tools() -> dict[str, Path]:
    default = Path.home() / ".cache" / "medxai" / (
        "deploy-tools-" + hashlib.sha256((ROOT / "requirements-deploy.txt").read_bytes()).hexdigest()[:12]) / "bin"
    bin_dir = Path(os.environ.get("MEDXAI_DEPLOY_TOOLS") or default)
    found = {name: bin_dir / name for name in ("kubectl", "kubernetes-validate", "checkov", "hadolint")}
    missing = [str(p) for p in found.values() if not p.exists()]
    if missing:
        pytest.fail(f"deployment check tools missing ({', '.join(missing)}): run `make deploy-tools`")
    return found


def run(cmd: list, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)


@pytest.fixture(scope="session")
def rendered(tools, tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """target -> (rendered file, objects)."""
    out = tmp_path_factory.mktemp("rendered")
    result = {}
    for name, path in TARGETS.items():
        proc = run([tools["kubectl"], "kustomize", path])
        assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
        file = out / f"{name}.yaml"
        file.write_text(proc.stdout)
        result[name] = (file, [d for d in yaml.safe_load_all(proc.stdout) if d])
    return result


def find(objs: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_spec(obj: dict) -> dict:
    spec = obj["spec"]
    return spec["template"]["spec"] if "template" in spec else spec


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec.get("containers", [])


# --------------------------------------------------------------------------------------------------
# kustomize + kubernetes-validate


def test_kustomize_renders_every_target(rendered):
    kinds = {name: {(o["kind"], o["metadata"]["name"]) for o in objs} for name, (_, objs) in rendered.items()}
    common = {("Deployment", "torchserve"), ("Service", "torchserve"), ("PodDisruptionBudget", "torchserve"),
              ("Deployment", "medxai-ui"), ("Service", "medxai-ui"), ("Ingress", "medxai-ui"),
              ("NetworkPolicy", "default-deny-all"), ("Namespace", "medxai")}
    assert common <= kinds["dev"] and common <= kinds["prod"]
    assert ("StatefulSet", "minio") in kinds["dev"] and ("StatefulSet", "minio") not in kinds["prod"]
    assert ("HorizontalPodAutoscaler", "torchserve") in kinds["prod"]
    assert {k for k, _ in kinds["batch"]} == {"Job"}
    assert {k for k, _ in kinds["kserve"]} == {"InferenceService", "ServingRuntime", "ServiceAccount"}
    for name, (_, objs) in rendered.items():  # every namespaced object lands in medxai, never default
        assert all(o["metadata"].get("namespace") == "medxai" for o in objs if o["kind"] != "Namespace"), name


def test_kustomize_rejects_a_broken_overlay(tools, tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - does-not-exist.yaml\n")
    assert run([tools["kubectl"], "kustomize", tmp_path]).returncode != 0


def kubernetes_validate(tools, files: list[Path]) -> tuple[int, list[str]]:
    proc = run([tools["kubernetes-validate"], "--strict", *files])
    return proc.returncode, (proc.stdout + proc.stderr).splitlines()


def test_kubernetes_validate_strict(tools, rendered):
    rc, lines = kubernetes_validate(tools, [f for f, _ in rendered.values()])
    assert rc == 0, "\n".join(lines)
    objs = [o for _, objs in rendered.values() for o in objs]
    builtin = [o for o in objs if (o["apiVersion"], o["kind"]) not in CRD_KINDS]
    passed = [ln for ln in lines if " passed for resource " in ln]
    unknown = [ln for ln in lines if "Couldn't find schema" in ln]
    assert len(passed) == len(builtin), "\n".join(lines)
    assert len(unknown) == len(objs) - len(builtin)
    assert all(any(f"kind {kind} with api version {api}" in ln for api, kind in CRD_KINDS) for ln in unknown), unknown
    print(f"kubernetes-validate --strict: {len(passed)} objects passed, {len(unknown)} KServe CRD objects unknown")


def test_kubernetes_validate_rejects_broken_manifests(tools, rendered, tmp_path):
    deployment = find(rendered["dev"][1], "Deployment", "torchserve")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = typo["spec"]["template"]["spec"][
        "containers"][0].pop("livenessProbe")  # an unknown field: only --strict notices
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    for i, broken in enumerate((typo, wrong_type)):
        path = tmp_path / f"broken{i}.yaml"
        path.write_text(yaml.safe_dump(broken))
        rc, lines = kubernetes_validate(tools, [path])
        assert rc != 0, "kubernetes-validate accepted a broken manifest:\n" + "\n".join(lines)


def test_kserve_variant(rendered):
    objs = rendered["kserve"][1]
    isvc = find(objs, "InferenceService", "medxai")
    runtime = find(objs, "ServingRuntime", "medxai-kserve")
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert re.fullmatch(r"s3://[a-z0-9.-]+/\S+", model["storageUri"])
    assert isvc["spec"]["predictor"]["serviceAccountName"] == find(objs, "ServiceAccount", "medxai-kserve")[
        "metadata"]["name"]
    assert set(runtime["spec"]["protocolVersions"]) == {"v1", "v2", "grpc-v2"}
    (container,) = runtime["spec"]["containers"]
    assert container["command"] == ["python", "-m", "medxplain_kserve"]
    args = container["args"]  # KServe downloads storageUri to /mnt/models: model-store/
    assert args[args.index("--model-store") + 1] == "/mnt/models/model-store"
    assert "--no-auth" not in args  # the token check stays on (docs/deploy.md)
    token = Path(args[args.index("--token-file") + 1])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    assert str(token.parent) == mounts["token"] and volumes["token"]["secret"]["secretName"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http1": int(args[args.index("--http-port") + 1]), "h2c": int(args[args.index("--grpc-port") + 1])}
    for probe in ("readinessProbe", "livenessProbe"):  # the open health routes (medxplain_kserve/security.py)
        assert container[probe]["httpGet"]["path"] in {"/v2/health/ready", "/v2/health/live"}
        assert container[probe]["httpGet"]["port"] == ports["http1"]
    # The runtime's own image (docker/serve/Dockerfile --target kserve), not TorchServe's: its defaults agree.
    assert image_of(container["image"]) == "kserve"
    image = images()["kserve"]
    default = image["entrypoint"] + image["cmd"]
    assert default[:3] == container["command"] and "--no-auth" not in default
    for flag in ("--model-store", "--http-port", "--grpc-port", "--token-file"):
        assert default[default.index(flag) + 1] == args[args.index(flag) + 1], flag
    assert set(ports.values()) == image["expose"]
    assert f":{ports['http1']}/v2/health/ready" in " ".join(image["healthcheck"])
    assert {"medxplain_kserve", "batch", "medxplain_engine", "medxplain_models", "medxplain_dicom",
            "medxplain_contract"} <= {Path(src).name for src in image["copies"].values()}


# --------------------------------------------------------------------------------------------------
# checkov


def checkov(tools, directory: Path) -> dict:
    """checkov's report; failures of the justified CHECKOV_SKIPS are moved to report["skipped"]."""
    proc = run([tools["checkov"], "--framework", "kubernetes", "--skip-download", "--quiet", "--output", "json",
                "-d", directory], timeout=600)
    assert proc.stdout.strip(), f"checkov printed nothing (rc {proc.returncode}):\n{proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    if "results" not in report:  # checkov's shape when nothing failed in --quiet mode
        report = {"results": {"failed_checks": []}, "summary": report}
    failed = report["results"]["failed_checks"]
    report["failed"] = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in failed
                        if c["check_id"] not in CHECKOV_SKIPS]
    report["skipped"] = [f"{c['check_id']} {c['resource']}" for c in failed if c["check_id"] in CHECKOV_SKIPS]
    report["returncode"] = proc.returncode
    return report


@pytest.fixture(scope="session")
def checkov_reports(tools, rendered, tmp_path_factory) -> dict[str, dict]:
    """One checkov run per environment (it is slow)."""
    reports = {}
    for env, parts in CHECKOV_SETS.items():
        directory = tmp_path_factory.mktemp(f"checkov-{env}")
        for part in parts:
            (directory / f"{part}.yaml").write_text(rendered[part][0].read_text())
        reports[env] = checkov(tools, directory)
    return reports


@pytest.mark.parametrize("env", sorted(CHECKOV_SETS))
def test_checkov(checkov_reports, env):
    report = checkov_reports[env]
    assert not report["failed"], "\n".join(report["failed"])
    assert report["returncode"] == 0 or report["skipped"]  # non-zero only because of the justified skips
    assert report["summary"]["passed"] > 0
    print(f"checkov {env}: passed {report['summary']['passed']}, failed 0, skipped {len(report['skipped'])}:",
          "; ".join(report["skipped"]))


def test_checkov_rejects_an_insecure_pod(tools, tmp_path):
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad", "namespace": "medxai"},
        "spec": {"containers": [{"name": "c", "image": "medxai/serve:0.1.0",
                                 "securityContext": {"privileged": True, "runAsUser": 0}}]}}))
    report = checkov(tools, tmp_path)
    failed = {f.split()[0] for f in report["failed"]}
    assert report["returncode"] != 0 and {"CKV_K8S_16", "CKV_K8S_11", "CKV_K8S_8"} <= failed, failed


# --------------------------------------------------------------------------------------------------
# hadolint


DOCKERFILES = sorted(DOCKER.glob("*/Dockerfile"))


def test_hadolint_every_dockerfile(tools):
    assert {p.parent.name for p in DOCKERFILES} == {"serve", "batch", "ui", "minio"}
    proc = run([tools["hadolint"], *DOCKERFILES])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_a_bad_dockerfile(tools, tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\nCMD python app.py\n")
    proc = run([tools["hadolint"], bad])
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------------------------------
# consistency: what the Dockerfiles, compose and manifests say


# Images built from a named stage of another image's Dockerfile (devstack/images.py STAGES).
STAGE_IMAGES = {"kserve": ("serve", "kserve")}


def dockerfile_instructions(path: Path, target: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final image (the last stage, or ``target``, and the stages it builds on)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, list] = {}
    current: list = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            base, _, alias = rest.partition(" AS ")
            current = list(stages.get(base.strip(), []))  # FROM an earlier stage inherits it
            stages[alias.strip() or f"stage{len(stages)}"] = current
        current.append((word, rest.strip()))
    return stages[target] if target else current


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not JSON exec form: {args}"
    return value


@cache
def images() -> dict[str, dict]:
    """image name -> entrypoint, cmd, expose, env, healthcheck, copied files {image path: repo path}."""
    out = {}
    sources = [(path.parent.name, path, None) for path in DOCKERFILES]
    sources += [(name, DOCKER / folder / "Dockerfile", stage) for name, (folder, stage) in STAGE_IMAGES.items()]
    for name, path, stage in sources:
        info = {"entrypoint": [], "cmd": [], "expose": set(), "env": {}, "healthcheck": [], "copies": {},
                "workdir": None, "user": None}
        for word, rest in dockerfile_instructions(path, stage):
            if word in ("ENTRYPOINT", "CMD"):
                info[word.lower()] = exec_form(rest)
            elif word == "EXPOSE":
                info["expose"] |= {int(p) for p in rest.split()}
            elif word == "ENV":
                info["env"].update(dict(re.findall(r"(\w+)=(\S+)", rest)))
            elif word == "HEALTHCHECK" and "CMD" in rest:
                info["healthcheck"] = exec_form(rest.split("CMD", 1)[1].strip())
            elif word == "WORKDIR":
                info["workdir"] = rest
            elif word == "USER":
                info["user"] = rest
            elif word == "COPY" and "--from=" not in rest:
                parts = [p for p in shlex.split(rest) if not p.startswith("--")]
                *sources, dest = parts
                for src in sources:
                    target = dest + Path(src).name if dest.endswith("/") else dest
                    info["copies"][target] = src
        out[name] = info
    return out


def serve_config_ports(props: dict[str, str] | None = None) -> dict[str, int]:
    props = props or read_properties(DOCKER / "serve" / "config.properties")
    return {"http": int(props["inference_address"].rsplit(":", 1)[1]), "grpc": int(props["grpc_inference_port"]),
            "metrics": int(props["metrics_address"].rsplit(":", 1)[1])}


@cache
def compose() -> dict:
    """compose.yaml with ${VAR:-default} replaced by its default (what .env.example gives)."""
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", (DOCKER / "compose.yaml").read_text())
    return yaml.safe_load(text)


def image_of(ref: str) -> str:
    """medxai/serve:0.1.0 or registry/medxai/serve@sha256:... -> serve."""
    return re.split(r"[:@]", ref.rsplit("/", 1)[-1])[0]


def repo_path_for(image: str, path: str) -> Path | None:
    """The repository file an absolute path inside an image comes from (None: not copied)."""
    for target, src in images()[image]["copies"].items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return ROOT / src / path[len(target):].lstrip("/") if path != target else ROOT / src
    return None


def commands_run() -> list[tuple[str, str, list[str]]]:
    """(where, image, argv) for every container command of the images, compose and the manifests."""
    result = []
    for name, info in images().items():
        result.append((f"docker/{name}/Dockerfile", name, info["entrypoint"] + info["cmd"]))
        if info["healthcheck"]:
            result.append((f"docker/{name}/Dockerfile HEALTHCHECK", name, info["healthcheck"]))
    for svc, spec in compose()["services"].items():
        img = image_of(spec["image"])
        info = images()[img]
        entry = spec.get("entrypoint", info["entrypoint"])
        result.append((f"compose {svc}", img, list(entry) + list(spec.get("command", info["cmd"]))))
    return result


def manifest_commands(objs: list[dict], where: str) -> list[tuple[str, str, list[str]]]:
    result = []
    for obj in objs:
        if obj["kind"] in ("ServingRuntime",):
            specs = obj["spec"]["containers"]
        elif "template" in obj.get("spec", {}):
            specs = containers(obj)
        else:
            continue
        for c in specs:
            img = image_of(c["image"])
            info = images()[img]
            argv = c.get("command", info["entrypoint"]) + c.get("args", [] if "command" in c else info["cmd"])
            result.append((f"{where} {obj['kind']}/{obj['metadata']['name']}/{c['name']}", img, argv))
            for hook in ("preStop", "postStart"):
                cmd = c.get("lifecycle", {}).get(hook, {}).get("exec", {}).get("command")
                if cmd:
                    result.append((f"{where} {obj['metadata']['name']}/{c['name']} {hook}", img, cmd))
    return result


def flags(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


@cache
def help_text(*argv: str) -> str:
    proc = subprocess.run([*argv, "--help"], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{' '.join(argv)} --help failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


VENV_BIN = Path(sys.executable).parent


def command_problems(where: str, image: str, argv: list[str]) -> list[str]:
    """Why an image/manifest command would not run with this project (empty: it would)."""
    if not argv:
        return [f"{where}: no command"]
    prog, args = argv[0], argv[1:]
    if prog == "python" and args[:1] == ["-m"]:
        module, args = args[1], args[2:]
        if not (ROOT / module.replace(".", "/")).with_suffix(".py").exists() and not (
                ROOT / module.replace(".", "/") / "__main__.py").exists():
            return [f"{where}: module {module} is not in the project"]
        sub = [a for a in args[:1] if not a.startswith("-")]
        text = help_text(sys.executable, "-m", module, *sub)
    elif prog == "python" and args and args[0].startswith("/"):
        script = repo_path_for(image, args[0])
        if script is None or not script.is_file():
            return [f"{where}: {args[0]} is not copied into the {image} image from a project file"]
        if args[1:2] == ["-c"]:
            return []
        sub = [a for a in args[1:2] if not a.startswith("-")]
        text = help_text(sys.executable, str(script), *sub)
    elif prog == "python" and args and args[0].endswith(".py"):  # a repository script (docs)
        if not (ROOT / args[0]).is_file():
            return [f"{where}: {args[0]} is not in the project"]
        sub = [a for a in args[1:2] if not a.startswith("-")]
        text = help_text(sys.executable, str(ROOT / args[0]), *sub)
    elif prog == "python" and args[:1] == ["-c"]:
        return []
    elif prog == "torchserve":
        text = help_text(str(VENV_BIN / "torchserve"))
    elif prog == "streamlit":
        app = repo_path_for(image, args[1]) if args[:1] == ["run"] else None
        if app is None or not app.is_file():
            return [f"{where}: streamlit app {args[1:2]} is not a project file copied into the image"]
        text = help_text(str(VENV_BIN / "streamlit"), "run")
        text += "--server.address --server.port"  # config options, accepted by `streamlit run` (not in --help)
    elif prog == "minio" or prog == "curl":
        if prog == "curl":
            return []
        from devstack.services import minio_binary
        text = help_text(str(minio_binary()), "server")
    else:
        return [f"{where}: unknown program {prog}"]
    return [f"{where}: {prog} has no option {f}" for f in sorted(flags(argv) - set(re.findall(r"--[\w.-]+", text)))]


def test_commands_exist_in_the_project(rendered):
    cmds = commands_run()
    for name in ("dev", "prod", "batch", "kserve"):
        cmds += manifest_commands(rendered[name][1], name)
    modules = {(sys.executable, "-m", a[2], *[x for x in a[3:4] if not x.startswith("-")])
               for _, _, a in cmds if a[:2] == ["python", "-m"]}
    with ThreadPoolExecutor(4) as pool:  # each `python -m batch ... --help` imports torch: side by side
        list(pool.map(lambda argv: help_text(*argv), sorted(modules)))
    problems = [p for c in cmds for p in command_problems(*c)]
    assert not problems, "\n".join(problems)
    run_cmds = [argv for _, _, argv in cmds if argv[:3] == ["python", "-m", "batch"]]
    assert run_cmds, "no batch job runs `python -m batch`"


def documented_commands(path: Path) -> list[list[str]]:
    """`python ...` command lines of a Markdown file's code blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.DOTALL)
    text = re.sub(r"\\\n\s*", " ", "\n".join(blocks))
    result = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if "python " in line and not line.startswith(("docker", "kubectl")):
            argv = shlex.split(line[line.index("python "):])
            if argv[1] != "-c":
                result.append(argv)
    return result


def test_documented_commands_exist():
    cmds = documented_commands(ROOT / "docs" / "deploy.md")
    assert len(cmds) >= 5, cmds
    problems = [p for argv in cmds for p in command_problems("docs/deploy.md", "serve", argv)]
    assert not problems, "\n".join(problems)


def test_command_checker_catches_a_missing_command():
    assert command_problems("x", "batch", ["python", "-m", "batch", "run", "--no-such-flag"])
    assert command_problems("x", "serve", ["python", "/opt/medxai/nope.py", "fetch"])
    assert command_problems("x", "batch", ["python", "-m", "batchx", "run"])


def test_dockerfile_copies_exist():
    for name, info in images().items():
        for src in info["copies"].values():
            if src.startswith("build/"):  # the `bundled` target's archives, made by `make archives`
                continue
            assert (ROOT / src).exists(), f"docker/{name}/Dockerfile copies {src}, which is not in the project"
        assert info["user"] and not info["user"].startswith(("0", "root")), f"{name} image runs as root"


def port_problems(config: dict[str, str], objs: list[dict], compose_spec: dict) -> list[str]:
    """Ports, probe paths and paths that must agree between the config, the images, compose and manifests."""
    problems = []

    def check(ok: bool, msg: str):
        if not ok:
            problems.append(msg)

    ports = serve_config_ports(config)
    serve, ui = images()["serve"], images()["ui"]
    check({ports["http"], ports["grpc"]} <= serve["expose"], f"serve EXPOSE {serve['expose']} vs config {ports}")
    check(f":{ports['http']}/ping" in " ".join(serve["healthcheck"]), "serve HEALTHCHECK not on the inference /ping")
    entry = serve["entrypoint"] + serve["cmd"]
    check(entry[entry.index("--model-store") + 1] == config["model_store"], "ENTRYPOINT --model-store != model_store")
    check(repo_path_for("serve", entry[entry.index("--ts-config") + 1]) == DOCKER / "serve" / "config.properties",
          "the serve image does not start with docker/serve/config.properties")
    # compose
    svc = compose_spec["services"]
    published = {int(p.rsplit(":", 1)[1]) for p in svc["serve"]["ports"]}
    check(published == {ports["http"], ports["grpc"]}, f"compose serve ports {published} vs config {ports}")
    check(svc["ui"]["environment"]["MEDXAI_TORCHSERVE_URL"] == f"http://serve:{ports['http']}", "compose UI URL")
    ui_port = int(re.search(r"--server.port=(\d+)", " ".join(ui["entrypoint"])).group(1))
    check(ui_port in ui["expose"], "ui EXPOSE vs --server.port")
    check({int(p.rsplit(":", 1)[1]) for p in svc["ui"]["ports"]} == {ui_port}, "compose UI port")
    minio_port = int(re.search(r"--address :(\d+)", " ".join(images()["minio"]["cmd"])).group(1))
    check(svc["ui"]["environment"]["MEDXAI_S3_ENDPOINT"].endswith(f":{minio_port}"), "compose S3 endpoint port")
    # manifests: TorchServe
    dep = find(objs, "Deployment", "torchserve")
    (ts,) = [c for c in pod_spec(dep)["containers"] if c["name"] == "torchserve"]
    named = {p["name"]: p["containerPort"] for p in ts["ports"]}
    check(named.get("http") == ports["http"] and named.get("grpc") == ports["grpc"], f"containerPorts {named}")
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    check(int(annotations["prometheus.io/port"]) == named.get("metrics"), "prometheus.io/port != metrics port")
    for probe in ("startupProbe", "readinessProbe"):
        get = ts[probe].get("httpGet", {})
        check(get.get("path") == "/ping" and named.get(get.get("port"), get.get("port")) == ports["http"],
              f"torchserve {probe} is not GET /ping on the inference port")
    live = ts["livenessProbe"].get("tcpSocket", {})
    check(named.get(live.get("port"), live.get("port")) == ports["http"], "torchserve livenessProbe port")
    mounts = {m["mountPath"]: m for m in ts["volumeMounts"]}
    check(config["model_store"] in mounts, "model_store is not a volume")
    check(config["workflow_store"] in mounts, "workflow_store is not a volume")
    config_arg = ts["args"][ts["args"].index("--ts-config") + 1]
    check(str(Path(config_arg).parent) in mounts, "--ts-config is not the mounted ConfigMap")
    (fetch,) = pod_spec(dep)["initContainers"]
    check(fetch["args"][fetch["args"].index("--dest") + 1] == config["model_store"], "init container --dest")
    svc_ts = find(objs, "Service", "torchserve")
    check({p["port"] for p in svc_ts["spec"]["ports"]} == {ports["http"], ports["grpc"]}, "Service torchserve ports")
    check(all(p["targetPort"] in named for p in svc_ts["spec"]["ports"]), "Service targetPort names")
    np_ports = {p["port"] for r in find(objs, "NetworkPolicy", "torchserve-ingress")["spec"]["ingress"]
                for p in r["ports"]}
    check(np_ports == set(named.values()), f"NetworkPolicy torchserve ports {np_ports} vs {named}")
    for ing in ("torchserve-rest", "torchserve-grpc"):
        ingress = find(objs, "Ingress", ing)
        size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
        check(int(size.rstrip("m")) * 2**20 == int(config["max_request_size"]), f"{ing} body size vs max_request_size")
        backends = {p["backend"]["service"]["port"]["name"] for r in ingress["spec"]["rules"]
                    for p in r["http"]["paths"]}
        check(backends <= {p["name"] for p in svc_ts["spec"]["ports"]}, f"{ing} backend ports")
    # manifests: UI
    uid = find(objs, "Deployment", "medxai-ui")
    (uc,) = pod_spec(uid)["containers"]
    check({p["containerPort"] for p in uc["ports"]} == {ui_port}, "UI containerPort")
    health = re.search(r"http://127.0.0.1:(\d+)(/\S+?)'", " ".join(ui["healthcheck"]))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check(uc[probe]["httpGet"]["path"] == health.group(2), f"UI {probe} path vs the image's HEALTHCHECK")
    env = {e["name"]: e.get("value") for e in uc["env"]}
    check(env.get("MEDXAI_TORCHSERVE_URL") == f"http://torchserve:{ports['http']}", "UI MEDXAI_TORCHSERVE_URL")
    check({p["port"] for p in find(objs, "Service", "medxai-ui")["spec"]["ports"]} == {ui_port}, "Service UI port")
    check({p["port"] for r in find(objs, "NetworkPolicy", "ui-ingress")["spec"]["ingress"] for p in r["ports"]}
          == {ui_port}, "NetworkPolicy UI port")
    return problems


def test_ports_probes_and_paths_agree(rendered):
    config = read_properties(DOCKER / "serve" / "config.properties")
    k8s_config = read_properties(K8S / "base" / "torchserve" / "config.properties")
    for name in ("dev", "prod"):
        problems = port_problems(config, rendered[name][1], compose())
        assert not problems, f"{name}:\n" + "\n".join(problems)
    # The Kubernetes copy of config.properties differs from the image's in the documented keys only.
    differ = {k for k in config.keys() | k8s_config.keys() if config.get(k) != k8s_config.get(k)}
    assert differ == K8S_CONFIG_OVERRIDES, differ
    assert serve_config_ports(k8s_config) == serve_config_ports(config)
    # Only inference and metrics leave the pod; management stays on loopback everywhere.
    for props in (config, k8s_config):
        assert "127.0.0.1" in props["management_address"] and props["grpc_management_address"] == "127.0.0.1"
    # dev: MinIO's port matches the endpoint every client is given
    dev = rendered["dev"][1]
    endpoint = find(dev, "ConfigMap", "medxai-storage")["data"]["MEDXAI_S3_ENDPOINT"]
    sts = find(dev, "StatefulSet", "minio")
    port = pod_spec(sts)["containers"][0]["ports"][0]["containerPort"]
    assert endpoint == f"http://minio:{port}" and "--address" in pod_spec(sts)["containers"][0]["args"]
    assert {p["port"] for p in find(dev, "Service", "minio")["spec"]["ports"]} == {port}


def test_port_checker_catches_a_mismatch(rendered):
    config = read_properties(DOCKER / "serve" / "config.properties")
    objs = json.loads(json.dumps(rendered["dev"][1]))
    dep = find(objs, "Deployment", "torchserve")
    pod_spec(dep)["containers"][0]["ports"][0]["containerPort"] = 8081
    pod_spec(dep)["containers"][0]["readinessProbe"]["httpGet"]["path"] = "/health"
    problems = port_problems(config, objs, compose())
    assert any("containerPorts" in p for p in problems) and any("readinessProbe" in p for p in problems), problems
    assert port_problems({**config, "grpc_inference_port": "7072"}, rendered["dev"][1], compose())


# --------------------------------------------------------------------------------------------------
# consistency: environment variables, secrets as files, versions


def project_env_names() -> set[str]:
    """MEDXAI_* names the project's code reads (settings modules and CLIs)."""
    names = set()
    for path in [*ROOT.glob("medxplain_client/*.py"), *ROOT.glob("medxplain_contract/*.py"), *ROOT.glob("ui/*.py"),
                 *ROOT.glob("batch/**/*.py"),
                 DOCKER / "archives.py"]:
        names |= set(re.findall(r"\bMEDXAI_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    return names


def container_env(c: dict, objs: list[dict]) -> dict[str, str]:
    env = {}
    for ref in c.get("envFrom", []):
        cm = ref.get("configMapRef", {}).get("name")
        hits = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm]
        env.update(hits[0]["data"] if hits else {})
    env.update({e["name"]: e.get("value", "") for e in c.get("env", [])})
    return env


def env_problems(objs: list[dict], storage: list[dict]) -> list[str]:
    """MEDXAI_* variables of every container: known to the code, secrets as files that are mounted."""
    problems, known = [], project_env_names() | {"MEDXAI_MODEL_SOURCE"}  # the last one: $(...) in args
    from medxplain_contract.storage import S3Config

    for obj in objs:
        if "template" not in obj.get("spec", {}):
            continue
        volumes = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
        for c in containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            env = container_env(c, objs + storage)
            for name in sorted(n for n in env if n.startswith("MEDXAI_") and n not in known):
                problems.append(f"{where}: {name} is not read by the project")
            for name in ("MEDXAI_S3_ACCESS_KEY", "MEDXAI_S3_SECRET_KEY"):
                if name in env:
                    problems.append(f"{where}: {name} as a plain variable (use {name}_FILE)")
            files = {n: v for n, v in env.items() if n.startswith("MEDXAI_S3_") and n.endswith("_FILE")}
            if not files:
                continue
            for name, value in files.items():
                mount = [m for m in c.get("volumeMounts", []) if value.startswith(m["mountPath"] + "/")]
                secret = volumes.get(mount[0]["name"], {}).get("secret") if mount else None
                if not secret:
                    problems.append(f"{where}: {name}={value} is not in a mounted Secret")
            # The settings load as the code reads them (files replaced by stand-ins).
            fake = {n: v for n, v in env.items() if not n.endswith("_FILE")}
            fake.update({n[:-5]: "stand-in" for n in files})
            try:
                S3Config.from_env(fake)
            except ValueError as err:
                problems.append(f"{where}: storage settings do not load: {err}")
    return problems


def test_environment_variables_agree(rendered):
    dev, prod = rendered["dev"][1], rendered["prod"][1]
    for name, objs, storage in (("dev", dev, []), ("prod", prod, []), ("batch", rendered["batch"][1], dev)):
        problems = env_problems(objs, storage)
        assert not problems, f"{name}:\n" + "\n".join(problems)
    # The UI's settings load from what the manifest and compose give it.
    from ui.settings import UISettings

    (uc,) = pod_spec(find(dev, "Deployment", "medxai-ui"))["containers"]
    assert UISettings.from_env(container_env(uc, dev)).torchserve_url == "http://torchserve:8080"
    services = compose()["services"]
    ui_env = services["ui"]["environment"]
    assert UISettings.from_env(ui_env).torchserve_key_file == ui_env["MEDXAI_TORCHSERVE_KEY_FILE"]
    # compose: the key file the UI reads is in the volume TorchServe writes key_file.json into
    # (TorchServe's working directory = the serve image's WORKDIR).
    key_dir = str(Path(ui_env["MEDXAI_TORCHSERVE_KEY_FILE"]).parent)
    (vol,) = [v.split(":")[0] for v in services["ui"]["volumes"] if v.split(":")[1] == key_dir]
    assert f"{vol}:{images()['serve']['workdir']}" in services["serve"]["volumes"]
    # compose: MEDXAI_* names known, credentials only as compose secrets (files under /run/secrets/).
    known = project_env_names()
    declared = set(compose()["secrets"])
    for svc, spec in services.items():
        env = spec.get("environment", {})
        assert {n for n in env if n.startswith("MEDXAI_")} <= known, svc
        for name, value in env.items():
            if name.endswith("_FILE") and name.startswith(("MEDXAI_S3_", "MINIO_ROOT_")):
                secret = value.removeprefix("/run/secrets/")
                assert secret in spec.get("secrets", []) and secret in declared, f"{svc}: {name}={value}"


def test_env_checker_catches_plain_and_unknown_variables(rendered):
    objs = json.loads(json.dumps(rendered["dev"][1]))
    (uc,) = pod_spec(find(objs, "Deployment", "medxai-ui"))["containers"]
    uc["env"] += [{"name": "MEDXAI_S3_SECRET_KEY", "value": "x"}, {"name": "MEDXAI_TORCHSERVE_TOKEN", "value": "y"}]
    uc["volumeMounts"] = [m for m in uc["volumeMounts"] if m["name"] != "s3-credentials"]
    problems = env_problems(objs, [])
    assert any("MEDXAI_TORCHSERVE_TOKEN" in p for p in problems)
    assert any("plain variable" in p for p in problems)
    assert any("not in a mounted Secret" in p for p in problems)


def test_batch_job_is_indexed_and_sharded_like_its_arguments(rendered):
    (job,) = rendered["batch"][1]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["backoffLimitPerIndex"] >= 1
    assert pod_spec(job)["restartPolicy"] == "Never"  # required by backoffLimitPerIndex
    (batch,) = pod_spec(job)["containers"]
    argv = batch["command"] + batch["args"]
    assert int(argv[argv.index("--shards") + 1]) == spec["completions"]
    (fetch,) = pod_spec(job)["initContainers"]
    archive = argv[argv.index("--archive") + 1]
    model = argv[argv.index("--model") + 1]
    assert archive == f"{fetch['args'][fetch['args'].index('--dest') + 1]}/{model}.mar"
    assert fetch["args"][fetch["args"].index("--models") + 1] == model


def test_versions_and_secrets(rendered):
    makefile = (ROOT / "Makefile").read_text()
    minio_dockerfile = (DOCKER / "minio" / "Dockerfile").read_text()
    make_version = re.search(r"^MINIO_VERSION := (\S+)", makefile, re.MULTILINE).group(1)
    assert make_version == MINIO_RELEASE
    assert f"ARG MINIO_VERSION={make_version}" in minio_dockerfile
    # No credentials in images: no ENV/ARG named like a secret with a value; .env is ignored by git.
    for path in DOCKERFILES:
        for word, rest in dockerfile_instructions(path):
            if word in ("ENV", "ARG"):
                assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)\w*=\S", rest, re.IGNORECASE), f"{path}: {rest}"
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], check=False, cwd=ROOT).returncode == 0
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["MINIO_ROOT_USER"] == "" and example["MINIO_ROOT_PASSWORD"] == ""
    used = set(re.findall(r"\$\{(\w+)", (DOCKER / "compose.yaml").read_text()))
    used |= {s["environment"] for s in compose()["secrets"].values()}
    assert used <= set(example), used - set(example)
    # No Secret objects in the manifests: they are created out of band (docs/deploy.md).
    assert not [o for _, objs in rendered.values() for o in objs if o["kind"] == "Secret"]


# --------------------------------------------------------------------------------------------------
# the serve image's health check, against a real TorchServe with token authorization on


def test_serve_healthcheck_with_token_auth(tmp_path):
    """docker/serve/healthcheck.py (the image's HEALTHCHECK) sends the key, renews it before it expires."""
    from devstack.services import TorchServeServer

    (tmp_path / "store").mkdir()
    ts = TorchServeServer(workdir=tmp_path / "ts", model_store=tmp_path / "store", models={},
                          extra_config={"token_expiration_min": "5"})  # no models: starts in seconds
    check = [sys.executable, str(DOCKER / "serve" / "healthcheck.py"), "--url", f"{ts.inference_url}/ping",
             "--management-url", ts.management_url, "--key-file", str(ts.key_file)]
    assert run([*check, "--renew-before", "0"]).returncode == 1  # not running yet
    ts.start(timeout=180)
    try:
        before = json.loads(ts.key_file.read_text())["inference"]["key"]
        proc = run([*check, "--renew-before", "0"])
        assert proc.returncode == 0 and "/ping -> 200" in proc.stdout, proc.stdout + proc.stderr
        assert json.loads(ts.key_file.read_text())["inference"]["key"] == before
        proc = run([*check, "--renew-before", "600"])  # expires in < 10 min: renewed, file rewritten
        assert proc.returncode == 0 and "renewal -> 200" in proc.stdout, proc.stdout + proc.stderr
        assert json.loads(ts.key_file.read_text())["inference"]["key"] != before
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps({"inference": {"key": "not-the-key"}}))
        assert run([*check[:-2], "--key-file", wrong, "--renew-before", "0"]).returncode == 1
    finally:
        ts.stop()


def test_compose_stack():
    services = compose()["services"]
    order = ["minio", "storage-init", "archive-upload", "model-fetch", "serve", "ui"]
    for before, after in itertools.pairwise(order):
        assert before in services[after]["depends_on"], (before, after)
    assert services["ui"]["depends_on"]["serve"]["condition"] == "service_healthy"
    assert services["batch"]["profiles"] == ["batch"]  # one-shot, started on demand
    for name, spec in services.items():
        assert spec.get("read_only") is True and spec.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in spec.get("security_opt", []), name
        assert "user" not in spec and image_of(spec["image"]) in images(), name  # the image's non-root user
        assert all(p.startswith("127.0.0.1:") for p in spec.get("ports", [])), f"{name} published beyond loopback"
        assert not [k for k in spec.get("environment", {}) if re.search(r"(SECRET|PASSWORD)(?!.*_FILE)", k)], name


# --------------------------------------------------------------------------------------------------
# docker/archives.py (init containers, compose one-shots) against a real MinIO


def test_archives_upload_and_fetch(minio_server, tmp_path):
    from medxplain_contract.integrity import sha256_file, write_digest

    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "access-key").write_text(minio_server.access_key + "\n")
    (keys / "secret-key").write_text(minio_server.secret_key)
    (keys / "archive-key").write_text("archive-signing-key-" * 2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDXAI_S3_ENDPOINT": f"http://{minio_server.endpoint}",
           "MEDXAI_S3_ACCESS_KEY_FILE": str(keys / "access-key"),  # as the pods get them: files
           "MEDXAI_S3_SECRET_KEY_FILE": str(keys / "secret-key"),
           "MEDXAI_ARCHIVE_KEY_FILE": str(keys / "archive-key")}
    tool = [sys.executable, DOCKER / "archives.py"]
    source = tmp_path / "store"
    source.mkdir()
    (source / "ddsm.mar").write_bytes(b"ddsm archive " * 1000)
    (source / "ddsm.mar.json").write_text('{"digest": "x"}')
    (source / "adni.mar").write_bytes(b"adni archive " * 1000)
    for name in ("ddsm", "adni"):
        write_digest(source / f"{name}.mar")  # what `python -m model_store archive` publishes (unsigned here)
    release = "s3://deploy-test-models/releases/1.0"

    def tool_run(*args, environ=None):
        return run([*tool, *args], env=environ or env)

    assert tool_run("buckets", "deploy-test-results").returncode == 0
    proc = tool_run("upload", "--source", source, "--dest", release, "--config", DOCKER / "serve" / "config.properties")
    assert proc.returncode == 0, proc.stderr
    client = minio_server.client()
    assert client.bucket_exists("deploy-test-results")
    names = {o.object_name for o in client.list_objects("deploy-test-models", prefix="releases/1.0/", recursive=True)}
    store = "releases/1.0/model-store/"
    assert names == {"releases/1.0/config/config.properties", *(store + n for n in (
        "ddsm.mar", "ddsm.mar.json", "ddsm.mar.sha256", "ddsm.mar.sha256.sig",
        "adni.mar", "adni.mar.sha256", "adni.mar.sha256.sig"))}  # KServe layout + digests signed on upload
    proc = tool_run("fetch", "--source", release, "--dest", tmp_path / "a", "--models", "ddsm")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "ddsm.mar", "ddsm.mar.json", "ddsm.mar.sha256", "ddsm.mar.sha256.sig"]
    assert (tmp_path / "a" / "ddsm.mar").read_bytes() == (source / "ddsm.mar").read_bytes()
    assert tool_run("verify", "--store", tmp_path / "a").returncode == 0  # what the serve entrypoint checks
    # a model the release lacks, and an archive whose bytes no longer match its recorded sha256
    assert tool_run("fetch", "--source", release, "--dest", tmp_path / "b", "--models", "mri").returncode != 0
    stat = client.stat_object("deploy-test-models", store + "adni.mar")
    tampered = tmp_path / "tampered.mar"
    tampered.write_bytes(b"not the archive")
    client.fput_object("deploy-test-models", store + "adni.mar", str(tampered),
                       metadata={"sha256": stat.metadata["x-amz-meta-sha256"]})
    proc = tool_run("fetch", "--source", release, "--dest", tmp_path / "c")
    assert proc.returncode != 0 and "sha256 mismatch" in proc.stderr, proc.stderr
    assert not (tmp_path / "c" / "adni.mar").exists()
    # whoever can write the bucket replaces archive, digest file and metadata consistently: the
    # signature (key held apart from the storage credentials) still refuses it
    forged = tmp_path / "forged"
    forged.mkdir()
    shutil.copyfile(tampered, forged / "adni.mar")
    write_digest(forged / "adni.mar")
    for name in ("adni.mar", "adni.mar.sha256"):
        client.fput_object("deploy-test-models", store + name, str(forged / name),
                           metadata={"sha256": sha256_file(forged / name)})
    proc = tool_run("fetch", "--source", release, "--dest", tmp_path / "e")
    assert proc.returncode != 0 and "signature does not match" in proc.stderr, proc.stderr
    assert not list((tmp_path / "e").glob("*.mar")) and proc.stderr.strip().count("\n") == 0
    # no key: refused unless a separately stored digest list is given, which then decides
    unsigned = {k: v for k, v in env.items() if k != "MEDXAI_ARCHIVE_KEY_FILE"}
    proc = tool_run("fetch", "--source", release, "--dest", tmp_path / "f", environ=unsigned)
    assert proc.returncode != 0 and "unverified" in proc.stderr
    digests = tmp_path / "digests.txt"
    digests.write_text((source / "ddsm.mar.sha256").read_text() + (source / "adni.mar.sha256").read_text())
    proc = tool_run("fetch", "--source", release, "--dest", tmp_path / "g", "--digests", digests, environ=unsigned)
    assert proc.returncode != 0 and "adni.mar" in proc.stderr and "does not match" in proc.stderr, proc.stderr
    proc = tool_run("fetch", "--source", release, "--dest", tmp_path / "g", "--digests", digests, "--models", "ddsm",
                    environ=unsigned)
    assert proc.returncode == 0 and (tmp_path / "g" / "ddsm.mar").is_file(), proc.stderr
    # no settings: a message for people, not a traceback
    proc = run([*tool, "fetch", "--source", release, "--dest", tmp_path / "d"],
               env={k: v for k, v in env.items() if not k.startswith("MEDXAI_S3_")})
    assert proc.returncode != 0 and "MEDXAI_S3_ENDPOINT" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# the GPU variant: prod overlay, images' CUDA build argument, archives' deviceType and docs agree

TORCH_INDEX = "https://download.pytorch.org/whl/${CUDA}"


def gpu_problems(objs: list[dict]) -> list[str]:
    """What a GPU serving Deployment needs: one nvidia.com/gpu requested = limited, the GPU nodes' selector
    and taint toleration, the CUDA image and the GPU model release (archives with deviceType: gpu)."""
    problems = []
    dep = find(objs, "Deployment", "torchserve")
    spec = pod_spec(dep)
    (ts,) = [c for c in spec["containers"] if c["name"] == "torchserve"]
    requests, limits = ts["resources"].get("requests", {}), ts["resources"].get("limits", {})
    if not (str(requests.get("nvidia.com/gpu")) == str(limits.get("nvidia.com/gpu")) == "1"):
        problems.append("torchserve: nvidia.com/gpu must be requested and limited at 1")
    if spec.get("nodeSelector", {}).get("nvidia.com/gpu.present") != "true":
        problems.append("torchserve: no GPU node selector")
    if not any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in spec.get("tolerations", [])):
        problems.append("torchserve: no toleration for the GPU nodes' taint")
    if not all(c["image"].split(":")[-1].endswith("-gpu") for c in containers(dep) if "medxai/serve" in c["image"]):
        problems.append("torchserve: not the CUDA (-gpu) image")
    models = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("torchserve-models")]
    if len(models) != 1 or not models[0]["data"]["MEDXAI_MODEL_SOURCE"].endswith("-gpu"):
        problems.append("torchserve-models: not the GPU release (archives with deviceType: gpu)")
    return problems


def test_gpu_variant_agrees(rendered):
    assert not gpu_problems(rendered["prod"][1]), gpu_problems(rendered["prod"][1])
    dev = find(rendered["dev"][1], "Deployment", "torchserve")
    assert all("nvidia.com/gpu" not in json.dumps(c.get("resources", {})) for c in containers(dev))  # dev: CPU
    # The images: a CUDA build argument (cpu by default) choosing the wheels of the pinned torch/torchvision.
    pins = {line.split("==")[0]: line for line in (ROOT / "requirements" / "engine.txt").read_text().split()
            if line.startswith(("torch==", "torchvision=="))}
    assert pins == {"torch": "torch==2.14.1", "torchvision": "torchvision==0.29.1"}
    for name in ("serve", "batch"):
        text = (DOCKER / name / "Dockerfile").read_text()
        assert re.search(r"^ARG CUDA=cpu$", text, re.MULTILINE) and f"ARG TORCH_INDEX_URL={TORCH_INDEX}" in text, name
        # docker/wheelhouse.sh fetches the torch pins from that index only (tests/test_wheelhouse.py)
        assert "/tmp/torch.txt \"${TORCH_INDEX_URL}\"" in text and "grep -E '^(torch|torchvision)=='" in text, name
    # The shipped archives compute on the CPU; the GPU release is built with --device-type gpu.
    for kind in ("ddsm", "adni"):
        config = yaml.safe_load((ROOT / "model_store" / "configs" / f"{kind}.yaml").read_text())
        assert config["deviceType"] == "cpu" and config["handler"]["amp"] is False
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for phrase in ("--build-arg CUDA=cu128", "deviceType: gpu", "deviceIds: [0]", "--device-type gpu", "--device cuda",
                   "releases/1.0-gpu", "nvidia.com/gpu: 1", "make bench-gpu"):
        assert phrase in docs, phrase
    help_text = run([sys.executable, "-m", "model_store", "archive", "--help"]).stdout
    assert "--device-type" in help_text


def test_gpu_checker_catches_a_cpu_deployment(rendered):
    objs = json.loads(json.dumps(rendered["prod"][1]))
    spec = pod_spec(find(objs, "Deployment", "torchserve"))
    (ts,) = [c for c in spec["containers"] if c["name"] == "torchserve"]
    del ts["resources"]["limits"]["nvidia.com/gpu"]
    spec["tolerations"] = []
    problems = gpu_problems(objs)
    assert any("requested and limited" in p for p in problems) and any("toleration" in p for p in problems)
    assert gpu_problems(rendered["dev"][1])  # the dev overlay is not a GPU deployment
