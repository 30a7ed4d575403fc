"""docker-compose.yml, the Dockerfile and deploy/k8s, checked offline (no Docker engine, no cluster)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from folio.stack import ROOT

COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"


def _parse_service_command(cmd: list[str]) -> None:
    """Parse a container's `python -m services.X ...` command with the service's own flag parser."""
    assert cmd[:2] == ["python", "-m"], cmd
    module, args = cmd[2], [re.sub(r"\$\((\w+)\)", "x", a) for a in cmd[3:]]
    if module == "services.engine":
        from services.engine.server import parse_config
    elif module == "services.router":
        from services.router.server import parse_config
    elif module == "services.tokenizer":
        from services.tokenizer.server import parse_config
    elif module == "folio":
        assert args == ["prepare-model"]
        return
    else:
        raise AssertionError(f"unknown module {module}")
    parse_config(args)  # argparse exits (SystemExit) on an unknown flag or a bad value


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose binary not installed (apt-get install --no-install-recommends docker-compose)")
def test_docker_compose_config_validates_offline():
    r = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_compose_services_and_commands():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"redis", "tokenizer", "router", "engine-0", "engine-1", "otel-collector"} <= set(services)
    for name in ("engine-0", "engine-1"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    for name, svc in services.items():
        if isinstance(svc.get("command"), list) and svc["command"][:2] == ["python", "-m"]:
            _parse_service_command(svc["command"])
    assert services["router"]["ports"] == ["127.0.0.1:50051:50051", "127.0.0.1:8000:8000"]
    targets = set(re.findall(r"^FROM .* AS (\w+)$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    for svc in services.values():
        if "build" in svc:
            assert svc["build"]["target"] in targets
            assert svc["build"]["target"] in targets


def test_k8s_manifests_probe_drain_and_parse():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [d for f in kust["resources"] for d in yaml.safe_load_all((K8S / f).read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for name in ("router", "tokenizer", "engine"):
        assert ("Deployment", name) in kinds and ("Service", name) in kinds
    for d in docs:
        if d["kind"] != "Deployment" or d["metadata"]["name"] not in ("router", "tokenizer", "engine"):
            continue
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        port = c["ports"][0]["containerPort"]
        assert c["readinessProbe"]["grpc"]["port"] == port and c["livenessProbe"]["grpc"]["port"] == port
        assert spec["terminationGracePeriodSeconds"] >= 20
        grace = float(c["command"][c["command"].index("--grace-s") + 1])
        assert grace < spec["terminationGracePeriodSeconds"], "the drain must finish before SIGKILL"
        _parse_service_command(c["command"])
        svc = next(s for s in docs if s["kind"] == "Service" and s["metadata"]["name"] == d["metadata"]["name"])
        assert svc["spec"]["ports"][0]["appProtocol"] == "grpc"
    engine = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "engine")
    assert engine["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
