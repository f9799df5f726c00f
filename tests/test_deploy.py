"""The deployment files under deploy/ are checked the way the cluster and `vllm serve` would check them.

No cluster and no network. Every YAML document under deploy/kubernetes/ validates: Kubernetes' own objects
with kubernetes-validate (strict, Kubernetes 1.33), custom resources (LeaderWorkerSet, RayCluster,
ServiceMonitor) against the openAPIV3Schema of their published CRDs in tests/data/crds/, closed to unknown
fields the way the API server prunes or rejects them (CEL `x-kubernetes-validations` rules are not
evaluated). The production-stack Helm values validate against the chart's values.schema.json, closed the
same way. Every `vllm serve` in them (a container's command and args, a `sh -c` script after the kubelet's
`$(VAR)` expansion, the command the chart builds from the values) goes through vLLM's serve parser with the
plugin loaded, and what a cluster would otherwise reveal at run time is cross-checked: STD's config, GPUs
against --tensor-parallel-size, ports, probes, /dev/shm, the model cache, Ray addresses, Services,
Prometheus scraping. Each checker also gets a known-bad example, so that one that finds nothing fails.
"""

import contextlib
import copy
import dataclasses
import io
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helpers import serve_arg_parser, shell_commands

from vllm_std.engine_checks import refused_flags

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DATA = Path(__file__).parent / "data"
MANIFESTS = sorted((DEPLOY / "kubernetes").rglob("*.yaml"))
HELM_VALUES = DEPLOY / "helm" / "production-stack-values.yaml"
CHART_TEMPLATE = DATA / "production-stack" / "deployment-vllm-multi.yaml"
KUBERNETES_VERSION = "1.33.0"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"vllm-std:{VERSION}"
"""What every vLLM container runs (after a registry prefix): deploy/Dockerfile's build of this version."""
GPU = "nvidia.com/gpu"
ATTENTION_HEADS = {"Qwen/Qwen2-VL-7B-Instruct": 28}
"""`num_attention_heads` of the served models: --tensor-parallel-size must divide it."""
MIN_STARTUP_SECONDS = 20 * 60
"""How long the startup probe must wait at least: a 7B download plus load can take that long."""
CHART_CONTAINER_PORT = 8000
"""The production-stack chart's default `servingEngineSpec.containerPort` (its values.yaml)."""


# ------------------------------------------------------------------------------------------ documents


@dataclasses.dataclass(frozen=True)
class Document:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}[{self.index}]"


def documents(paths: list[Path]) -> list[Document]:
    return [
        Document(path, i, body)
        for path in paths
        for i, body in enumerate(yaml.safe_load_all(path.read_text()))
        if body is not None
    ]


# ------------------------------------------------------------------------------------------- schemas


def closed(schema: Any) -> Any:
    """A CRD (or Helm) schema as the API server applies it: an object schema that lists `properties` and
    neither allows `additionalProperties` nor sets `x-kubernetes-preserve-unknown-fields` takes no other
    field (the server prunes or rejects it; here it is an error); `x-kubernetes-int-or-string` without
    `anyOf` means integer or string, `nullable` allows null."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        key: {name: closed(s) for name, s in value.items()} if key == "properties" else closed(value)
        for key, value in schema.items()
    }
    preserve = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def load_schema(path: Path) -> dict[str, Any]:
    return closed(json.loads(path.read_text()))


CRD_SCHEMAS = {
    (api_version, kind): DATA / "crds" / f"{api_version.replace('/', '_')}_{kind}.json"
    for api_version, kind in [
        ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"),
        ("ray.io/v1", "RayCluster"),
        ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ]
}


def _jsonschema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    ]


def schema_errors(body: dict[str, Any]) -> list[str]:
    """What the API server would reject in one object (its schema only; no admission webhooks)."""
    key = (body.get("apiVersion"), body.get("kind"))
    if key in CRD_SCHEMAS:
        return _jsonschema_errors(body, load_schema(CRD_SCHEMAS[key]))
    try:
        kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}"]
    except (kubernetes_validate.SchemaNotFoundError, KeyError) as e:
        return [f"no schema for {key}: {e!r}"]
    return []


# --------------------------------------------------------------------------------- pods and commands


@dataclasses.dataclass(frozen=True)
class PodGroup:
    """Pods of one template that together with a workload's other groups serve one model instance."""

    role: str
    template: dict[str, Any]
    count: int
    injected_env: dict[str, str]
    """Variables the controller sets in every container (their values as the kubelet would see them)."""
    injected_labels: dict[str, str]


