"""The Helm chart in charts/emlisten: renders offline (Helm's own Go engine through helm-python-sdk,
no helm binary, no cluster), every manifest is valid against the Kubernetes schemas, the values
schema refuses bad values, and the rendered objects say what the docs promise."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

import emlisten

CHART = Path(__file__).resolve().parents[2] / "charts" / "emlisten"

#: Kubernetes versions the manifests are checked against: the oldest schema set shipped by
#: kubernetes-validate and the newest.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

#: Custom resources: their schemas are not part of Kubernetes, so they are skipped by name.
CRD_KINDS = frozenset({"ServiceMonitor"})

PRODUCTION: dict[str, Any] = {
    "replicaCount": 3,
    "workerReplicaCount": 4,
    "existingSecret": "emlisten-prod",
    "image": {"repository": "registry.example.com/emlisten", "tag": "0.1.0"},
    "logLevel": "Information",
    "logFormat": "json",
    "maxBpmonlineDownTime": 5,
    "service": {"type": "LoadBalancer"},
    "autoscaling": {
        "enabled": True,
        "maxReplicas": 12,
        "customMetric": {"enabled": True, "targetAverageValue": "400"},
        "workers": {"enabled": True, "maxReplicas": 30},
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "hosts": [{"host": "listener.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
        "tls": [{"hosts": ["listener.example.com"], "secretName": "listener-tls"}],
    },
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "env": {"EMLISTEN_WORKER_CONCURRENCY": 128},
    "extraEnv": [{"name": "TZ", "value": "UTC"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "mail", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "emlisten"}},
                    },
                }
            ]
        }
    },
}

#: The chart's own Secret, built from connection values (no existingSecret).
WITH_OWN_SECRET: dict[str, Any] = {
    "replicaCount": 2,
    "workerReplicaCount": 1,
    "redis": {"host": "redis.db", "password": "p@ss w:rd/+", "database": 3},
    "rabbitmq": {"host": "mq.db", "vhost": "/", "login": "emlisten", "password": "s3cr@t"},
    "secretKey": "a-long-random-key",
    "apiToken": "bearer-token",
}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values or {}, name="rel", namespace="mail", is_install=True)
    documents: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        documents.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return documents


def only(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(documents: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in documents)


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def env_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container(workload)["env"]}


def validate_all(documents: list[dict[str, Any]]) -> list[str]:
    """Validate every manifest; returns the kinds skipped as CRDs."""
    skipped = []
    for document in documents:
        if document["kind"] in CRD_KINDS:
            skipped.append(document["kind"])
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(document, version, strict=True)
    return skipped


# --- rendering and Kubernetes schema validation ---


def test_default_values_render_a_single_in_memory_node() -> None:
    documents = render()
    assert validate_all(documents) == []
    assert kinds(documents) == [
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]
    statefulset = only(documents, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1
    env = env_of(statefulset)
    assert env["EMLISTEN_ROLE"]["value"] == "primary"
    # No store/queue configured: no reference to them (in-memory fallbacks); the Secret holds
    # only the generated API token.
    assert not {"EMLISTEN_REDIS_URL", "EMLISTEN_AMQP_URL", "EMLISTEN_SECRET_KEY"} & env.keys()
    assert set(only(documents, "Secret")["stringData"]) == {"EMLISTEN_API_TOKEN"}
    assert container(statefulset)["image"] == f"emlisten:{emlisten.__version__}"


def test_production_values_render_valid_manifests() -> None:
    documents = render(PRODUCTION)
    assert validate_all(documents) == ["ServiceMonitor"]
    assert kinds(documents) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "HorizontalPodAutoscaler",
        "Ingress",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
        "StatefulSet",
    ]


def test_chart_own_secret_renders_valid_manifests() -> None:
    documents = render(WITH_OWN_SECRET)
    assert validate_all(documents) == []
    assert "Secret" in kinds(documents)


def test_crd_skip_list_is_explicit() -> None:
    # Anything not in CRD_KINDS must have a Kubernetes schema: kubernetes-validate refuses
    # unknown kinds, so a new custom resource cannot slip through unvalidated.
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(
            {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"}},
            KUBE_VERSIONS[-1],
            strict=True,
        )


# --- key facts ---


def test_primaries_are_a_statefulset_whose_pod_name_is_the_node_id() -> None:
    documents = render({**PRODUCTION, "autoscaling": {"enabled": False}})
    statefulset = only(documents, "StatefulSet", "rel-emlisten")
    assert statefulset["spec"]["replicas"] == 3
    headless = only(documents, "Service", "rel-emlisten-headless")
    assert statefulset["spec"]["serviceName"] == "rel-emlisten-headless"
    assert headless["spec"]["clusterIP"] == "None"
    env = env_of(statefulset)
    assert env["EMLISTEN_NODE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["EMLISTEN_ROLE"]["value"] == "primary"


def test_secondaries_are_a_deployment_with_their_own_role() -> None:
    documents = render({**PRODUCTION, "autoscaling": {"enabled": False}})
    deployment = only(documents, "Deployment", "rel-emlisten-worker")
    assert deployment["spec"]["replicas"] == 4
    env = env_of(deployment)
    assert env["EMLISTEN_ROLE"]["value"] == "secondary"
    assert env["EMLISTEN_NODE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert labels["app.kubernetes.io/component"] == "secondary"


def test_zero_workers_render_no_deployment() -> None:
    documents = render({**WITH_OWN_SECRET, "workerReplicaCount": 0})
    assert "Deployment" not in kinds(documents)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"workerReplicaCount": 2}, 2),
        ({"WorkerReplicaCount": 3}, 3),
        ({"workerReplicaCount": 2, "WorkerReplicaCount": 5}, 5),
        ({"workerReplicaCount": 2, "WorkerReplicaCount": 0}, 0),
    ],
)
def test_vendor_worker_replica_count_alias(values: dict[str, Any], expected: int) -> None:
    documents = render({**WITH_OWN_SECRET, **values})
    workers = [d for d in documents if d["kind"] == "Deployment"]
    if expected == 0:
        assert workers == []
    else:
        assert workers[0]["spec"]["replicas"] == expected


def test_existing_secret_replaces_the_charts_secret() -> None:
    documents = render(PRODUCTION)
    assert "Secret" not in kinds(documents)
    for workload in (only(documents, "StatefulSet"), only(documents, "Deployment")):
        env = env_of(workload)
        for name in ("EMLISTEN_REDIS_URL", "EMLISTEN_AMQP_URL", "EMLISTEN_SECRET_KEY", "EMLISTEN_API_TOKEN"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "emlisten-prod", "key": name, "optional": True}
        assert "checksum/secret" not in workload["spec"]["template"]["metadata"].get("annotations", {})


def test_existing_secret_key_names_are_configurable() -> None:
    values = {**PRODUCTION, "existingSecretKeys": {"redisUrl": "redis-url"}}
    env = env_of(only(render(values), "StatefulSet"))
    assert env["EMLISTEN_REDIS_URL"]["valueFrom"]["secretKeyRef"]["key"] == "redis-url"
    assert env["EMLISTEN_AMQP_URL"]["valueFrom"]["secretKeyRef"]["key"] == "EMLISTEN_AMQP_URL"


def test_chart_secret_builds_escaped_connection_urls() -> None:
    documents = render(WITH_OWN_SECRET)
    secret = only(documents, "Secret", "rel-emlisten")
    data = secret["stringData"]
    assert data["EMLISTEN_REDIS_URL"] == "redis://:p%40ss%20w%3Ard%2F%2B@redis.db:6379/3"
    assert data["EMLISTEN_AMQP_URL"] == "amqp://emlisten:s3cr%40t@mq.db:5672/%2F"
    assert data["EMLISTEN_SECRET_KEY"] == "a-long-random-key"
    assert data["EMLISTEN_API_TOKEN"] == "bearer-token"
    statefulset = only(documents, "StatefulSet")
    env = env_of(statefulset)
    assert env["EMLISTEN_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "rel-emlisten"
    # Pods roll when the Secret changes.
    assert re.fullmatch(
        r"[0-9a-f]{64}", statefulset["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
    )


def test_redis_vendor_host_port_form_tls_and_full_urls() -> None:
    values = {
        **WITH_OWN_SECRET,
        "redis": {"host": "redis.db:6380", "database": 2, "tls": True},
        "rabbitmq": {"url": "amqps://u:p@mq.example.com:5671/prod"},
    }
    data = only(render(values), "Secret")["stringData"]
    assert data["EMLISTEN_REDIS_URL"] == "rediss://redis.db:6380/2"
    assert data["EMLISTEN_AMQP_URL"] == "amqps://u:p@mq.example.com:5671/prod"


def test_hpa_scales_primaries_on_active_subscriptions() -> None:
    documents = render(PRODUCTION)
    statefulset = only(documents, "StatefulSet")
    assert "replicas" not in statefulset["spec"], "the HPA owns the replica count"
    hpa = only(documents, "HorizontalPodAutoscaler", "rel-emlisten")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "rel-emlisten",
    }
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["maxReplicas"] == 12
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "emlisten_active_subscriptions"},
                "target": {"type": "AverageValue", "averageValue": "400"},
            },
        }
    ]
    workers_hpa = only(documents, "HorizontalPodAutoscaler", "rel-emlisten-worker")
    assert workers_hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    assert workers_hpa["spec"]["minReplicas"] == 4


def test_hpa_falls_back_to_cpu_without_the_custom_metric() -> None:
    values = {**PRODUCTION, "autoscaling": {"enabled": True, "customMetric": {"enabled": False}}}
    documents = render(values)
    validate_all(documents)
    hpa = only(documents, "HorizontalPodAutoscaler", "rel-emlisten")
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]


def test_service_ingress_and_service_monitor() -> None:
    documents = render(PRODUCTION)
    service = only(documents, "Service", "rel-emlisten")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"][0]["port"] == 8080
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "primary"
    ingress = only(documents, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rel-emlisten", "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [{"hosts": ["listener.example.com"], "secretName": "listener-tls"}]
    monitor = only(documents, "ServiceMonitor")
    metrics_service = only(documents, "Service", "rel-emlisten-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics_service["metadata"]["labels"].items()
    # The metrics Service reaches primaries and secondaries alike.
    assert "app.kubernetes.io/component" not in metrics_service["spec"]["selector"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_probes_and_security_context() -> None:
    for workload in (only(render(PRODUCTION), "StatefulSet"), only(render(PRODUCTION), "Deployment")):
        main = container(workload)
        assert main["livenessProbe"]["httpGet"] == {"path": "/api/listeners/status", "port": "http"}
        assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        security = main["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert {"name": "tmp", "mountPath": "/tmp"} in main["volumeMounts"]
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
        assert pod["tolerations"][0]["key"] == "mail"
        assert "podAntiAffinity" in pod["affinity"]
    custom = {**PRODUCTION, "probes": {"readiness": {"path": "/api/listeners/status"}}}
    assert container(only(render(custom), "StatefulSet"))["readinessProbe"]["httpGet"]["path"] == (
        "/api/listeners/status"
    )


def test_settings_map_to_emlisten_environment() -> None:
    env = env_of(only(render(PRODUCTION), "StatefulSet"))
    assert env["EMLISTEN_LOG_LEVEL"]["value"] == "INFO"  # the vendor's "Information"
    assert env["EMLISTEN_LOG_FORMAT"]["value"] == "json"
    assert env["EMLISTEN_MAX_BPMONLINE_DOWN_TIME_MINUTES"]["value"] == "5"
    assert env["EMLISTEN_WORKER_CONCURRENCY"]["value"] == "128"
    assert env["TZ"]["value"] == "UTC"
    assert env["EMLISTEN_PORT"]["value"] == "8080"
    default_env = env_of(only(render(), "StatefulSet"))
    assert "EMLISTEN_MAX_BPMONLINE_DOWN_TIME_MINUTES" not in default_env


@pytest.mark.parametrize(
    ("vendor", "python"),
    [
        ("Trace", "DEBUG"),
        ("Debug", "DEBUG"),
        ("Information", "INFO"),
        ("Warning", "WARNING"),
        ("error", "ERROR"),
    ],
)
def test_vendor_log_levels_are_mapped(vendor: str, python: str) -> None:
    env = env_of(only(render({"logLevel": vendor}), "StatefulSet"))
    assert env["EMLISTEN_LOG_LEVEL"]["value"] == python


# --- bad values are refused ---


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": -1}, "/replicaCount"),
        ({"workerReplicaCount": -2}, "/workerReplicaCount"),
        ({"WorkerReplicaCount": "many"}, "/WorkerReplicaCount"),
        ({"service": {"type": "ExternalName"}}, "/service/type"),
        ({"service": {"type": "Bogus"}}, "/service/type"),
        ({"logLevel": "loud"}, "/logLevel"),
        ({"logFormat": "xml"}, "/logFormat"),
        ({"redis": {"database": 16}}, "/redis/database"),
        ({"redis": {"url": "http://redis"}}, "/redis/url"),
        ({"probes": {"readiness": {"path": "readyz"}}}, "/probes/readiness/path"),
        (
            {"autoscaling": {"targetCPUUtilizationPercentage": 0}},
            "/autoscaling/targetCPUUtilizationPercentage",
        ),
        ({"replicaCuont": 3}, "replicaCuont"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    assert complaint in str(caught.value)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": 2}, "shared store"),
        ({"workerReplicaCount": 1, "redis": {"host": "r"}, "secretKey": "k"}, "work queue"),
        ({"redis": {"host": "r"}}, "secretKey"),
        ({"autoscaling": {"enabled": True}}, "shared store"),
    ],
)
def test_templates_refuse_unworkable_combinations(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    assert complaint in str(caught.value)


# --- single-node mode with persistence (EMLISTEN_DATA_DIR on a volume) ---


def test_persistence_gives_the_single_primary_a_data_volume() -> None:
    documents = render({"persistence": {"enabled": True}, "secretKey": "a-long-random-key"})
    assert validate_all(documents) == []
    statefulset = only(documents, "StatefulSet")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    assert {"name": "data", "mountPath": "/data"} in container(statefulset)["volumeMounts"]
    env = env_of(statefulset)
    assert env["EMLISTEN_DATA_DIR"]["value"] == "/data"
    # The key that encrypts the volume's credentials comes from the Secret, not the volume.
    assert env["EMLISTEN_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "EMLISTEN_SECRET_KEY"
    assert "EMLISTEN_REDIS_URL" not in only(documents, "Secret")["stringData"]
    # The pod can write it: the volume is group-owned by fsGroup 10001, the service's group.
    assert statefulset["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001
    report = helm.lint(str(CHART), {"persistence": {"enabled": True}, "secretKey": "k"}, strict=True)
    assert report["errors"] == []


@pytest.mark.parametrize(("storage_class", "expected"), [("fast-ssd", "fast-ssd"), ("-", "")])
def test_persistence_storage_class(storage_class: str, expected: str) -> None:
    values = {
        "persistence": {"enabled": True, "storageClass": storage_class, "size": "5Gi"},
        "existingSecret": "mine",
    }
    (claim,) = only(render(values), "StatefulSet")["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == expected
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"


def test_without_persistence_nothing_is_kept() -> None:
    statefulset = only(render(), "StatefulSet")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    assert "EMLISTEN_DATA_DIR" not in env_of(statefulset)
    assert [m["mountPath"] for m in container(statefulset)["volumeMounts"]] == ["/tmp"]


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"persistence": {"enabled": True}}, "set secretKey"),
        ({"persistence": {"enabled": True}, "redis": {"host": "r"}, "secretKey": "k"}, "single-node mode"),
        ({"persistence": {"enabled": True}, "replicaCount": 2, "secretKey": "k"}, "shared store"),
    ],
)
def test_persistence_refuses_what_cannot_work(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    assert complaint in str(caught.value)


def test_schema_rejects_a_bad_volume_size() -> None:
    with pytest.raises(helm.HelmError) as caught:
        render({"persistence": {"enabled": True, "size": "lots"}, "secretKey": "k"})
    assert "at '/persistence/size': 'lots' does not match pattern" in str(caught.value)


def test_values_file_passes_its_own_schema_and_lint() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({})
        chart.validate_schema(PRODUCTION)
        assert chart.metadata["appVersion"] == emlisten.__version__
    for values in (None, PRODUCTION, WITH_OWN_SECRET):
        report = helm.lint(str(CHART), values, strict=True)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --- the README documents every value ---


def _leaf_keys(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, path + ".")
        else:
            yield path


def test_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.MULTILINE))
    # A value is documented by its own row or by a row for the object holding it (resources...).
    missing = [
        key
        for key in _leaf_keys(values)
        if not any(".".join(key.split(".")[:depth]) in documented for depth in range(1, key.count(".") + 2))
    ]
    assert missing == []
    assert "WorkerReplicaCount" in documented


# --- secure defaults: token, listening address, NetworkPolicy ---


def _pod_settings(documents: list[dict[str, Any]]) -> Any:
    """The settings the primary's environment gives emlisten (secret references resolved from
    the chart's Secret): proves the pod would start, not refuse."""
    from emlisten.config import load_settings

    secret = next((d["stringData"] for d in documents if d["kind"] == "Secret"), {})
    env: dict[str, str] = {}
    for name, entry in env_of(only(documents, "StatefulSet")).items():
        if "value" in entry:
            env[name] = str(entry["value"])
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            env[name] = secret[entry["valueFrom"]["secretKeyRef"]["key"]]
    return load_settings(env)


