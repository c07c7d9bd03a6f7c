"""The deployment's files, checked in this process: the Dockerfile (what it copies and from where, its
serving stage, .dockerignore), the Kubernetes and KServe manifests (the schemas, offline, and settings that
agree with each other and with the server). Their tools and deploy/local_cluster.sh are e2e/test_deploy.py's.

No Docker engine is needed: the image is checked, not built.
"""
import glob
import json
import os
import re
import shlex

import pytest
from support import ROOT
from support.deploy import healthcheck_command, read

K8S = os.path.join(ROOT, "k8s")
SERVE_COMMAND = "gunicorn classify_server:app"


def copy_parts(args):
    """(flags, sources, destination) of a COPY or ADD."""
    words = shlex.split(args)
    flags = {w.split("=", 1)[0]: w.split("=", 1)[1] if "=" in w else "" for w in words if w.startswith("--")}
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def dockerignore_patterns():
    patterns = []
    for line in read(os.path.join(ROOT, ".dockerignore")).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def dockerignored(path, patterns):
    """Whether .dockerignore leaves `path` (relative to the context) out: a pattern matching the path or
    one of its parent folders excludes it, the last matching pattern wins (Docker's rules)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_matcher():
    patterns = dockerignore_patterns()
    assert dockerignored(".git/config", patterns)
    assert dockerignored("classify_server/__pycache__/api.cpython-311.pyc", patterns)
    assert dockerignored("tests/e2e/test_deploy.py", patterns)
    assert not dockerignored("classify_server/http_api/static/index.html", patterns)
    assert not dockerignored("model/graph.pb", patterns)  # --build-arg MODEL_PATH=model must reach it


def test_dockerfile_copies_files_that_exist_and_reach_the_context(dockerfile):
    names = [stage["name"] for stage in dockerfile]
    patterns = dockerignore_patterns()
    copied = []
    for index, stage in enumerate(dockerfile):
        for keyword, args in stage["instructions"]:
            if keyword not in ("COPY", "ADD"):
                continue
            flags, sources, _ = copy_parts(args)
            if "--from" in flags:  # an earlier stage (or a named context replacing it)
                assert flags["--from"] in names[:index], f"{keyword} {args}: no earlier stage of that name"
                continue
            assert keyword == "COPY", f"ADD {args}: use COPY for local files"
            for source in sources:
                path = os.path.join(ROOT, source)
                assert os.path.exists(path), f"COPY {source}: no such file in the repository"
                files = ([os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(path) for f in fs]
                         if os.path.isdir(path) else [source])
                needed = [f for f in files if "__pycache__" not in f and not f.endswith(".pyc")]
                assert needed, f"COPY {source}: empty"
                left_out = [f for f in needed if dockerignored(f, patterns)]
                assert not left_out, f"COPY {source}: .dockerignore leaves out {left_out}"
                copied.append(source.rstrip("/"))
    # The package as setup.py describes it, and the serving configuration.
    for needed in ("setup.py", "retrain", "classify_server", "gunicorn.conf.py"):
        assert needed in copied, f"the Dockerfile does not copy {needed}"
    # Whatever the train stage reaches through its bind mount of the context is not ignored either.
    assert not dockerignored("model", patterns) and not dockerignored("models/1/graph.pb", patterns)


def env_of(stage):
    env = {}
    for keyword, args in stage["instructions"]:
        if keyword == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def test_serving_stage(dockerfile):
    serve = dockerfile[-1]
    instructions = serve["instructions"]
    keywords = [k for k, _ in instructions]
    assert len(dockerfile) >= 2 and serve["from"] == dockerfile[0]["from"], "multi-stage, same base image"
    assert not any(k == "RUN" and "pip install" in a for k, a in instructions), "no pip in the serving stage"

    # The command is README's, run in a folder holding gunicorn.conf.py.
    cmd = json.loads([a for k, a in instructions if k == "CMD"][-1])
    assert " ".join(cmd) == SERVE_COMMAND
    assert SERVE_COMMAND in read(os.path.join(ROOT, "README.md"))
    workdir = [a for k, a in instructions if k == "WORKDIR"][-1]
    conf = [copy_parts(a) for k, a in instructions if k == "COPY" and "gunicorn.conf.py" in a]
    assert conf and conf[0][2] in ("./", workdir, workdir + "/", os.path.join(workdir, "gunicorn.conf.py"))
    assert keywords.index("WORKDIR") < keywords.index("COPY")

    # A non-root user, numeric so that Kubernetes' runAsNonRoot can check it.
    user = [a for k, a in instructions if k == "USER"][-1]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0", user

    # The model where MODEL_DIR says, and MODEL_DIR documented.
    env = env_of(serve)
    assert any(k == "COPY" and copy_parts(a)[2].rstrip("/") == env["MODEL_DIR"] for k, a in instructions)
    assert env["MODEL_DIR"] in read(os.path.join(ROOT, "README.md"))

    # The port: gunicorn's bind (HOST:PORT) is the one exposed and the one the health check asks.
    assert env["HOST"] == "0.0.0.0"
    assert [a for k, a in instructions if k == "EXPOSE"] == [env["PORT"]]
    check = healthcheck_command(dockerfile)
    assert check[0] == "python" and "/healthz" in check[-1] and "PORT" in check[-1]
    assert not any(tool in " ".join(check) for tool in ("curl", "wget")), "the slim image has neither"

    # Workers x TensorFlow threads set, not guessed from the host's cores.
    assert int(env["WEB_CONCURRENCY"]) >= 1 and int(env["TF_INTRA_OP_THREADS"]) >= 1


# --- Kubernetes --------------------------------------------------------------------------------------

def manifests():
    yaml = pytest.importorskip("yaml", reason="needs PyYAML (comes with kubernetes-validate)")
    docs = []
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            docs += [(os.path.basename(path), doc) for doc in yaml.safe_load_all(f) if doc]
    assert docs, "no manifests in k8s/"
    return docs


def kubernetes_validate():
    return pytest.importorskip("kubernetes_validate",
                               reason="needs kubernetes-validate: pip install kubernetes-validate (`test` extra)")


@pytest.mark.parametrize("version", ["1.25.0", "latest"])
def test_manifests_match_the_kubernetes_schemas(version):
    kv = kubernetes_validate()
    from kubernetes_validate.utils import latest_version
    version = latest_version() if version == "latest" else version
    kinds = set()
    for name, doc in manifests():
        try:
            kv.validate(doc, version, strict=True)  # strict: an unknown (misspelled) field fails too
        except Exception as exc:
            pytest.fail(f"k8s/{name} ({doc.get('kind')}) against Kubernetes {version}: {exc}")
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= kinds


def test_schema_validation_is_not_a_no_op():
    kv = kubernetes_validate()
    from kubernetes_validate.utils import latest_version
    deployment = by_kind()["Deployment"]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, latest_version(), strict=True)


def by_kind():
    return {doc["kind"]: doc for _, doc in manifests()}


def quantity(value):
    """A Kubernetes quantity as a number: cores for cpu, bytes for memory."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    return float(match.group(1)) * units.get(match.group(2), 1)


