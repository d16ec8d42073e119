"""The container image and Kubernetes manifests (deploy/), checked without a cluster, network or container
engine: every manifest against Kubernetes' schemas (kubernetes-validate's bundled copies, strict: no unknown
field), then the design docs/deploy.md promises: non-root, read-only root with writable emptyDirs,
probes on the READY-worker check, limits that fit the measured memory, only the app's port exposed."""

from __future__ import annotations

import re
import shlex
import socket
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from handlers import server
from handlers.settings import ROOT, config_ports, read_properties

K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
KUBERNETES = "1.30.0"  # the oldest with ContainerResource HPA metrics stable
WORKER_RSS_MB, OFF_HEAP_MB = 850, 150  # the highest worker RSS measured; the JVM beyond its heap


def manifests() -> dict[str, dict]:
    docs = [d for f in sorted(K8S.glob("*.yaml")) if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text(encoding="utf-8")) if d]
    return {d["kind"]: d for d in docs}


def mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(Mi|Gi)", quantity).groups()
    return float(number) * (1024 if unit == "Gi" else 1)


@pytest.fixture(scope="module")
def m() -> dict[str, dict]:
    return manifests()


@pytest.fixture(scope="module")
def pod(m) -> dict:
    return m["Deployment"]["spec"]["template"]["spec"]


def containers(pod: dict) -> dict[str, dict]:
    return {c["name"]: c for c in pod["containers"]}


def test_manifests_valid_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("validation tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert sorted(kustomization["resources"]) == sorted(f.name for f in K8S.glob("*.yaml")
                                                        if f.name != "kustomization.yaml")
    found = manifests()
    assert set(found) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    for doc in found.values():
        assert kubernetes_validate.validate(doc, KUBERNETES, strict=True) == "1.30"
    broken = {**found["Service"], "spec": {**found["Service"]["spec"], "portz": []}}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict mode really rejects unknown fields
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_non_root_read_only_root(pod):
    user = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.M)[-1]
    uid = int(user.split(":")[0])  # numeric, or the kubelet cannot verify runAsNonRoot
    assert uid != 0 and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["automountServiceAccountToken"] is False
    writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert any(v["mountPath"] == "/tmp" and v["name"] in writable for v in c["volumeMounts"])


def test_probes_use_the_ready_worker_check(pod):
    ts = containers(pod)["torchserve"]
    workdir = ts["command"][ts["command"].index("--workdir") + 1]
    assert any(v["mountPath"] == workdir and not v.get("readOnly") for v in ts["volumeMounts"])
    for probe in ("startupProbe", "readinessProbe"):
        assert ts[probe]["exec"]["command"] == ["python", "-m", "handlers.server", "--workdir", workdir, "ready"]
    assert ts["livenessProbe"]["exec"]["command"][-1] == "live"  # /ping: never restart over dead workers
    startup = ts["startupProbe"]["periodSeconds"] * ts["startupProbe"]["failureThreshold"]
    assert startup > float(ts["command"][ts["command"].index("--timeout") + 1])  # serve fails first, with logs
    assert pod["terminationGracePeriodSeconds"] > 25  # serve's stop: 20 s grace + 5 s kill wait
    for c in pod["containers"]:
        assert {"readinessProbe", "livenessProbe"} <= set(c)


def test_probe_commands_exist():
    """The probe and image commands are real subcommands (no server here: they fail, quickly)."""
    def run(*argv: str) -> int:
        return server.main(server.get_args_parser().parse_args(["--workdir", "/nonexistent-landmark-workdir", *argv]))

    for cmd in ("ready", "live"):
        assert run(cmd) == 1
    assert run("serve", "--store", "/nonexistent-landmark-store") == 1  # no archive: fails before starting anything


def test_resources_fit_the_measured_memory(pod):
    props = read_properties(ROOT / "serve_config" / "config.properties")
    workers = int(props["default_workers_per_model"])
    heap = int(re.search(r"-Xmx(\d+)m", DOCKERFILE.read_text(encoding="utf-8")).group(1))
    for c in pod["containers"]:
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]) & set(c["resources"]["limits"])
    ts = containers(pod)["torchserve"]["resources"]
    assert float(ts["requests"]["cpu"]) == workers  # one single-threaded worker per requested CPU
    assert mib(ts["limits"]["memory"]) * 1.048576 >= workers * WORKER_RSS_MB + heap + OFF_HEAP_MB  # MiB vs MB
    assert mib(ts["requests"]["memory"]) <= mib(ts["limits"]["memory"])


