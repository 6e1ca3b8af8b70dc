"""The chart's working default and its optional parts: the embedded Redis, generated
secrets, ``worker.device=cpu``, the review console, and the Grafana dashboard and
Prometheus alerts, whose metric names must be ones the code exports. Rendered by the real
Helm library; lint and Kubernetes-schema validation of these value sets run in
test_chart.py (VALUE_SETS)."""

import json
import os
import re
import socket
import subprocess
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest
import redis
import yaml

from modgate.settings import ConsoleSettings, Settings
from tests.conftest import REPO
from tests.deploy.test_chart import BASE, CHART, KUBE, VALUE_SETS, by_kind, containers, env_of, render
from tests.servers import _wait, free_port

MODGATE_COMPONENTS = ("worker", "dispatcher", "receiver", "sqs-listener", "console")


def component(doc):
    return doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def env_entry(container, name):
    (entry,) = (e for e in container["env"] if e["name"] == name)
    return entry


def matches(selector, labels):
    """Whether a LabelSelector (matchLabels / In and NotIn expressions) selects ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
    return True


def pod_labels(workload):
    return workload["spec"]["template"]["metadata"]["labels"]


# -- no values --------------------------------------------------------------------------


def test_no_values_install_lints_validates_and_has_everything_it_needs():
    report = helm.lint(str(CHART), {}, strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report
    docs = render({})
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE, strict=True)
    assert set(by_kind(docs, "Deployment")) == {
        "mg-modgate-worker",
        "mg-modgate-dispatcher",
        "mg-modgate-receiver",
    }
    assert set(by_kind(docs, "StatefulSet")) == {"mg-modgate-redis"}
    env = by_kind(docs, "Secret")["mg-modgate-env"]["stringData"]
    # the receiver refuses to start without a token; deliveries get signed
    assert len(env["MODGATE_RECEIVER__TOKEN"]) >= 32
    assert env["MODGATE_WEBHOOK__SECRET"].startswith("whsec_")
    assert "MODGATE_REDIS__URL" not in env  # it comes from the Redis Secret
    # what the components will load is valid settings (the validators refuse short secrets)
    settings = Settings.model_validate(
        {
            "receiver": {"token": env["MODGATE_RECEIVER__TOKEN"]},
            "webhook": {"secret": env["MODGATE_WEBHOOK__SECRET"]},
        }
    )
    assert settings.webhook.secret is not None
    # the worker keeps its GPU by default
    (worker,) = by_kind(docs, "Deployment")["mg-modgate-worker"]["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "MODGATE_RUNTIME__DEVICE" not in env_of(worker)
    # no console and no monitoring objects unless asked for
    assert not [d for d in docs if "console" in d["metadata"]["name"]]
    assert not by_kind(docs, "PrometheusRule") and "grafana_dashboard" not in json.dumps(docs)


def test_generated_secrets_are_random_not_fixed():
    # The chart keeps them across upgrades by reading the live Secret (lookup); with no
    # cluster each render draws new ones, so none is a constant baked into the chart.
    first, second = (by_kind(render({}), "Secret") for _ in range(2))
    for name, secret in first.items():
        for key, value in secret["stringData"].items():
            assert value != second[name]["stringData"][key], (name, key)
    for template in ("secret.yaml", "redis.yaml", "console.yaml"):
        assert 'include "modgate.keep"' in (CHART / "templates" / template).read_text()
    assert 'lookup "v1" "Secret"' in (CHART / "templates" / "_helpers.tpl").read_text()


# -- embedded Redis ---------------------------------------------------------------------


def test_embedded_redis_is_durable_bounded_non_root_probed_and_persistent():
    docs = render({})
    sts = by_kind(docs, "StatefulSet")["mg-modgate-redis"]
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert sts["spec"]["replicas"] == 1
    assert re.fullmatch(r"redis:\d+\.\d+(\.\d+)?-alpine", c["image"])  # pinned by tag
    conf = by_kind(docs, "ConfigMap")["mg-modgate-redis"]["data"]["redis.conf"]
    lines = {line.strip() for line in conf.splitlines() if line.strip() and not line.startswith("#")}
    assert {"appendonly yes", "appendfsync always", "maxmemory-policy noeviction", "dir /data"} <= lines
    assert any(line.startswith("maxmemory ") for line in lines)
    assert c["command"][:2] == ["redis-server", "/etc/redis/redis.conf"]
    assert c["command"][2:] == ["--requirepass", "$(REDIS_PASSWORD)"]

    # non-root, read-only root filesystem, nothing extra
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]

    # the password comes from the generated Secret; the probes authenticate with it
    secret = by_kind(docs, "Secret")["mg-modgate-redis"]["stringData"]
    for var in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        assert env_entry(c, var)["valueFrom"]["secretKeyRef"] == {
            "name": "mg-modgate-redis",
            "key": "redis-password",
        }
    for probe, accepts in (("livenessProbe", "PONG|LOADING"), ("readinessProbe", "PONG")):
        command = c[probe]["exec"]["command"]
        assert "redis-cli" in command[-1] and accepts in command[-1]
        assert "-a " not in command[-1]  # REDISCLI_AUTH, never the password on a command line

    # the data on a PVC at /data
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert all(v["name"] != "data" for v in pod["volumes"])

    # the Service reaches the pod; the URL names the Service, port and password
    service = by_kind(docs, "Service")["mg-modgate-redis"]
    assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels(sts))
    url = urlsplit(secret["redis-url"])
    assert url.scheme == "redis" and url.hostname == "mg-modgate-redis"
    assert url.port == service["spec"]["ports"][0]["port"] == c["ports"][0]["containerPort"]
    assert url.password == secret["redis-password"] and len(url.password) >= 32


def test_the_rendered_redis_config_runs_in_a_real_redis(tmp_path):
    """The StatefulSet's command and redis.conf, run by redis-server 7 here (data in a tmp
    dir, a free port): the settings hold, the password is required, the probes pass with
    REDISCLI_AUTH only, and a full Redis refuses writes instead of evicting."""
    docs = render({})
    sts = by_kind(docs, "StatefulSet")["mg-modgate-redis"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    secret = by_kind(docs, "Secret")["mg-modgate-redis"]["stringData"]
    port = free_port()
    conf = by_kind(docs, "ConfigMap")["mg-modgate-redis"]["data"]["redis.conf"]
    conf = conf.replace("port 6379", f"port {port}").replace("dir /data", f"dir {tmp_path}")
    (tmp_path / "redis.conf").write_text(conf)
    command = [
        str(tmp_path / "redis.conf")
        if a == "/etc/redis/redis.conf"
        else a.replace("$(REDIS_PASSWORD)", secret["redis-password"])
        for a in c["command"]
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = urlsplit(secret["redis-url"])
        client = redis.Redis.from_url(
            url._replace(netloc=f":{url.password}@127.0.0.1:{port}").geturl(), decode_responses=True
        )
        _wait(client.ping, "redis-server", timeout=15)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) == 1536 * 1024 * 1024
        with socket.create_connection(("127.0.0.1", port), timeout=5) as anonymous:
            anonymous.sendall(b"PING\r\n")
            assert anonymous.recv(100).startswith(b"-NOAUTH")

        def probe(name, auth):
            script = c[name]["exec"]["command"][-1].replace("-p 6379", f"-p {port}")
            env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
            if auth is not None:
                env["REDISCLI_AUTH"] = auth
            return subprocess.run(["sh", "-c", script], env=env, timeout=10).returncode

        assert probe("readinessProbe", secret["redis-password"]) == 0
        assert probe("livenessProbe", secret["redis-password"]) == 0
        assert probe("readinessProbe", None) != 0 and probe("readinessProbe", "wrong") != 0

        client.set("kept", "1")
        client.config_set("maxmemory", 1)  # full
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("more", "x")
        assert client.get("kept") == "1"  # nothing evicted
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert (tmp_path / "appendonlydir").is_dir()


def test_without_persistence_redis_uses_an_emptydir():
    docs = render({"redis": {"persistence": {"enabled": False}}})
    sts = by_kind(docs, "StatefulSet")["mg-modgate-redis"]
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "data", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]


def test_every_modgate_component_gets_the_redis_url_from_the_redis_secret():
    values = {
        "console": {"enabled": True},
        "sqsListener": {"enabled": True, "queueUrl": "https://sqs.eu-west-1.amazonaws.com/1/q"},
        "models": {"initPull": {"enabled": True}},
        "inference": {"enabled": True, "ingestProcesses": 2},
    }
    docs = render(values)
    deployments = by_kind(docs, "Deployment")
    assert {component(d) for d in deployments.values()} == set(MODGATE_COMPONENTS)
    for deployment in deployments.values():
        for c in containers(deployment):
            assert env_entry(c, "MODGATE_REDIS__URL")["valueFrom"]["secretKeyRef"] == {
                "name": "mg-modgate-redis",
                "key": "redis-url",
            }, (deployment["metadata"]["name"], c["name"])


def test_only_this_releases_modgate_pods_reach_redis():
    docs = render({"console": {"enabled": True}})
    policy = by_kind(docs, "NetworkPolicy")["mg-modgate-redis"]
    sts = by_kind(docs, "StatefulSet")["mg-modgate-redis"]
    assert matches(policy["spec"]["podSelector"], pod_labels(sts))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    (peer,) = rule["from"]  # no namespaceSelector: this namespace only
    assert set(peer) == {"podSelector"}
    for deployment in by_kind(docs, "Deployment").values():
        assert matches(peer["podSelector"], pod_labels(deployment)), deployment["metadata"]["name"]
    # not Redis itself, not another release's pods, not a stray pod of the namespace
    assert not matches(peer["podSelector"], pod_labels(sts))
    worker_labels = pod_labels(by_kind(docs, "Deployment")["mg-modgate-worker"])
    assert not matches(peer["podSelector"], {**worker_labels, "app.kubernetes.io/instance": "other"})
    assert not matches(peer["podSelector"], {"run": "debug"})


def test_keda_scales_on_the_embedded_redis_with_its_password():
    docs = render(VALUE_SETS["keda-embedded-redis"])
    (scaled,) = by_kind(docs, "ScaledObject").values()
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "mg-modgate-redis.moderation.svc:6379"
    (auth,) = by_kind(docs, "TriggerAuthentication").values()
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "mg-modgate-redis", "key": "redis-password"}
    ]
    # KEDA's operator, in its own namespace, may read the queue length
    (rule,) = by_kind(docs, "NetworkPolicy")["mg-modgate-redis"]["spec"]["ingress"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}} in rule["from"]


def test_managed_redis_renders_no_redis_objects_and_uses_the_given_secret():
    docs = render(BASE)
    assert not [d for d in docs if d["metadata"]["name"].endswith("-redis")]
    assert not by_kind(docs, "StatefulSet")
    assert (
        by_kind(docs, "Secret")["mg-modgate-env"]["stringData"]["MODGATE_REDIS__URL"]
        == (BASE["secrets"]["redisUrl"])
    )
    for deployment in by_kind(docs, "Deployment").values():
        for c in containers(deployment):
            assert "MODGATE_REDIS__URL" not in {e["name"] for e in c["env"]}
            assert c["envFrom"] == [{"secretRef": {"name": "mg-modgate-env"}}]
    existing = render({"redis": {"enabled": False}, "existingSecret": "prod-env"})
    assert not by_kind(existing, "Secret") and not by_kind(existing, "StatefulSet")
    # KEDA keeps reading the address and password key it is given
    keda = render(VALUE_SETS["keda"])
    (trigger,) = next(iter(by_kind(keda, "ScaledObject").values()))["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "redis-master.redis:6379"
    (auth,) = by_kind(keda, "TriggerAuthentication").values()
    assert auth["spec"]["secretTargetRef"][0] == {
        "parameter": "password",
        "name": "mg-modgate-env",
        "key": "REDIS_PASSWORD",
    }


def test_a_redis_url_with_the_embedded_redis_on_or_no_redis_at_all_is_refused():
    with pytest.raises(helm.HelmError, match=r"redis\.enabled=false"):
        render({"secrets": {"redisUrl": "redis://elsewhere:6379/0"}})
    with pytest.raises(helm.HelmError, match="needs a Redis"):
        render({"redis": {"enabled": False}})
    with pytest.raises(helm.HelmError, match=r"keda\.address"):
        render({**BASE, "keda": {"enabled": True}})
    chart = helm.Chart.load(str(CHART))
    for bad in ({"enabld": True}, {"maxmemory": "lots"}, {"persistence": {"size": "8Gi", "sise": "1"}}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"redis": bad})


# -- worker.device=cpu ------------------------------------------------------------------


def test_cpu_worker_has_no_gpu_anywhere_and_no_split_shape():
    values = helm.parse_set_string("worker.device=cpu")  # the documented --set
    assert values == {"worker": {"device": "cpu"}}
    for extra in (
        {},
        {"inference": {"enabled": True, "ingestProcesses": 3}, "serviceMonitor": {"enabled": True}},
    ):
        docs = render({**values, **extra})
        text = json.dumps(docs)
        assert "nvidia.com/gpu" not in text  # no request, no toleration, no node selector
        assert "MODGATE_INFERENCE" not in text and "inference-socket" not in text and "ingest-" not in text
        pod = by_kind(docs, "Deployment")["mg-modgate-worker"]["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "worker" and c["args"] == ["worker", "--queues", "modgate"]
        env = env_of(c)
        assert env["MODGATE_RUNTIME__DEVICE"] == "cpu" and env["NVIDIA_VISIBLE_DEVICES"] == "void"
        assert Settings.model_validate({"runtime": {"device": env["MODGATE_RUNTIME__DEVICE"]}})
        assert c["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}}
        assert "tolerations" not in pod and "nodeSelector" not in pod and "affinity" not in pod
    # GPU node placement the user gave is dropped with the GPU; CPU placement is its own value
    docs = render(
        {
            **VALUE_SETS["examples-aws"],
            "worker": {"device": "cpu", "cpu": {"nodeSelector": {"pool": "cpu"}}},
        }
    )
    pod = by_kind(docs, "Deployment")["mg-modgate-worker"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu"} and "nvidia.com/gpu" not in json.dumps(docs)
    with pytest.raises(helm.HelmValuesError):
        helm.Chart.load(str(CHART)).validate_schema({"worker": {"device": "cuda"}})


# -- the review console -----------------------------------------------------------------


def console_objects(docs):
    return [d for d in docs if d["metadata"]["name"].endswith("-console")]


def test_console_is_off_by_default():
    assert not console_objects(render({}))
    assert helm.Chart.load(str(CHART)).values["console"]["enabled"] is False


def test_console_deployment_service_ingress_with_tokens_from_a_secret():
    docs = render(VALUE_SETS["console"])
    deployment = by_kind(docs, "Deployment")["mg-modgate-console"]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/modgate/modgate-console:0.1.0"
    assert c["command"] == ["python", "-m", "console"]
    assert c["args"] == ["--host", "0.0.0.0", "--port", "8080"]
    assert c["ports"] == [{"name": "http", "containerPort": 8080}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["livenessProbe"]["tcpSocket"] == {"port": "http"}  # Redis down: unready, not restarted

    # tokens and session key from the generated Secret, which the settings accept
    secret = by_kind(docs, "Secret")["mg-modgate-console"]["stringData"]
    assert env_entry(c, "MODGATE_CONSOLE__TOKENS")["valueFrom"]["secretKeyRef"] == {
        "name": "mg-modgate-console",
        "key": "MODGATE_CONSOLE__TOKENS",
    }
    assert env_entry(c, "MODGATE_CONSOLE__SESSION_SECRET")["valueFrom"]["secretKeyRef"]["key"] == (
        "MODGATE_CONSOLE__SESSION_SECRET"
    )
    console = ConsoleSettings.model_validate(
        {"tokens": json.loads(secret["MODGATE_CONSOLE__TOKENS"]), "trust_proxy_header": "false"}
    )
    assert list(console.tokens) == ["admin"] and len(console.tokens["admin"].get_secret_value()) >= 32
    assert env_of(c)["MODGATE_CONSOLE__TRUST_PROXY_HEADER"] == "false"

    # Redis, S3 credentials and settings as the worker gets them
    worker = by_kind(docs, "Deployment")["mg-modgate-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert env_entry(c, "MODGATE_REDIS__URL") == env_entry(worker, "MODGATE_REDIS__URL")
    assert c["envFrom"] == worker["envFrom"] and env_of(c)["MODGATE_CONFIG"] == "/etc/modgate/modgate.yaml"

    # small, non-root, read-only root filesystem, no GPU
    sc = c["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert "nvidia.com/gpu" not in json.dumps(deployment) and c["resources"]["requests"]["cpu"] == "50m"

    service = by_kind(docs, "Service")["mg-modgate-console"]
    assert matches({"matchLabels": service["spec"]["selector"]}, pod_labels(deployment))
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    ingress = by_kind(docs, "Ingress")["mg-modgate-console"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "review.acme.example"
    assert rule["http"]["paths"][0]["backend"]["service"] == {
        "name": "mg-modgate-console",
        "port": {"name": "http"},
    }
    assert ingress["spec"]["tls"][0]["secretName"] == "review-tls"
    policy = by_kind(docs, "NetworkPolicy")["mg-modgate-console"]
    assert matches(policy["spec"]["podSelector"], pod_labels(deployment))
    assert "mg-modgate-console" in by_kind(docs, "PodDisruptionBudget")
    assert "review.acme.example" in render_notes(VALUE_SETS["console"])


def render_notes(values):
    chart = helm.Chart.load(str(CHART))
    rendered = chart.render(values, name="mg", namespace="moderation", is_install=True)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def test_console_notes_say_how_to_read_the_admin_token():
    notes = render_notes({"console": {"enabled": True}})
    assert "kubectl get secret mg-modgate-console -n moderation" in notes
    assert "MODGATE_CONSOLE__TOKENS" in notes and '"admin"' in notes
    assert "port-forward" in notes


def test_console_existing_secret_and_proxy_header():
    docs = render(VALUE_SETS["console-managed-redis"])
    assert "mg-modgate-console" not in by_kind(docs, "Secret")
    (c,) = by_kind(docs, "Deployment")["mg-modgate-console"]["spec"]["template"]["spec"]["containers"]
    assert env_entry(c, "MODGATE_CONSOLE__TOKENS")["valueFrom"]["secretKeyRef"]["name"] == "reviewers"
    assert "MODGATE_REDIS__URL" not in {e["name"] for e in c["env"]}  # the managed one, from envFrom
    # Trusting X-Forwarded-User needs the console reachable from the auth proxy alone.
    with pytest.raises(helm.HelmError, match="trustProxyHeader"):
        render({"console": {"enabled": True, "trustProxyHeader": True}})
    proxy = [{"podSelector": {"matchLabels": {"app": "oauth2-proxy"}}}]
    docs = render({"console": {"enabled": True, "trustProxyHeader": True, "networkPolicy": {"from": proxy}}})
    (c,) = by_kind(docs, "Deployment")["mg-modgate-console"]["spec"]["template"]["spec"]["containers"]
    assert env_of(c)["MODGATE_CONSOLE__TRUST_PROXY_HEADER"] == "true"
    (rule,) = by_kind(docs, "NetworkPolicy")["mg-modgate-console"]["spec"]["ingress"]
    assert rule["from"] == proxy
    for doc in docs:
        if doc["kind"] not in ("PrometheusRule",):
            kubernetes_validate.validate(doc, KUBE, strict=True)
    chart = helm.Chart.load(str(CHART))
    for bad in ({"trustProxyHeaders": True}, {"ingress": {"enabled": True, "hostname": "x"}}, {"port": 0}):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({"console": {"enabled": True, **bad}})


# -- observability ----------------------------------------------------------------------

METRIC_CALL = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|CounterMetricFamily|GaugeMetricFamily|HistogramMetricFamily)"
    r"\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\""
)
PROMETHEUS_OWN = {"up"}  # set by Prometheus on every scrape target


def exported_metrics():
    """The series names the code exports (prometheus_client's suffixes added)."""
    names = set()
    for package in ("modgate", "worker", "producers", "console"):
        for path in (REPO / package).rglob("*.py"):
            for kind, name in METRIC_CALL.findall(path.read_text()):
                if kind.startswith("Counter"):
                    base = name.removesuffix("_total")
                    names |= {base + "_total"}
                elif kind.startswith(("Histogram", "Summary")):
                    names |= {name + "_bucket", name + "_sum", name + "_count"}
                else:
                    names.add(name)
    return names


def metric_names(expr):
    """Metric names an expression selects: every ``name{`` and every ``modgate_*`` token."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr)) | set(
        re.findall(r"\bmodgate_[a-zA-Z0-9_:]*", expr)
    )


def test_the_metric_scan_finds_the_workers_metrics():
    exported = exported_metrics()
    assert {
        "modgate_verdicts_total",
        "modgate_errors_total",
        "modgate_webhook_deliveries_total",
        "modgate_messages_total",
        "modgate_queue_depth",
        "modgate_stage_seconds_bucket",
    } <= exported
    assert "modgate_dead_letters" not in exported and not metric_names("rate(x[5m])")


def test_grafana_dashboard_configmap_parses_and_uses_exported_metrics():
    docs = render(VALUE_SETS["monitoring"])
    cm = by_kind(docs, "ConfigMap")["mg-modgate-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["modgate.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 8 and dashboard["uid"] and dashboard["title"]
    exported = exported_metrics() | PROMETHEUS_OWN
    used = set().union(*map(metric_names, exprs))
    assert used <= exported, used - exported
    assert {"modgate_verdicts_total", "modgate_queue_depth", "modgate_webhook_deliveries_total"} <= used
    # the sidecar label is configurable, and the ConfigMap can go where Grafana looks
    docs = render(
        {
            "grafanaDashboard": {
                "enabled": True,
                "labelKey": "dash",
                "labelValue": "yes",
                "namespace": "monitoring",
            }
        }
    )
    cm = by_kind(docs, "ConfigMap")["mg-modgate-dashboard"]
    assert cm["metadata"]["labels"]["dash"] == "yes" and cm["metadata"]["namespace"] == "monitoring"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]


def outcomes_in_code():
    """The ``outcome`` label values the code can set, per metric."""
    source = (REPO / "worker" / "delivery" / "webhooks.py").read_text()
    (literal,) = re.findall(r"^Outcome = Literal\[(.*?)\]", source, re.M)
    service = (REPO / "worker" / "service" / "service.py").read_text()
    return {
        "modgate_webhook_deliveries_total": set(re.findall(r'"(\w+)"', literal))
        | set(re.findall(r'WEBHOOKS\.labels\("(\w+)"\)', service)),
        "modgate_messages_total": set(re.findall(r'MESSAGES\.labels\("(\w+)"\)', service)),
    }


def test_prometheus_rule_alerts_only_on_exported_metrics():
    docs = render(VALUE_SETS["monitoring"])
    (rule,) = by_kind(docs, "PrometheusRule").values()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert {
        "ModgateQueueDepthGrowing",
        "ModgateDeadLettersGrowing",
        "ModgateErrorVerdictRate",
        "ModgateWorkerDown",
        "ModgateWebhookFailureRate",
        "ModgateReviewBacklog",
        "ModgateReviewVerdictsTrimmed",
    } <= set(alerts)
    exported = exported_metrics() | PROMETHEUS_OWN
    outcomes = outcomes_in_code()
    for name, alert in alerts.items():
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert alert["labels"]["severity"] in ("warning", "critical") and alert["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "0m")), name
        used = metric_names(alert["expr"])
        assert used and used <= exported, (name, used - exported)
        assert alert["expr"].count("(") == alert["expr"].count(")"), name
        for metric, values in re.findall(r'(modgate_\w+)\{[^}]*outcome=~?"([^"]+)"', alert["expr"]):
            assert set(values.split("|")) <= outcomes[metric], (name, metric, values)
        # Prometheus's own templating survives Helm's
        for text in alert["annotations"].values():
            assert all(t.startswith("{{ $") for t in re.findall(r"\{\{[^}]*\}\}", text)), text
    # the release's series: its namespace and the chart's ServiceMonitor jobs
    assert 'namespace="moderation"' in alerts["ModgateErrorVerdictRate"]["expr"]
    assert 'decision="error"' in alerts["ModgateErrorVerdictRate"]["expr"]
    # the heartbeat: no worker target up, named as the ServiceMonitor scrapes it
    down = alerts["ModgateWorkerDown"]["expr"]
    assert down.startswith("absent(up{") and '"mg-modgate-worker-metrics"' in down
    assert "mg-modgate-worker-metrics" in by_kind(docs, "Service")
    assert "modgate_queue_depth" in alerts["ModgateQueueDepthGrowing"]["expr"]


def test_an_alert_on_a_metric_nobody_exports_would_fail():
    exported = exported_metrics() | PROMETHEUS_OWN
    assert not metric_names('sum(modgate_dead_letters{namespace="x"}) > 0') <= exported
    assert not metric_names("rate(modgate_worker_heartbeat_total[5m])") <= exported


def test_monitoring_is_off_by_default_and_schema_checked():
    docs = render({})
    assert not by_kind(docs, "PrometheusRule") and "mg-modgate-dashboard" not in by_kind(docs, "ConfigMap")
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema({"prometheusRule": {"enabled": True, "thresholds": {"errorRatio": 0.1}}})
    for bad in (
        {"prometheusRule": {"enabled": True, "thresholds": {"errorRatio": 5}}},
        {"prometheusRule": {"enable": True}},
        {"grafanaDashboard": {"labelKey": ""}},
    ):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)


def test_values_file_documents_every_new_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["redis"]["enabled"] is True and values["worker"]["device"] == "gpu"
    assert values["console"]["image"] if "image" in values["console"] else values["image"]["console"]
    assert values["grafanaDashboard"]["enabled"] is False and values["prometheusRule"]["enabled"] is False
