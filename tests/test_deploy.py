"""The container recipe and the deployment manifests: Dockerfile, .dockerignore, scripts/install.sh,
deploy/kserve/*.yaml and deploy/kubernetes/zfserve.yaml.

Every manifest validates strictly (an unknown or misspelled field, or a value of the wrong type, fails):
Kubernetes' own types against the JSON schemas that kubernetes-validate bundles, KServe's resources against the
model classes of the ``kserve`` package, and a deliberately broken copy of each must fail, which shows that the
validators can. Then the ports, paths and flags must agree with ``zfserve serve``'s parser and with each other.
No cluster, no Docker and no network are needed (the image build itself is exercised by scripts/install.sh).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from zfserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SERVING_RUNTIME = ROOT / "deploy" / "kserve" / "servingruntime.yaml"
INFERENCE_SERVICE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
PLAIN = ROOT / "deploy" / "kubernetes" / "zfserve.yaml"
# The Kubernetes release whose schemas the manifests must satisfy (gRPC probes are GA since 1.27).
K8S_VERSION = "1.30"
# Kubernetes' default terminationGracePeriodSeconds, which KServe's pods get unless told otherwise.
DEFAULT_GRACE_S = 30


def load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def one(path: Path) -> dict:
    (doc,) = load(path)
    return doc


def plain(kind: str) -> dict:
    (doc,) = [d for d in load(PLAIN) if d["kind"] == kind]
    return doc


# ------------------------------------------------------------------------------------------- Kubernetes types
def k8s_error(doc: dict) -> str | None:
    """Why the resource fails Kubernetes' strict schema (additionalProperties: false), or None."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{doc['kind']} {'.'.join(map(str, exc.path))}: {exc.message}"
    return None


def runtime_as_pod(runtime: dict) -> dict:
    """The ServingRuntime's containers and volumes as a Pod, so the core schema checks them too."""
    spec = runtime["spec"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": runtime["metadata"]["name"]},
            "spec": {"containers": spec["containers"], "volumes": spec.get("volumes", [])}}


def test_the_schemas_of_the_target_release_are_bundled():
    bundled = {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    assert K8S_VERSION in bundled, f"this kubernetes-validate bundles the schemas of {sorted(bundled)} only"


def test_kubernetes_manifests_validate_strictly():
    docs = load(PLAIN) + [runtime_as_pod(one(SERVING_RUNTIME))]
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "Pod"]
    assert [k8s_error(doc) for doc in docs] == [None, None, None]


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _container(doc: dict) -> dict:
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"]
    return spec["containers"][0]


# case: (file, kind, how to break a copy, what the error must say)
K8S_BROKEN = {
    "misspelled containerPorts": (PLAIN, "Deployment", lambda d: _rename(_container(d), "ports", "containerPorts"),
                                  "'containerPorts' was unexpected"),
    "containerPort as a string": (PLAIN, "Deployment", lambda d: _container(d)["ports"][0].update(containerPort="8001"),
                                  "containerPort: '8001' is not of type 'integer'"),
    "misspelled targetport": (PLAIN, "Service", lambda d: _rename(d["spec"]["ports"][0], "targetPort", "targetport"),
                              "'targetport' was unexpected"),
    "probe with grpc.prot": (SERVING_RUNTIME, "ServingRuntime",
                             lambda d: _rename(d["spec"]["containers"][0]["readinessProbe"]["grpc"], "port", "prot"),
                             "readinessProbe.grpc: 'port' is a required property"),
}


@pytest.mark.parametrize("case", sorted(K8S_BROKEN))
def test_the_kubernetes_validator_rejects_a_broken_manifest(case):
    path, kind, breakage, expected = K8S_BROKEN[case]
    (doc,) = [copy.deepcopy(d) for d in load(path) if d["kind"] == kind]
    breakage(doc)
    assert expected in (k8s_error(runtime_as_pod(doc) if kind == "ServingRuntime" else doc) or "passed")