def test_only_the_app_port_is_exposed(m, pod):
    app = containers(pod)["app"]
    ports = {p["name"]: p["containerPort"] for p in app["ports"]}
    assert "ports" not in containers(pod)["torchserve"]
    service = m["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert [p["targetPort"] for p in service["ports"]] == ["http"] and "http" in ports
    assert str(ports["http"]) == app["command"][app["command"].index("--port") + 1]
    labels = m["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (service["selector"], m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                     m["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert m["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_app_talks_to_torchserve_over_loopback_with_shared_keys(pod):
    app, ts = containers(pod)["app"], containers(pod)["torchserve"]
    args = {a: app["command"][i + 1] for i, a in enumerate(app["command"]) if a.startswith("--")}
    ports = config_ports()
    assert args["--inference-url"] == f"http://127.0.0.1:{ports['inference']}"
    assert args["--management-url"] == f"http://127.0.0.1:{ports['management']}"
    workdir = ts["command"][ts["command"].index("--workdir") + 1]
    assert args["--key-file"] == f"{workdir}/key_file.json"
    shared = [v for v in app["volumeMounts"] if v["mountPath"] == workdir]
    assert shared and shared[0]["readOnly"] is True
    assert shared[0]["name"] in {v["name"] for v in ts["volumeMounts"] if v["mountPath"] == workdir}


def test_hpa_targets_the_deployment(m, pod):
    hpa, deployment = m["HorizontalPodAutoscaler"]["spec"], m["Deployment"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "ContainerResource" and metric["containerResource"]["name"] == "cpu"
    assert metric["containerResource"]["container"] in containers(pod)


def test_serving_config_keeps_auth_on_and_apis_on_loopback():
    props = read_properties(ROOT / "serve_config" / "config.properties")
    assert props["disable_token_authorization"] == "false" and props["enable_model_api"] == "false"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")


def test_dockerfile():
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [ln for ln in re.sub(r"\\\n", " ", text).splitlines() if ln and not ln.startswith("#")]
    by = {}
    for ln in instructions:
        by.setdefault(ln.split()[0], []).append(ln)
    assert re.search(r"python:3\.11", by["ARG"][0]) and "openjdk-17-jre-headless" in text
    health = shlex.split(by["HEALTHCHECK"][0].split("CMD", 1)[1].replace("[", "").replace("]", "").replace(",", " "))
    assert health[-1] == "ready" and health[:3] == ["python", "-m", "handlers.server"]
    assert by["CMD"][0].rstrip().endswith('"serve"]')
    assert any("serve_config/" in ln for ln in by["COPY"])
    assert any(re.search(r"COPY --chmod=0444 \$\{MAR\} model_store/landmark\.mar", ln) for ln in by["COPY"])
    assert "ADD" not in by  # no URLs fetched by the build's own instructions
    assert not re.search(r"(curl|wget)[^\n]*\|\s*(ba)?sh", text)
    assert not re.search(r"shared|data/|artifacts", "\n".join(by["COPY"]))  # no photos, no training runs
    ignore = [ln for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
              if ln and not ln.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: everything out, then only what the image needs back in
    allowed = [ln for ln in ignore if ln.startswith("!")]
    assert not any(re.search(r"data|artifacts|shared|\.venv", ln) for ln in allowed)


def test_image_pins_match_the_project():
    def pins(path: Path) -> dict[str, str]:
        lines = (ln.split("#")[0].strip() for ln in path.read_text(encoding="utf-8").splitlines())
        return dict(ln.split("==") for ln in lines if "==" in ln)

    image, project = pins(ROOT / "deploy" / "requirements.txt"), pins(ROOT / "requirements.txt")
    assert image.pop("onnxruntime") == project["onnxruntime-gpu"]  # the CPU build of the same release
    assert {name: project.get(name) for name in image} == image
