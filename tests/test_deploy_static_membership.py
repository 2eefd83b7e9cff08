"""deploy/kubernetes/static-membership: the StatefulSet that gives each worker its pod name
as FILESERVER_GROUP_INSTANCE_ID (KIP-345), parsed with PyYAML and checked against the
base's Deployment and the code; rendered with `kubectl kustomize` when kubectl is here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from fileserver.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
COMPONENT = K8S / "static-membership"
ID = "FILESERVER_GROUP_INSTANCE_ID"


def load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


def without_id(template: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(template)
    (container,) = out["spec"]["containers"]
    container["env"] = [e for e in container["env"] if e["name"] != ID]
    return out


def component_patches() -> dict[str, Any]:
    """The component's patches by target kind (each parsed from its YAML text)."""
    component = load(COMPONENT / "kustomization.yaml")
    return {p["target"]["kind"]: yaml.safe_load(p["patch"]) for p in component["patches"]}


def test_the_statefulset_is_the_deployment_plus_the_pod_name_as_instance_id() -> None:
    deployment = load(K8S / "deployment.yaml")
    sts = load(COMPONENT / "statefulset.yaml")
    assert sts["kind"] == "StatefulSet" and sts["apiVersion"] == "apps/v1"
    # the same name: the PDB, the ScaledObject and the metrics Service find it as before
    assert sts["metadata"] == deployment["metadata"]
    assert sts["spec"]["selector"] == deployment["spec"]["selector"]
    assert without_id(sts["spec"]["template"]) == deployment["spec"]["template"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    (entry,) = [e for e in container["env"] if e["name"] == ID]
    assert entry == {"name": ID, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert "replicas" not in sts["spec"]  # KEDA's HPA owns it
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    service = load(K8S / "service.yaml")
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"


def test_the_component_replaces_the_deployment_and_retargets_keda() -> None:
    component = load(COMPONENT / "kustomization.yaml")
    assert component["kind"] == "Component"
    assert component["resources"] == ["statefulset.yaml"]
    patches = component_patches()
    deployment = load(K8S / "deployment.yaml")
    assert patches["Deployment"]["$patch"] == "delete"
    assert patches["Deployment"]["metadata"]["name"] == deployment["metadata"]["name"]
    (keda,) = patches["ScaledObject"]
    assert keda == {"op": "replace", "path": "/spec/scaleTargetRef/kind", "value": "StatefulSet"}
    # the base offers the switch
    assert "#   - static-membership" in (K8S / "kustomization.yaml").read_text()


def test_the_session_timeout_covers_a_pod_restart_and_every_setting_is_real() -> None:
    (op,) = component_patches()["ConfigMap"]
    assert op["path"] == "/data/FILESERVER_SESSION_TIMEOUT_S"
    timeout = float(op["value"])
    assert timeout > Settings().session_timeout_s  # a container restart + preflight
    data = load(K8S / "configmap.yaml")["data"]
    secret = load(K8S / "secret.example.yaml")["stringData"]
    pod = "fileserver-worker-11"  # what the downward API gives the twelfth pod
    s = Settings.from_env({**data, **secret, "FILESERVER_SESSION_TIMEOUT_S": op["value"], ID: pod})
    assert (s.group_instance_id, s.session_timeout_s) == (pod, timeout)


def test_the_kubernetes_doc_describes_the_component() -> None:
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    for phrase in (
        "static-membership/kustomization.yaml",
        "static-membership/statefulset.yaml",
        "fieldPath: metadata.name",
        ID,
    ):
        assert phrase in doc, phrase
    assert "does not exist yet" not in doc