def pod_groups(body: dict[str, Any]) -> list[PodGroup]:
    """The pod templates of a workload, or none for objects that run no pods."""
    kind, name, spec = body["kind"], body["metadata"]["name"], body.get("spec", {})
    if kind == "Deployment":
        return [PodGroup("pod", spec["template"], 1, {}, {})]
    if kind == "LeaderWorkerSet":
        lwt = spec["leaderWorkerTemplate"]
        size = lwt.get("size", 1)
        env = {
            "LWS_LEADER_ADDRESS": f"{name}-0.{name}.default",  # <lws>-<group>.<lws>.<namespace>
            "LWS_GROUP_SIZE": str(size),
            "LWS_NAME": name,
        }
        labels = {"leaderworkerset.sigs.k8s.io/name": name}
        leader = lwt.get("leaderTemplate", lwt["workerTemplate"])
        return [
            PodGroup("leader", leader, 1, env, labels),
            PodGroup("worker", lwt["workerTemplate"], size - 1, env, labels),
        ]
    if kind == "RayCluster":
        labels = {"ray.io/cluster": name}
        head = PodGroup(
            "head", spec["headGroupSpec"]["template"], 1, {}, {**labels, "ray.io/node-type": "head"}
        )
        workers = [
            PodGroup("worker", g["template"], g.get("replicas", 1) * g.get("numOfHosts", 1), {}, labels)
            for g in spec.get("workerGroupSpecs", [])
        ]
        return [head, *workers]
    return []


_KUBELET_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def kubelet_expand(word: str, env: dict[str, str]) -> str:
    """`$(VAR)` in a command or argument, as the kubelet expands it from the container's environment.
    The kubelet leaves an undefined reference as it is, which is never what was meant: an error here."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(1) not in env:
            raise ValueError(f"$({match.group(1)}) is not set in the container: the kubelet leaves it as is")
        return env[match.group(1)]

    return _KUBELET_REF.sub(replace, word)


def container_env(container: dict[str, Any], group: PodGroup) -> dict[str, str]:
    """Variables with a literal value; one from a Secret or field expands to a placeholder."""
    own = {e["name"]: e.get("value", f"<{e['name']}>") for e in container.get("env", [])}
    return {**group.injected_env, **own}


def simple_commands(words: list[str]) -> list[list[str]]:
    """The commands a container runs: its words, or the simple commands of a `sh -c` / `bash -lc` script
    (leading `exec` and `VAR=value` assignments dropped)."""
    if Path(words[0]).name in ("sh", "bash") and len(words) > 2 and re.fullmatch(r"-[a-z]*c", words[1]):
        commands = shell_commands(words[3] if words[2] == "--" else words[2])
    else:
        commands = [words]
    stripped = []
    for command in commands:
        while command and (command[0] == "exec" or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0])):
            command = command[1:]
        if command:
            stripped.append(command)
    return stripped


def commands_of(container: dict[str, Any], group: PodGroup) -> list[list[str]]:
    env = container_env(container, group)
    words = [kubelet_expand(w, env) for w in [*container.get("command", []), *container.get("args", [])]]
    return simple_commands(words) if words else []


def serve_arguments(command: list[str]) -> list[str] | None:
    if len(command) >= 2 and Path(command[0]).name == "vllm" and command[1] == "serve":
        return command[2:]
    return None


def parse_serve(args: list[str], parser: Any) -> tuple[Any, list[str]]:
    """vLLM's serve parser on `[model, *flags]`: the namespace, or the error `vllm serve` would print."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(args), []
    except SystemExit:
        return None, [f"`vllm serve` rejects it: {stderr.getvalue().strip().splitlines()[-1]}"]


# ------------------------------------------------------------------------------------------- checkers


def std_config_file(model: str) -> Path:
    return ROOT / "configs" / f"{model.split('/')[-1].lower()}.json"


