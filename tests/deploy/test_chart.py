"""The Helm chart, rendered and linted by the real Helm library (helm-python-sdk), every
manifest validated against the Kubernetes schemas of a current release."""

import json

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

CHART = REPO / "helm" / "modgate"
KUBE = kubernetes_validate.latest_version()
# no upstream schema to check against: checked structurally (here and in test_chart_defaults.py)
CRDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
# A managed Redis (today's production shape); the no-values install is VALUE_SETS["no-values"].
BASE = {
    "redis": {"enabled": False},
    "secrets": {
        "redisUrl": "redis://redis-master.redis:6379/0",
        "webhookSecret": "whsec-xyz-0123456789",
        "receiverToken": "tok-abc",
        "awsSecretAccessKey": "aws-secret-123",
    },
}

VALUE_SETS = {
    "no-values": {},
    "default": BASE,
    "cpu": {"worker": {"device": "cpu"}, "inference": {"enabled": True}},
    "keda-embedded-redis": {"keda": {"enabled": True}},
    "console": {
        "console": {
            "enabled": True,
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "host": "review.acme.example",
                "tls": [{"secretName": "review-tls", "hosts": ["review.acme.example"]}],
            },
        }
    },
    "console-managed-redis": {**BASE, "console": {"enabled": True, "existingSecret": "reviewers"}},
    "monitoring": {
        "serviceMonitor": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    },
    "keda": {
        **BASE,
        "keda": {
            "enabled": True,
            "address": "redis-master.redis:6379",
            "passwordSecretKey": "REDIS_PASSWORD",
        },
    },
    "hpa": {**BASE, "hpa": {"enabled": True, "maxReplicas": 3}},
    "ingress": {
        **BASE,
        "receiver": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "host": "events.acme.example",
                "tls": [{"secretName": "events-tls", "hosts": ["events.acme.example"]}],
            }
        },
    },
    "model-pvc": {
        **BASE,
        "models": {"pvc": {"enabled": True, "size": "80Gi"}, "initPull": {"enabled": True}},
    },
    "existing-secret": {
        "redis": {"enabled": False},
        "existingSecret": "modgate-prod-env",
        "sqsListener": {"enabled": True, "queueUrl": "https://sqs.eu-west-1.amazonaws.com/1/q"},
        "serviceMonitor": {"enabled": True},
    },
    "split": {
        **BASE,
        "inference": {"enabled": True, "ingestProcesses": 3},
        "serviceMonitor": {"enabled": True},
    },
    "examples-aws": yaml.safe_load((REPO / "helm" / "examples" / "values-aws.yaml").read_text()),
    "examples-minio": yaml.safe_load((REPO / "helm" / "examples" / "values-minio.yaml").read_text()),
}


def render(values):
    chart = helm.Chart.load(str(CHART))
    rendered = chart.render(values, name="mg", namespace="moderation", is_install=True)
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_clean_and_every_manifest_valid(name):
    values = VALUE_SETS[name]
    report = helm.lint(str(CHART), values, strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report
    docs = render(values)
    assert docs
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] in ("keda.sh/v1alpha1", "monitoring.coreos.com/v1")
            assert doc["metadata"]["name"] and doc["spec"]
            continue
        kubernetes_validate.validate(doc, KUBE, strict=True)