def test_the_chart_listens_on_all_interfaces_with_a_generated_token() -> None:
    documents = render()
    token = only(documents, "Secret")["stringData"]["EMLISTEN_API_TOKEN"]
    assert re.fullmatch(r"[A-Za-z0-9]{40}", token)
    settings = _pod_settings(documents)
    assert (settings.host, settings.api_token, settings.allow_unauthenticated) == ("0.0.0.0", token, False)
    given = _pod_settings(render({"apiToken": "chosen-token"}))
    assert given.api_token == "chosen-token"


def test_allow_unauthenticated_starts_without_a_token() -> None:
    documents = render({"allowUnauthenticated": True})
    assert "Secret" not in kinds(documents)
    settings = _pod_settings(documents)
    assert settings.allow_unauthenticated and settings.api_token is None


def _peers(policy: dict[str, Any]) -> list[dict[str, Any]]:
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    peers: list[dict[str, Any]] = rule["from"]
    return peers


def test_network_policy_admits_only_creatio_monitoring_and_emlisten() -> None:
    documents = render()
    assert validate_all(documents) == []
    policy = only(documents, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "emlisten",
        "app.kubernetes.io/instance": "rel",
    }
    assert _peers(policy) == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "creatio"}}},
        {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        },
        {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/name": "emlisten", "app.kubernetes.io/instance": "rel"}
            }
        },
    ]


def test_network_policy_selectors_come_from_values() -> None:
    # Helm merges maps with the defaults: a default label is dropped by setting it to null.
    creatio = {
        "podSelector": {"matchLabels": {"app": "bpmonline", "app.kubernetes.io/name": None}},
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "crm"}},
    }
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    documents = render({"networkPolicy": {"creatio": creatio, "extraFrom": [ingress]}})
    assert validate_all(documents) == []
    peers = _peers(only(documents, "NetworkPolicy"))
    assert peers[0] == {
        "podSelector": {"matchLabels": {"app": "bpmonline"}},
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "crm"}},
    }
    assert peers[-1] == ingress
    assert "NetworkPolicy" not in kinds(render({"networkPolicy": {"enabled": False}}))