def namespace_errors(ns: Any, gpus: int, pods: int) -> list[str]:
    """A parsed `vllm serve` against what STD needs and what the pods provide."""
    errors = []
    spec, tuned = ns.speculative_config, std_config_file(ns.model_tag)
    if not isinstance(spec, dict) or spec.get("method") != "std":
        errors.append(f"--speculative-config is {spec!r}, not STD (or the plugin's parser type is missing)")
    elif tuned.exists() and spec != json.loads(tuned.read_text()):
        errors.append(f"--speculative-config {spec} differs from configs/{tuned.name}")
    tp = ns.tensor_parallel_size
    if tp != gpus:
        errors.append(f"--tensor-parallel-size {tp} but the pods have {gpus} GPUs ({GPU} limits)")
    if ns.model_tag in ATTENTION_HEADS and ATTENTION_HEADS[ns.model_tag] % tp:
        errors.append(f"--tensor-parallel-size {tp} does not divide {ns.model_tag}'s attention heads")
    if pods > 1 and ns.distributed_executor_backend != "ray":
        errors.append(f"{pods} pods need --distributed-executor-backend ray")
    # The engine-config refusals of docs/limits.md that a command line decides.
    errors += [f"STD refuses {flag} at start-up" for flag in refused_flags(ns)]
    return errors