# ----------------------------------------------------------------------------------------------- KServe types
KSERVE_TYPES = {("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
                ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService"}

# Runs in a child process: kserve registers the inference.* protobuf messages that tritonclient.grpc (imported by
# other tests) registers too, and the two cannot share one process. The generated model classes declare each
# field's JSON name (attribute_map) and type (openapi_types); `build` walks a manifest through them, refusing any
# key a class lacks and any value of the wrong type, and constructing each object checks its required fields.
# Serializing the result back (as KServeClient would send it) must then return every value given: nothing was
# dropped or coerced on the way.
KSERVE_CHECK = r"""
import json, re, sys
import kserve.models
import kubernetes.client
from kserve.api_client import ApiClient   # what KServeClient uses to send a resource to the API server

SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float)}

def build(value, kind, path):
    # kserve's classes spell containers list[T] and dict(str, T); the kubernetes client's, List[T] and Dict[str, T].
    if m := re.fullmatch(r"[lL]ist\[(.+)\]", kind):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        return [build(v, m[1], f"{path}[{i}]") for i, v in enumerate(value)]
    if m := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", kind):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return {k: build(v, m[1] or m[2], f"{path}.{k}") for k, v in value.items()}
    if kind == "object":
        return value
    if kind in SCALARS:
        if not isinstance(value, SCALARS[kind]) or isinstance(value, bool) != (kind == "bool"):
            raise ValueError(f"{path}: expected {kind}, got {value!r}")
        return value
    cls = getattr(kserve.models, kind, None) or getattr(kubernetes.client, kind)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a {kind} mapping, got {value!r}")
    fields = {key: attr for attr, key in cls.attribute_map.items()}
    for key in value:
        if key not in fields:
            raise ValueError(f"{path}: {kind} has no field {key!r}")
    return cls(**{fields[k]: build(v, cls.openapi_types[fields[k]], f"{path}.{k}") for k, v in value.items()})

def survives(given, back):
    # Every value given comes back, same type; a default the class adds (ModelSpec's name: "") is fine.
    if isinstance(given, dict):
        return isinstance(back, dict) and all(k in back and survives(v, back[k]) for k, v in given.items())
    if isinstance(given, list):
        return isinstance(back, list) and len(given) == len(back) and all(map(survives, given, back))
    return type(given) is type(back) and given == back

results = []
for kind, doc in json.load(sys.stdin):
    try:
        back = ApiClient().sanitize_for_serialization(build(doc, kind, doc["kind"]))
        results.append(None if survives(doc, back) else f"the round trip through {kind} lost a value: {back!r}")
    except Exception as exc:
        results.append(f"{type(exc).__name__}: {exc}")
json.dump(results, sys.stdout)
"""


def _model(doc: dict) -> dict:
    return doc["spec"]["predictor"]["model"]


# case: (file, how to break a copy, what the error must say)
KSERVE_BROKEN = {
    "misspelled containerPorts": (SERVING_RUNTIME, lambda d: _rename(d["spec"]["containers"][0], "ports",
                                                                     "containerPorts"),
                                  "V1Container has no field 'containerPorts'"),
    "autoSelect as a string": (SERVING_RUNTIME, lambda d: d["spec"]["supportedModelFormats"][0].update(
        autoSelect="true"), "autoSelect: expected bool"),
    "misspelled storageURI": (INFERENCE_SERVICE, lambda d: _rename(_model(d), "storageUri", "storageURI"),
                              "V1beta1ModelSpec has no field 'storageURI'"),
    "minReplicas as a string": (INFERENCE_SERVICE, lambda d: d["spec"]["predictor"].update(minReplicas="1"),
                                "minReplicas: expected int"),
    "container without a name": (SERVING_RUNTIME, lambda d: d["spec"]["containers"][0].pop("name"), "name"),
    "explainer's misspelled containers": (INFERENCE_SERVICE, lambda d: _rename(d["spec"]["explainer"], "containers",
                                                                              "container"),
                                          "V1beta1ExplainerSpec has no field 'container'"),
}


@pytest.fixture(scope="module")
def kserve_errors() -> dict[str, str | None]:
    """Why each KServe manifest, and each broken copy in KSERVE_BROKEN, fails the check (None: it passes)."""
    docs = {path.name: one(path) for path in (SERVING_RUNTIME, INFERENCE_SERVICE)}
    for case, (path, breakage, _) in KSERVE_BROKEN.items():
        docs[case] = copy.deepcopy(one(path))
        breakage(docs[case])
    payload = [(KSERVE_TYPES[doc["apiVersion"], doc["kind"]], doc) for doc in docs.values()]
    done = subprocess.run([sys.executable, "-c", KSERVE_CHECK], input=json.dumps(payload), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return dict(zip(docs, json.loads(done.stdout)))


def test_kserve_manifests_validate_strictly(kserve_errors):
    assert kserve_errors[SERVING_RUNTIME.name] is None
    assert kserve_errors[INFERENCE_SERVICE.name] is None


@pytest.mark.parametrize("case", sorted(KSERVE_BROKEN))
def test_the_kserve_validator_rejects_a_broken_manifest(kserve_errors, case):
    assert KSERVE_BROKEN[case][2] in (kserve_errors[case] or "passed")


# ------------------------------------------------------------------------------------- agreement with the CLI
def serve_args(args: list[str]) -> argparse.Namespace:
    """``zfserve ARGS`` as the CLI reads them: it must be ``serve``, and every flag one that it declares
    exactly (argparse would also take an abbreviation)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = sub.choices[args[0]]._option_string_actions
    for arg in args[1:]:
        if arg.startswith("-"):
            assert arg.split("=", 1)[0] in flags, f"zfserve {args[0]} has no flag {arg}"
    try:
        return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"zfserve rejects {args}")


def cpu_request(container: dict) -> int:
    return int(container["resources"]["requests"]["cpu"])


def assert_non_root(*contexts: dict) -> None:
    merged = {k: v for c in contexts for k, v in c.items()}
    assert merged["runAsNonRoot"] is True and merged["runAsUser"] != 0
    assert merged["allowPrivilegeEscalation"] is False


def assert_cache_is_writable(container: dict) -> None:
    """With a read-only root filesystem, ZFSERVE_CACHE_DIR (the ONNX export cache) must be a mounted volume."""
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ZFSERVE_CACHE_DIR"] in {m["mountPath"] for m in container["volumeMounts"]}


def test_the_serving_runtime_matches_zfserve_serve():
    runtime = one(SERVING_RUNTIME)
    assert (runtime["apiVersion"], runtime["kind"], runtime["metadata"]["name"]) == (
        "serving.kserve.io/v1alpha1", "ServingRuntime", "zfserve")
    spec = runtime["spec"]
    assert {"name": "zfserve", "version": "1", "autoSelect": True} in spec["supportedModelFormats"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    args = serve_args(container["args"])
    assert (args.host, args.port, args.model_repository) == ("0.0.0.0", 8081, "/mnt/models")
    assert container["ports"] == [{"name": "h2c", "containerPort": args.port, "protocol": "TCP"}]
    assert container["readinessProbe"]["grpc"] == {"port": args.port}
    live = container["livenessProbe"]
    assert live["grpc"] == {"port": args.port}
    # No restart before a model load (10-30 s) could have finished, with room to spare.
    assert live["initialDelaySeconds"] + live["periodSeconds"] * live["failureThreshold"] >= 60
    assert args.threads == cpu_request(container)
    assert args.shutdown_grace_s < DEFAULT_GRACE_S
    assert_non_root(container["securityContext"])
    assert_cache_is_writable(container)
    assert {m["name"] for m in container["volumeMounts"]} <= {v["name"] for v in spec["volumes"]}


def test_the_inference_service_selects_the_runtime():
    runtime, service = one(SERVING_RUNTIME), one(INFERENCE_SERVICE)
    assert (service["apiVersion"], service["kind"], service["metadata"]["name"]) == (
        "serving.kserve.io/v1beta1", "InferenceService", "zfnet-demo")
    model = _model(service)
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    formats = [{k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]]
    assert model["modelFormat"] in formats
    assert re.fullmatch(r"(pvc|s3|gs|https?)://\S+", model["storageUri"])
    args = serve_args(runtime["spec"]["containers"][0]["args"])
    assert cpu_request(model) == args.threads


def test_the_explainer_serves_kserve_v1_from_the_predictors_models():
    """The explainer component: zfserve serving KServe's v1 HTTP protocol on KServe's port, from the same PVC the
    predictor's storageUri names, answering to the service's host name, probed on its health routes."""
    service = one(INFERENCE_SERVICE)
    explainer = service["spec"]["explainer"]
    (container,) = explainer["containers"]
    assert container["name"] == "kserve-container"
    args = serve_args(container["args"])
    assert (args.host, args.http_port, args.allowed_hosts) == ("0.0.0.0", 8080, "*")
    assert container["ports"] == [{"name": "http1", "containerPort": args.http_port, "protocol": "TCP"}]
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": args.http_port}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in explainer["volumes"]}
    assert set(mounts) <= set(volumes)
    models = mounts["models"]
    assert models["mountPath"] == args.model_repository and models["readOnly"] is True
    claim, path = re.fullmatch(r"pvc://([^/]+)/(.+)", _model(service)["storageUri"]).groups()
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim and models["subPath"] == path
    assert_non_root(container["securityContext"])
    assert_cache_is_writable(container)
    assert k8s_error({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "explainer"},
                      "spec": {"containers": [container], "volumes": explainer["volumes"]}}) is None


def test_the_plain_deployment_matches_zfserve_serve():
    deployment, service = plain("Deployment"), plain("Service")
    pod = deployment["spec"]["template"]
    labels = deployment["spec"]["selector"]["matchLabels"]
    assert labels.items() <= pod["metadata"]["labels"].items() and service["spec"]["selector"] == labels
    (container,) = pod["spec"]["containers"]
    args = serve_args(container["args"])
    # The embedded demo model: no --model, no --model-repository.
    assert (args.host, args.port, args.model, args.model_repository) == ("0.0.0.0", 8001, None, None)
    assert container["ports"] == [{"name": "grpc", "containerPort": args.port, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": args.port}, probe
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("grpc", args.port, args.port)
    # SIGKILL comes terminationGracePeriodSeconds after the preStop hook starts: it must outlast hook + drain.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(pre_stop[1]) + args.shutdown_grace_s
    assert args.threads == cpu_request(container)
    assert_non_root(pod["spec"]["securityContext"], container["securityContext"])
    assert_cache_is_writable(container)


# ------------------------------------------------------------------------------------------------ Dockerfile
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped, ARG defaults substituted."""
    steps, pending, defaults = [], "", {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        pending = ""
        rest = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m[1], m[0]), rest.strip())
        if word.upper() == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name] = value
        steps.append((word.upper(), rest))
    return steps


def exec_form(text: str) -> list[str]:
    assert text.startswith("["), f"use the exec (JSON) form: {text}"
    return json.loads(text)


def test_the_dockerfile_installs_with_the_script_and_serves_on_its_exposed_port():
    steps = dockerfile()
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    # Two stages on the same image: the copied virtualenv links to the builder's interpreter.
    assert bases == ["python:3.11-slim", "python:3.11-slim"]
    assert [rest for word, rest in steps if word == "RUN" and "install.sh" in rest] == [
        "bash scripts/install.sh /opt/zfserve"]
    assert "--from=builder /opt/zfserve /opt/zfserve" in [rest for word, rest in steps if word == "COPY"]
    assert any(word == "ENV" and "PATH=/opt/zfserve/bin:$PATH" in rest for word, rest in steps)
    user = [rest for word, rest in steps if word == "USER"][-1]
    assert user.split(":")[0] not in {"root", "0"}
    (expose,) = [int(rest) for word, rest in steps if word == "EXPOSE"]
    (entrypoint,) = [exec_form(rest) for word, rest in steps if word == "ENTRYPOINT"]
    (cmd,) = [exec_form(rest) for word, rest in steps if word == "CMD"]
    (healthcheck,) = [rest for word, rest in steps if word == "HEALTHCHECK"]
    assert entrypoint == ["zfserve"]
    args = serve_args(cmd)
    assert (args.host, args.port) == ("0.0.0.0", expose)
    probe = exec_form(healthcheck.split(" CMD ", 1)[1].strip())
    assert probe[0] == "zfserve" and build_parser().parse_args(probe[1:]).command == "health"
    assert probe[1:] == ["health", "--server", f"127.0.0.1:{expose}"]
    # The image's default port is the one the KServe runtime uses.
    assert expose == one(SERVING_RUNTIME)["spec"]["containers"][0]["ports"][0]["containerPort"]


def dockerignore_excludes():
    """A function telling whether .dockerignore keeps a path (relative, with /) out of the build context:
    Docker's rules, a pattern also matching every path below a matching folder, the last match winning."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keep = line.startswith("!")
            pattern = re.escape(line.lstrip("!").strip("/"))
            pattern = pattern.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
            pattern = pattern.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            rules.append((re.compile(pattern), keep))

    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        verdict = False
        for rule, keep in rules:
            if any(rule.fullmatch(p) for p in prefixes):
                verdict = not keep
        return verdict
    return excluded


def test_the_docker_context_holds_what_pip_install_reads_and_nothing_else():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    excluded = dockerignore_excludes()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sources = sorted(set(project["tool"]["setuptools"]["package-dir"].values()))
    needed = ["pyproject.toml", project["project"]["readme"], "scripts/install.sh"]
    for folder in sources:
        needed += [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / folder).rglob("*"))
                   if p.is_file() and "__pycache__" not in p.parts and p.name != "model.onnx"]
    assert len(needed) > 20
    assert [path for path in needed if excluded(path)] == []
    left_out = [".git/HEAD", ".venv/bin/python", "tests/test_deploy.py", "docs/report-zfnet-demo/report.html",
                "zfserve/__pycache__/cli.cpython-311.pyc", "zfserve/models/zfnet-demo/model.onnx",
                "fuzz/corpus/x", "runs/demo/log.txt", "build/lib/zfserve/__init__.py",
                "zfserve.egg-info/PKG-INFO", "token.txt"]
    assert [path for path in left_out if not excluded(path)] == []


# -------------------------------------------------------------------------------------------- install script
def test_the_install_script_parses_and_explains_its_usage():
    script = ROOT / "scripts" / "install.sh"
    assert "set -euo pipefail" in script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and "PREFIX" in shown.stdout
    for bad in ([], ["--frobnicate", "/tmp/x"], ["/tmp/a", "/tmp/b"]):
        done = subprocess.run(["bash", str(script), *bad], capture_output=True, text=True)
        assert done.returncode == 2 and "usage:" in done.stderr, bad