# Peak memory measured with THREADS=4 requests of MAX_PARTS=32 images at once (README): the TensorFlow
# libraries once per pod, then each worker's model and activations (mobilenet_v2, the image's default).
POD_BASE_BYTES = 0.5 * 2**30
WORKER_PEAK_BYTES = 1.0 * 2**30


def test_deployment_settings_agree(dockerfile):
    docs = by_kind()
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    image_env = env_of(dockerfile[-1])

    # The image's command (README's), not another.
    assert "command" not in container and "args" not in container

    # cpu: workers x TensorFlow threads = the cores requested = the limit.
    workers, tf_threads = int(env["WEB_CONCURRENCY"]), int(env["TF_INTRA_OP_THREADS"])
    requests_, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert quantity(requests_["cpu"]) == quantity(limits["cpu"]) == workers * tf_threads
    assert int(env["THREADS"]) >= 1
    # memory: enough for every worker at its peak, requested in full (no overcommit, no OOM kill).
    assert quantity(requests_["memory"]) == quantity(limits["memory"])
    assert quantity(limits["memory"]) >= POD_BASE_BYTES + workers * WORKER_PEAK_BYTES

    # Probes on the image's port.
    (port,) = container["ports"]
    assert str(port["containerPort"]) == image_env["PORT"]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        assert container[probe]["httpGet"]["path"] == path, probe
        assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"]), probe
    # The startup probe outlasts a slow model load before the liveness probe may restart the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120

    # Graceful termination: preStop, then gunicorn's GRACEFUL_TIMEOUT for requests in flight, which is at
    # least as long as the slowest request (TIMEOUT, the proxies' read timeout too).
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    graceful, timeout = int(env["GRACEFUL_TIMEOUT"]), int(env["TIMEOUT"])
    assert graceful >= timeout
    assert pod["terminationGracePeriodSeconds"] > pre_stop + graceful

    # The model: baked in where the image puts it.
    assert env["MODEL_DIR"] == image_env["MODEL_DIR"]

    # Non-root as the image's user; a writable /tmp under a read-only root.
    uid = dockerfile[-1]["instructions"]
    image_uid = int([a for k, a in uid if k == "USER"][-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == image_uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])

    # Labels, selectors and names that find each other.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert all(p["targetPort"] in (port["name"], port["containerPort"]) for p in service["spec"]["ports"])
    hpa = docs["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    if "PodDisruptionBudget" in docs:
        assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --- KServe ---------------------------------------------------------------------------------------------

def kserve_manifests():
    yaml = pytest.importorskip("yaml", reason="needs PyYAML (comes with kubernetes-validate)")
    docs = {}
    for path in sorted(glob.glob(os.path.join(K8S, "kserve", "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            docs.update({doc["kind"]: doc for doc in yaml.safe_load_all(f) if doc})
    return docs


def test_kserve_runtime_container_matches_the_kubernetes_schemas():
    """KServe's CRDs have no schema here; the runtime's container is a Kubernetes Container, validated as one."""
    kv = kubernetes_validate()
    from kubernetes_validate.utils import latest_version
    docs = kserve_manifests()
    assert set(docs) == {"ServingRuntime", "InferenceService"}
    assert docs["ServingRuntime"]["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert docs["InferenceService"]["apiVersion"] == "serving.kserve.io/v1beta1"
    (container,) = docs["ServingRuntime"]["spec"]["containers"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-runtime"},
           "spec": {"containers": [container]}}
    kv.validate(pod, latest_version(), strict=True)


def test_kserve_runtime_agrees_with_the_deployment_and_the_server(flask_app):
    docs = kserve_manifests()
    runtime, service = docs["ServingRuntime"], docs["InferenceService"]
    (container,) = runtime["spec"]["containers"]
    deployment = by_kind()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == deployment["image"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env["PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port] == [8080]  # KServe's port
    assert env["MODEL_DIR"] == "/mnt/models"  # where KServe's storage initializer puts storageUri
    assert container["command"][:2] == ["gunicorn", "classify_server:app"]
    assert "MODEL_NAME={{.Name}}" in container["command"]  # KServe's model name, the V2 paths' <name>
    for name in ("WEB_CONCURRENCY", "THREADS", "TF_INTRA_OP_THREADS", "TF_INTER_OP_THREADS"):
        assert env[name] == {e["name"]: e["value"] for e in deployment["env"]}[name], name
    assert container["resources"] == deployment["resources"]
    client = flask_app.test_client()
    for probe in ("readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["port"] == port and client.get(http["path"]).status_code == 200, (probe, http)
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