def gpus_of(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def resolve_port(port: int | str, containers: list[dict[str, Any]]) -> int | None:
    """A probe's or Service's port (number or name) as the container port it reaches, None if none."""
    ports = [p for c in containers for p in c.get("ports", [])]
    if isinstance(port, str):
        return next((p["containerPort"] for p in ports if p.get("name") == port), None)
    return port if any(p["containerPort"] == port for p in ports) else None


def volume_errors(spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """/dev/shm from a memory-backed emptyDir, and HF_HOME on a mounted volume (else weights go to the
    container's writable layer and are downloaded again on every restart)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in container.get("volumeMounts", [])}
    errors = []
    if mounts.get("/dev/shm", {}).get("emptyDir", {}).get("medium") != "Memory":
        errors.append(f"{container['name']}: /dev/shm is not a Memory emptyDir")
    hf_home = next((e.get("value") for e in container.get("env", []) if e["name"] == "HF_HOME"), None)
    if hf_home is None or not any(hf_home.startswith(path.rstrip("/") + "/") for path in mounts):
        errors.append(f"{container['name']}: HF_HOME ({hf_home}) is not on a mounted volume")
    token = next((e for e in container.get("env", []) if e["name"] == "HF_TOKEN"), {})
    if not token.get("valueFrom", {}).get("secretKeyRef", {}).get("optional"):
        errors.append(f"{container['name']}: HF_TOKEN is not from an optional Secret")
    if not container["image"].endswith("/" + IMAGE):
        errors.append(f"{container['name']}: image {container['image']} is not .../{IMAGE}")
    return errors


def probe_errors(container: dict[str, Any], port: int) -> list[str]:
    errors = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind, {})
        get = probe.get("httpGet", {})
        if get.get("path") != "/health" or resolve_port(get.get("port", -1), [container]) != port:
            errors.append(f"{kind} is not an httpGet of /health on the server's port {port}")
    startup = container.get("startupProbe", {})
    waits = startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10)
    if waits < MIN_STARTUP_SECONDS:
        errors.append(f"startupProbe gives the model {waits} s to download and load")
    return errors


def scrape_errors(template: dict[str, Any], port: int) -> list[str]:
    annotations = template.get("metadata", {}).get("annotations", {})
    expected = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    wrong = {k: annotations.get(k) for k, v in expected.items() if annotations.get(k) != v}
    return [f"Prometheus annotations {wrong}, expected {expected}"] if wrong else []


@dataclasses.dataclass
class Server:
    """A workload's `vllm serve`: where it runs and how the parser read it."""

    group: PodGroup
    container: dict[str, Any]
    namespace: Any


def workload_errors(body: dict[str, Any], parser: Any) -> tuple[list[Server], list[str]]:
    """The `vllm serve` of a workload and everything about its pods that only the run would reveal."""
    groups = pod_groups(body)
    gpus = sum(gpus_of(c) * g.count for g in groups for c in g.template["spec"]["containers"])
    pods = sum(g.count for g in groups)
    servers, errors, ray_starts = [], [], []
    for group in groups:
        spec = group.template["spec"]
        for container in spec["containers"]:
            errors += volume_errors(spec, container)
            try:
                commands = commands_of(container, group)
            except ValueError as e:
                errors.append(f"{container['name']}: {e}")
                continue
            for command in commands:
                if command[:2] == ["ray", "start"]:
                    ray_starts.append((group, command))
                args = serve_arguments(command)
                if args is None:
                    if any(re.search(r"(^|/)vllm($|\.)", word) for word in command):  # vllm, .../vllm, vllm.x
                        errors.append(f"{container['name']}: not understood as `vllm serve`: {command}")
                    continue
                namespace, parse_errors = parse_serve(args, parser)
                errors += parse_errors
                if namespace is None:
                    continue
                servers.append(Server(group, container, namespace))
                errors += namespace_errors(namespace, gpus, pods)
                if resolve_port(namespace.port, [container]) != namespace.port:
                    errors.append(f"the server listens on {namespace.port}, not a container port")
                errors += probe_errors(container, namespace.port)
                errors += scrape_errors(group.template, namespace.port)
    if groups and len(servers) != 1:
        errors.append(f"expected one `vllm serve` in the workload, found {len(servers)}")
    if body["kind"] == "Deployment":
        selector = body["spec"]["selector"]["matchLabels"].items()
        if not selector <= body["spec"]["template"]["metadata"].get("labels", {}).items():
            errors.append("the Deployment's selector does not match its pod template's labels")
    errors += ray_errors(ray_starts)
    return servers, errors


def ray_errors(ray_starts: list[tuple[PodGroup, list[str]]]) -> list[str]:
    """Every `ray start --address` joins the port the head started on, at the leader's address."""
    heads, joins = [], []
    for group, command in ray_starts:
        options = dict(w.removeprefix("--").split("=", 1) for w in command[2:] if "=" in w)
        if "--head" in command:
            heads.append(options.get("port", "6379"))
        elif "address" in options:
            joins.append((group, options["address"]))
    errors = []
    for group, address in joins:
        host, _, port = address.rpartition(":")
        if port not in heads:
            errors.append(f"a {group.role} joins Ray at port {port}, the head started on {heads}")
        leader = group.injected_env.get("LWS_LEADER_ADDRESS")
        if leader is not None and host != leader:
            errors.append(f"a {group.role} joins Ray at {host}, not the leader {leader}")
    return errors


def service_errors(service: dict[str, Any], workloads: list[dict[str, Any]]) -> list[str]:
    """A Service selects the pods that run `vllm serve` and targets the port they listen on."""
    selector = service["spec"]["selector"].items()
    for workload in workloads:
        for group in pod_groups(workload):
            labels = {**group.template.get("metadata", {}).get("labels", {}), **group.injected_labels}
            if selector <= labels.items():
                containers = group.template["spec"]["containers"]
                return [
                    f"port {p.get('name')}: targetPort {p.get('targetPort')} is no container port"
                    for p in service["spec"]["ports"]
                    if resolve_port(p.get("targetPort", p["port"]), containers) is None
                ]
    return [f"the selector {dict(selector)} matches no pod template under deploy/"]


def service_monitor_errors(monitor: dict[str, Any], services: list[dict[str, Any]]) -> list[str]:
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    matched = [s for s in services if selector <= s["metadata"].get("labels", {}).items()]
    if not matched:
        return [f"the selector {dict(selector)} matches no Service under deploy/"]
    errors = []
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint.get("path") != "/metrics":
            errors.append(f"endpoint path {endpoint.get('path')} is not /metrics")
        names = {p.get("name") for s in matched for p in s["spec"]["ports"]}
        if endpoint.get("port") not in names:
            errors.append(f"endpoint port {endpoint.get('port')} is not a port of {sorted(names)}")
    return errors


# ---------------------------------------------------------------------------------- the Helm values

CHART_FLAGS = {
    "maxModelLen": "--max-model-len",
    "dtype": "--dtype",
    "tensorParallelSize": "--tensor-parallel-size",
    "maxNumSeqs": "--max-num-seqs",
    "gpuMemoryUtilization": "--gpu_memory_utilization",
    "maxLoras": "--max_loras",
    "runner": "--runner",
    "convert": "--convert",
}
"""How the chart's deployment template turns `vllmConfig` keys into `vllm serve` flags."""
CHART_UNMIRRORED = ("enableTool", "toolCallParser", "chatTemplate", "modelRevision", "raySpec")
"""modelSpec keys that change the chart's command or workload and that `chart_command` does not rebuild."""


def chart_command(model_spec: dict[str, Any]) -> list[str]:
    """The `vllm serve` arguments production-stack's deployment-vllm-multi.yaml renders for one modelSpec
    (tests/data/production-stack/, chart 0.1.12), in its order."""
    if unmirrored := [k for k in CHART_UNMIRRORED if k in model_spec]:
        raise ValueError(f"chart_command does not rebuild {unmirrored}")
    args = [model_spec["modelURL"], "--host", "0.0.0.0", "--port", str(CHART_CONTAINER_PORT)]
    if model_spec.get("enableLoRA"):
        args.append("--enable-lora")
    config = model_spec.get("vllmConfig", {})
    if unknown := set(config) - {*CHART_FLAGS, "enableChunkedPrefill", "enablePrefixCaching", "extraArgs"}:
        raise ValueError(f"chart_command does not rebuild vllmConfig {sorted(unknown)}")
    if "enableChunkedPrefill" in config:
        args.append(
            "--enable-chunked-prefill" if config["enableChunkedPrefill"] else "--no-enable-chunked-prefill"
        )
    args.append(
        "--enable-prefix-caching" if config.get("enablePrefixCaching") else "--no-enable-prefix-caching"
    )
    for key, flag in CHART_FLAGS.items():
        if key in config:
            args += [flag, str(config[key])]
    args += config.get("extraArgs", [])
    if model_spec.get("lmcacheConfig", {}).get("enabled"):
        args += ["--kv-transfer-config", '{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}']
    return args


def helm_errors(values: dict[str, Any], parser: Any) -> list[str]:
    """The values against the chart's schema, and the command and pods the chart makes of them."""
    errors = _jsonschema_errors(values, load_schema(DATA / "production-stack" / "values.schema.json"))
    engine = values.get("servingEngineSpec", {})
    specs = [m for m in engine.get("modelSpec", []) if m.get("enabled", True)]
    if not specs:
        errors.append("no enabled servingEngineSpec.modelSpec")
    for spec in specs:
        try:
            args = chart_command(spec)
        except ValueError as e:
            errors.append(str(e))
            continue
        namespace, parse_errors = parse_serve(args, parser)
        errors += parse_errors
        if namespace is not None:
            gpus = int(spec.get("requestGPU", 0)) if spec.get("requestGPUType", GPU) == GPU else 0
            errors += namespace_errors(namespace, gpus, 1)  # one Deployment pod per replica
        if "tensorParallelSize" not in spec.get("vllmConfig", {}):
            errors.append("without vllmConfig.tensorParallelSize the chart mounts no /dev/shm")
        image = f"{spec.get('repository')}:{spec.get('tag')}"
        if not image.endswith("/" + IMAGE):
            errors.append(f"image {image} is not .../{IMAGE}")
    startup = engine.get("startupProbe", {})
    if startup.get("failureThreshold", 60) * startup.get("periodSeconds", 10) < MIN_STARTUP_SECONDS:
        errors.append("servingEngineSpec.startupProbe gives the model less than 20 min to load")
    if startup.get("httpGet", {}).get("port", CHART_CONTAINER_PORT) != CHART_CONTAINER_PORT:
        errors.append("servingEngineSpec.startupProbe does not probe the container port")
    return errors


# --------------------------------------------------------------------------------- the deploy files

DOCUMENTS = documents(MANIFESTS)
WORKLOADS = [d.body for d in DOCUMENTS if pod_groups(d.body)]
SERVICES = [d.body for d in DOCUMENTS if d.body["kind"] == "Service"]


@pytest.fixture(scope="module")
def parser() -> Any:
    return serve_arg_parser()


def test_deploy_has_files_to_check() -> None:
    """Every YAML file under deploy/ is checked here, and the kinds the docs promise are there."""
    yaml_files = {*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")}
    assert yaml_files == {*MANIFESTS, HELM_VALUES}
    kinds = {d.body["kind"] for d in DOCUMENTS}
    assert {"PersistentVolumeClaim", "Deployment", "Service", "ServiceMonitor"} <= kinds
    assert {"LeaderWorkerSet", "RayCluster"} <= kinds


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.where)
def test_manifest_validates(document: Document) -> None:
    errors = schema_errors(document.body)
    assert not errors, f"{document.where} ({document.body['kind']}):\n" + "\n".join(errors)


@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: f"{w['kind']}/{w['metadata']['name']}")
def test_workload_serves_std(workload: dict[str, Any], parser: Any) -> None:
    servers, errors = workload_errors(workload, parser)
    assert not errors, "\n".join(errors)
    [server] = servers
    assert server.namespace.model_tag == "Qwen/Qwen2-VL-7B-Instruct"


def test_multi_node_workloads_use_ray_across_pods(parser: Any) -> None:
    """The multi-node manifests really span pods: TP 4 from 2 x 2 GPUs, and the LWS worker's address is
    the leader's after the kubelet's expansion of $(LWS_LEADER_ADDRESS)."""
    multi = {w["kind"]: w for w in WORKLOADS if w["kind"] in ("LeaderWorkerSet", "RayCluster")}
    assert set(multi) == {"LeaderWorkerSet", "RayCluster"}
    for workload in multi.values():
        [server] = workload_errors(workload, parser)[0]
        ns = server.namespace
        assert (ns.tensor_parallel_size, ns.distributed_executor_backend) == (4, "ray")
    [_, worker] = pod_groups(multi["LeaderWorkerSet"])
    [[*_, address, block]] = commands_of(worker.template["spec"]["containers"][0], worker)
    assert (address, block) == ("--address=vllm-std-0.vllm-std.default:6379", "--block")


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s["metadata"]["name"])
def test_service_reaches_the_server(service: dict[str, Any]) -> None:
    assert service_errors(service, WORKLOADS) == []