def containers(deployment):
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def test_worker_gpu_probes_grace_and_security():
    docs = render(BASE)
    worker = by_kind(docs, "Deployment")["mg-modgate-worker"]
    pod = worker["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert (
        c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and c["livenessProbe"]["httpGet"]["path"] == "/livez"
    )
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["mg-modgate-config"]["data"]["modgate.yaml"])
    assert pod["terminationGracePeriodSeconds"] > config["worker"]["drain_timeout_s"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    for deployment in by_kind(docs, "Deployment").values():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in containers(deployment):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    dispatcher = by_kind(docs, "Deployment")["mg-modgate-dispatcher"]
    assert dispatcher["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "worker",
        "--queues",
        "modgate.webhooks",
    ]
    assert "nvidia.com/gpu" not in json.dumps(dispatcher)


def secret_values(docs):
    """Every value the rendered Secrets hold (generated ones included), and the password of
    any URL among them."""
    found = set()
    for doc in docs:
        if doc["kind"] == "Secret":
            for key, value in doc.get("stringData", {}).items():
                if key == "AWS_ACCESS_KEY_ID":  # an identifier, not a secret
                    continue
                found.add(value)
                if "://" in value and "@" in value:
                    found.add(value.split("://", 1)[1].rsplit("@", 1)[0].lstrip(":"))
    return {v for v in found if len(v) >= 6}


def test_no_secret_values_outside_secrets():
    for name, values in VALUE_SETS.items():
        docs = render(values)
        text = json.dumps([d for d in docs if d["kind"] != "Secret"])
        for secret in ("whsec-xyz-0123456789", "tok-abc", "aws-secret-123", "redis://"):
            assert secret not in text, (name, secret)
        # generated ones too: the Redis password, receiver token, webhook secret, console tokens
        generated = secret_values(docs)
        assert generated or not by_kind(docs, "Secret"), name
        for secret in generated:
            assert secret not in text, (name, secret[:4])
    existing = render(VALUE_SETS["existing-secret"])
    assert not by_kind(existing, "Secret")
    worker = by_kind(existing, "Deployment")["mg-modgate-worker"]
    assert worker["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "modgate-prod-env"}}
    ]


def test_grace_period_must_exceed_drain_timeout():
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render({**BASE, "worker": {"drainTimeoutSeconds": 120, "terminationGracePeriodSeconds": 60}})


def test_schema_rejects_typos_and_bad_values():
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(BASE)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({**BASE, "wroker": {}})
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({**BASE, "worker": {"gpus": -1}})
    # a short webhook secret would stop every worker at start-up: refused at install instead
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({**BASE, "secrets": {**BASE["secrets"], "webhookSecret": "whsec-short"}})
    chart.validate_schema({**BASE, "secrets": {**BASE["secrets"], "webhookSecret": ""}})


def test_keda_scales_the_worker_on_the_queue_and_hpa_is_the_fallback():
    keda = render(VALUE_SETS["keda"])
    (scaled,) = by_kind(keda, "ScaledObject").values()
    trigger = scaled["spec"]["triggers"][0]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "mg-modgate-worker"
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == "modgate"
    assert "replicas" not in by_kind(keda, "Deployment")["mg-modgate-worker"]["spec"]
    assert not by_kind(keda, "HorizontalPodAutoscaler")
    hpa = render(VALUE_SETS["hpa"])
    assert by_kind(hpa, "HorizontalPodAutoscaler")["mg-modgate-worker"]["spec"]["maxReplicas"] == 3


def test_models_pvc_and_init_pull():
    docs = render(VALUE_SETS["model-pvc"])
    assert (
        by_kind(docs, "PersistentVolumeClaim")["mg-modgate-models"]["spec"]["resources"]["requests"][
            "storage"
        ]
        == "80Gi"
    )
    pod = by_kind(docs, "Deployment")["mg-modgate-worker"]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["args"][:2] == ["models", "pull"]
    models = next(v for v in pod["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"]["claimName"] == "mg-modgate-models"


def test_weights_baked_into_the_image_are_not_hidden_by_a_volume():
    for split in (False, True):
        values = {**BASE, "models": {"fromImage": True}}
        if split:
            values["inference"] = {"enabled": True}
        pod = by_kind(render(values), "Deployment")["mg-modgate-worker"]["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        for container in pod["containers"]:
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/models" not in mounts and "/models/cache" in mounts, container["name"]
        assert next(v for v in pod["volumes"] if v["name"] == "models") == {"name": "models", "emptyDir": {}}
    for conflicting in ({"pvc": {"enabled": True}}, {"initPull": {"enabled": True}}):
        with pytest.raises(helm.HelmError, match=r"models\.fromImage"):
            render({**BASE, "models": {"fromImage": True, **conflicting}})


def test_ingress_routes_events_to_the_receiver():
    docs = render(VALUE_SETS["ingress"])
    (ingress,) = by_kind(docs, "Ingress").values()
    path = ingress["spec"]["rules"][0]["http"]["paths"][0]
    assert path["path"] == "/events" and path["backend"]["service"]["name"] == "mg-modgate-receiver"
    assert by_kind(docs, "PodDisruptionBudget") and by_kind(docs, "NetworkPolicy")


def worker_config(values):
    return yaml.safe_load(by_kind(render(values), "ConfigMap")["mg-modgate-config"]["data"]["modgate.yaml"])


def test_the_worker_allowlist_follows_the_buckets_the_release_is_for():
    from modgate.settings import Settings

    config = worker_config({**BASE, "buckets": ["uploads", "avatars-*"]})
    assert config["worker"]["buckets"] == config["producer"]["buckets"] == ["uploads", "avatars-*"]
    # The rendered file is what the worker loads: MODGATE_WORKER__BUCKETS in YAML form.
    assert Settings.model_validate(config).worker.buckets == ["uploads", "avatars-*"]
    # Buckets named only in the producer settings bound the worker too.
    config = worker_config({**BASE, "settings": {"producer": {"buckets": ["legacy"]}}})
    assert config["worker"]["buckets"] == ["legacy"]
    assert "buckets" not in worker_config(BASE)["worker"]  # none configured: any, with a warning
    assert worker_config(VALUE_SETS["examples-minio"])["worker"]["buckets"] == ["uploads"]
    with pytest.raises(helm.HelmValuesError):
        helm.Chart.load(str(CHART)).validate_schema({**BASE, "buckets": "uploads"})


def worker_pod(docs):
    return by_kind(docs, "Deployment")["mg-modgate-worker"]["spec"]["template"]["spec"]


def env_of(container):
    """Literal env values (entries from a Secret map to None)."""
    return {e["name"]: e.get("value") for e in container["env"]}


def port_number(container, name):
    (port,) = (p["containerPort"] for p in container["ports"] if p["name"] == name)
    return port


def test_split_worker_pod_feeds_one_inference_container_from_several_ingest_processes():
    drain, grace = 60, 90
    (single,) = worker_pod(render(BASE))["containers"]
    docs = render({**BASE, "inference": {"enabled": True, "ingestProcesses": 3}})
    worker = by_kind(docs, "Deployment")["mg-modgate-worker"]
    kubernetes_validate.validate(worker, KUBE, strict=True)
    pod = worker["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["inference", "ingest-0", "ingest-1", "ingest-2"]
    inference, *ingest = pod["containers"]
    socket = "/run/modgate/inference.sock"

    # The inference process owns the GPU the single worker had, and its probes use its health port.
    assert inference["args"] == ["serve-inference"]
    assert (
        inference["resources"] == single["resources"]
        and inference["resources"]["limits"]["nvidia.com/gpu"] == 1
    )
    assert env_of(inference)["MODGATE_INFERENCE__SOCKET"] == socket
    assert port_number(inference, inference["livenessProbe"]["httpGet"]["port"]) == 9109
    assert env_of(inference)["MODGATE_INFERENCE__HEALTH_PORT"] == "9109"
    assert inference["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert inference["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # It serves until the ingest processes have drained through it (serve-inference waits
    # for its clients after SIGTERM), inside the grace period: no preStop delay needed.
    assert pod["terminationGracePeriodSeconds"] == grace
    assert drain < grace and "lifecycle" not in inference

    # Each ingest process runs the worker's own command, without GPU, on its own port.
    ports = []
    for c in ingest:
        env = env_of(c)
        assert c["args"] == single["args"] == ["worker", "--queues", "modgate"]
        assert env["MODGATE_INFERENCE__SOCKET"] == socket
        # it waits for the socket as long as the inference container may take to load the models
        assert float(env["MODGATE_INFERENCE__CONNECT_TIMEOUT_S"]) == 600
        assert "nvidia.com/gpu" not in json.dumps(c["resources"]) and env["NVIDIA_VISIBLE_DEVICES"] == "void"
        assert c["resources"]["requests"]["cpu"] == "1"
        port = int(env["MODGATE_WORKER__METRICS_PORT"])
        for probe, path in (
            ("startupProbe", "/livez"),
            ("livenessProbe", "/livez"),
            ("readinessProbe", "/readyz"),
        ):
            assert c[probe]["httpGet"]["path"] == path
            assert port_number(c, c[probe]["httpGet"]["port"]) == port
        ports.append(port)
    assert len(set(ports)) == 3 and 9109 not in ports
    names = [p["name"] for c in pod["containers"] for p in c["ports"]]
    assert len(set(names)) == len(names) and all(len(n) <= 15 for n in names)  # IANA service names

    # One in-memory emptyDir carries the socket; every container keeps config, secret and /tmp.
    (volume,) = (v for v in pod["volumes"] if v["name"] == "inference-socket")
    assert volume["emptyDir"] == {"medium": "Memory"}
    for c in pod["containers"]:
        # The socket is a trust boundary: only the inference container may write there, and
        # it runs as its own uid, which the ingest containers check (and it checks theirs).
        mount = {"name": "inference-socket", "mountPath": "/run/modgate"}
        assert (mount if c is inference else {**mount, "readOnly": True}) in c["volumeMounts"]
        assert all(m in c["volumeMounts"] for m in single["volumeMounts"] if m["name"] != "models")
        assert all(e in c["env"] for e in single["env"]) and c["envFrom"] == single["envFrom"]
        uid = {"runAsUser": 10002} if c is inference else {}
        assert c["securityContext"] == {**single["securityContext"], **uid} and c["image"] == single["image"]
        if c is not inference:
            assert env_of(c)["MODGATE_INFERENCE__SERVER_UID"] == "10002"
    assert env_of(inference)["MODGATE_INFERENCE__CLIENT_UIDS"] == "[10001]"
    assert pod["securityContext"]["runAsUser"] == 10001
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in ingest[0]["volumeMounts"]

    # A trailing slash on socketDir still names one socket.
    docs = render({**BASE, "inference": {"enabled": True, "socketDir": "/var/run/mg/", "ingestProcesses": 1}})
    pod = worker_pod(docs)
    sockets = {env_of(c)["MODGATE_INFERENCE__SOCKET"] for c in pod["containers"]}
    assert sockets == {"/var/run/mg/inference.sock"}
    assert len(pod["containers"]) == 2


def test_single_process_pod_by_default():
    docs = render(BASE)
    pod = worker_pod(docs)
    assert [c["name"] for c in pod["containers"]] == ["worker"]
    assert "MODGATE_INFERENCE" not in json.dumps(docs) and "inference-socket" not in json.dumps(docs)
    assert helm.Chart.load(str(CHART)).values["inference"]["enabled"] is False


def test_split_pod_metrics_are_scraped_and_reachable_from_every_process():
    docs = render(VALUE_SETS["split"])
    port_names = {p["name"] for c in worker_pod(docs)["containers"] for p in c["ports"]}
    service = by_kind(docs, "Service")["mg-modgate-worker-metrics"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == port_names
    monitor = by_kind(docs, "ServiceMonitor")["mg-modgate-worker"]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {p["name"] for p in service["spec"]["ports"]}
    policy = by_kind(docs, "NetworkPolicy")["mg-modgate-metrics"]
    assert {p["port"] for p in policy["spec"]["ingress"][0]["ports"]} == port_names


def test_split_pod_needs_one_gpu_and_sane_values():
    with pytest.raises(helm.HelmError, match="one inference process per GPU"):
        render({**BASE, "inference": {"enabled": True}, "worker": {"gpus": 2}})
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema({**BASE, "inference": {"enabled": True, "ingestProcesses": 8}})
    for bad in ({"ingestProcesses": 0}, {"socketDir": "run/modgate"}, {"ingestProccesses": 4}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({**BASE, "inference": {"enabled": True, **bad}})
