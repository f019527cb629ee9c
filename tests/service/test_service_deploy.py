"""The Docker and Kubernetes files (they cannot be built here): valid YAML, real settings, real probe paths.

    .venv/bin/python -m pytest tests/service/test_service_deploy.py -q
"""

from __future__ import annotations

import dataclasses
import re

import yaml

from conftest import ROOT
from service.settings import Settings, env_name

KNOWN = {env_name(f.name) for f in dataclasses.fields(Settings)}
FILES = ["docker/Dockerfile.cpu", "docker/Dockerfile.gpu", "deploy/compose.yaml", "deploy/k8s.yaml"]


def test_every_qbridge_variable_is_a_setting():
    for name in FILES:
        used = set(re.findall(r"\bQBRIDGE_[A-Z0-9_]+", (ROOT / name).read_text()))
        assert used and used <= KNOWN, (name, used - KNOWN)


def test_compose_and_kubernetes_manifests():
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    assert {"qbridge", "qbridge-gpu"} <= set(compose["services"])
    for service in compose["services"].values():
        assert (ROOT / "deploy" / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    docs = list(yaml.safe_load_all((ROOT / "deploy/k8s.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert pod["terminationGracePeriodSeconds"] > float(env["QBRIDGE_DRAIN_DELAY_S"]) + float(env["QBRIDGE_GRACE_S"])
    assert kinds["Service"]["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