def test_service_monitors_scrape_metrics() -> None:
    monitors = [d.body for d in DOCUMENTS if d.body["kind"] == "ServiceMonitor"]
    assert monitors
    for monitor in monitors:
        assert service_monitor_errors(monitor, SERVICES) == []


def test_helm_values(parser: Any) -> None:
    """The values validate against the chart's schema, and the command the chart builds from them is a valid
    `vllm serve` with STD on one GPU."""
    values = yaml.safe_load(HELM_VALUES.read_text())
    assert helm_errors(values, parser) == []
    [spec] = values["servingEngineSpec"]["modelSpec"]
    assert chart_command(spec)[-2:] == ["--speculative-config", spec["vllmConfig"]["extraArgs"][-1]]


def test_chart_command_matches_the_chart_template() -> None:
    """`chart_command` rebuilds flags the stored chart template really renders, from keys it really reads."""
    template = CHART_TEMPLATE.read_text()
    for key, flag in CHART_FLAGS.items():
        assert f'"{flag}"' in template and f'hasKey . "{key}"' in template, (key, flag)
    for text in (
        '"--enable-lora"',
        '"--no-enable-prefix-caching"',
        "range .extraArgs",
        '"--kv-transfer-config"',
    ):
        assert text in template
    for key in CHART_UNMIRRORED:
        assert key in template, key


# ------------------------------------------------------------------------- the checkers can fail


SPEC = (ROOT / "configs" / "qwen2-vl-7b-instruct.json").read_text().strip()
"""The `--speculative-config` value the manifests pass, written as in configs/."""


def _single_node() -> dict[str, Any]:
    return copy.deepcopy(next(w for w in WORKLOADS if w["kind"] == "Deployment"))


def _lws() -> dict[str, Any]:
    return copy.deepcopy(next(w for w in WORKLOADS if w["kind"] == "LeaderWorkerSet"))


def _args(workload: dict[str, Any]) -> list[str]:
    return workload["spec"]["template"]["spec"]["containers"][0]["args"]


def _replace_arg(workload: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    args = _args(workload)
    args[args.index(old)] = new
    return workload


def _leader_script(workload: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    container = workload["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    assert old in container["args"][0]
    container["args"][0] = container["args"][0].replace(old, new)
    return workload


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (_replace_arg(_single_node(), "--speculative-config", "--speculative-confg"), "speculative-confg"),
        (
            _replace_arg(_single_node(), SPEC, '{"method": "std", "num_speculative_tokens": 0}'),
            "num_speculative_tokens",
        ),
        (
            _replace_arg(
                _single_node(), SPEC, '{"method": "std", "num_speculative_tokens": 6, "top_k": 512}'
            ),
            "differs from configs/qwen2-vl-7b-instruct.json",
        ),
        (_replace_arg(_single_node(), "1", "3"), "does not divide"),
        (
            _replace_arg(_single_node(), SPEC, '{"method": "ngram", "num_speculative_tokens": 4}'),
            "STD",
        ),
        (_replace_arg(_single_node(), "8000", "8080"), "listens on 8080"),
        (_leader_script(_lws(), "--tensor-parallel-size 4", "--tensor-parallel-size 2"), "4 GPUs"),
        (
            _leader_script(_lws(), " --distributed-executor-backend ray", ""),
            "need --distributed-executor-backend",
        ),
        (
            _leader_script(
                _lws(), "--tensor-parallel-size 4", "--tensor-parallel-size 2 --pipeline-parallel-size 2"
            ),
            "refuses --pipeline-parallel-size",
        ),
        (_leader_script(_lws(), "--head --port=6379", "--head --port=6380"), "the head started on ['6380']"),
        (
            _leader_script(_lws(), "exec vllm serve", "python3 -m vllm.entrypoints.openai.api_server"),
            "not understood",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_workload_is_reported(body: dict[str, Any], expected: str, parser: Any) -> None:
    errors = workload_errors(body, parser)[1]
    assert errors and expected in " ".join(errors), errors


def test_bad_pod_details_are_reported(parser: Any) -> None:
    """Probes, /dev/shm, the cache, the token, GPUs, scraping and the selector each fail when broken."""
    body = _single_node()
    spec = body["spec"]["template"]["spec"]
    container = spec["containers"][0]
    container["startupProbe"]["failureThreshold"] = 30
    container["livenessProbe"]["httpGet"]["port"] = "metrics"
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/dev/shm"]
    container["env"][0]["value"] = "/root/.cache/huggingface"
    del container["env"][1]["valueFrom"]["secretKeyRef"]["optional"]
    container["resources"]["limits"][GPU] = 2
    container["image"] = "vllm/vllm-openai:v0.32.0"
    body["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "8080"
    body["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] = "other"
    errors = " ".join(workload_errors(body, parser)[1])
    for expected in (
        "gives the model 300 s",
        "livenessProbe is not an httpGet",
        "/dev/shm",
        "HF_HOME (/root/.cache/huggingface)",
        "HF_TOKEN",
        "2 GPUs",
        "vllm/vllm-openai",
        "Prometheus annotations",
        "selector does not match",
    ):
        assert expected in errors, (expected, errors)


def test_undefined_kubelet_variable_is_reported(parser: Any) -> None:
    body = _leader_script(_lws(), "--port 8000", "--port $(SERVER_PORT)")
    assert "$(SERVER_PORT) is not set" in " ".join(workload_errors(body, parser)[1])
    group = PodGroup("pod", {}, 1, {"PORT": "80"}, {})
    assert commands_of({"command": ["a", "$(PORT)", "$$(PORT)"]}, group) == [["a", "80", "$(PORT)"]]
    assert simple_commands(["bash", "-lc", "--", "X=1 exec vllm serve M; ray start"]) == [
        ["vllm", "serve", "M"],
        ["ray", "start"],
    ]


@pytest.mark.parametrize(
    ("kind", "mutate", "expected"),  # kind: which document under deploy/ to break
    [
        ("Deployment", lambda b: b["spec"].update(replica=1), "replica"),
        ("Deployment", lambda b: b["spec"]["template"]["spec"]["containers"][0].update(ports=8000), "8000"),
        ("Service", lambda b: b["spec"]["ports"][0].update(port="http"), "http"),
        ("PersistentVolumeClaim", lambda b: b["spec"].update(accessMode=["ReadWriteOnce"]), "accessMode"),
        ("LeaderWorkerSet", lambda b: b["spec"]["leaderWorkerTemplate"].update(size="two"), "'two'"),
        ("LeaderWorkerSet", lambda b: b["spec"]["leaderWorkerTemplate"].update(sise=2), "sise"),
        (
            "LeaderWorkerSet",
            lambda b: b["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0].update(
                imagePullPolicy=1
            ),
            "imagePullPolicy",
        ),
        ("RayCluster", lambda b: b["spec"]["headGroupSpec"].update(rayStartParams=[]), "rayStartParams"),
        ("RayCluster", lambda b: b["spec"]["workerGroupSpecs"][0].update(replica=1), "replica"),
        ("ServiceMonitor", lambda b: b["spec"]["endpoints"][0].update(paht="/metrics"), "paht"),
        ("Deployment", lambda b: b.update(kind="Deploymnet"), "no schema"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_manifest_is_reported(kind: str, mutate: Any, expected: str) -> None:
    body = copy.deepcopy(next(d.body for d in DOCUMENTS if d.body["kind"] == kind))
    mutate(body)
    errors = schema_errors(body)
    assert errors and expected in " ".join(errors), errors


def test_int_or_string_and_open_objects_follow_the_crd() -> None:
    """Quantities take numbers or strings, labels (no listed properties) take any key, nothing else does."""
    body = copy.deepcopy(next(d.body for d in DOCUMENTS if d.body["kind"] == "LeaderWorkerSet"))
    container = body["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]
    container["resources"]["limits"][GPU] = "2"
    body["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["metadata"]["labels"]["any/key"] = "x"
    assert schema_errors(body) == []
    container["resources"]["limits"][GPU] = [2]
    assert schema_errors(body)
    schema = closed({"type": "object", "properties": {"a": {"x-kubernetes-int-or-string": True}}})
    assert _jsonschema_errors({"a": "1"}, schema) == [] and _jsonschema_errors({"a": 1.5, "b": 1}, schema)
    open_schema = closed({"type": "object", "properties": {}, "x-kubernetes-preserve-unknown-fields": True})
    assert _jsonschema_errors({"b": 1}, open_schema) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s.update(vllmConfg={}), "vllmConfg"),
        (lambda s: s["vllmConfig"].update(tensorParallelSize="1"), "'1' is not of type 'integer'"),
        (lambda s: s.update(enableLoRA=True), "refuses --enable-lora"),
        (lambda s: s.update(lmcacheConfig={"enabled": True}), "refuses --kv-transfer-config"),
        (lambda s: s["vllmConfig"]["extraArgs"].__setitem__(0, "--speculative-confg"), "speculative-confg"),
        (lambda s: s["vllmConfig"]["extraArgs"].__setitem__(1, '{"method":"std","top_k":0}'), "top_k"),
        (lambda s: s.update(requestGPU=2), "2 GPUs"),
        (lambda s: s["vllmConfig"].pop("tensorParallelSize"), "/dev/shm"),
        (lambda s: s.update(tag="latest"), "image"),
        (lambda s: s.update(chatTemplate="t.jinja"), "does not rebuild ['chatTemplate']"),
        (lambda s: s["vllmConfig"].update(v0="1"), "does not rebuild vllmConfig ['v0']"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_helm_model_spec_is_reported(mutate: Any, expected: str, parser: Any) -> None:
    values = yaml.safe_load(HELM_VALUES.read_text())
    mutate(values["servingEngineSpec"]["modelSpec"][0])
    errors = helm_errors(values, parser)
    assert errors and expected in " ".join(errors), errors


def test_bad_helm_probe_is_reported(parser: Any) -> None:
    values = yaml.safe_load(HELM_VALUES.read_text())
    values["servingEngineSpec"]["startupProbe"].update(failureThreshold=60, httpGet={"port": 8080})
    errors = " ".join(helm_errors(values, parser))
    assert "less than 20 min" in errors and "does not probe the container port" in errors


def test_bad_service_and_monitor_are_reported() -> None:
    service = copy.deepcopy(SERVICES[0])
    service["spec"]["ports"][0]["targetPort"] = "metrics"
    assert "targetPort metrics" in " ".join(service_errors(service, WORKLOADS))
    service["spec"]["selector"] = {"app": "nothing"}
    assert "matches no pod" in " ".join(service_errors(service, WORKLOADS))
    monitor = copy.deepcopy(next(d.body for d in DOCUMENTS if d.body["kind"] == "ServiceMonitor"))
    monitor["spec"]["endpoints"][0].update(port="web", path="/stats")
    errors = " ".join(service_monitor_errors(monitor, SERVICES))
    assert "/stats" in errors and "web" in errors
    monitor["spec"]["selector"]["matchLabels"] = {"app": "nothing"}
    assert "matches no Service" in " ".join(service_monitor_errors(monitor, SERVICES))
