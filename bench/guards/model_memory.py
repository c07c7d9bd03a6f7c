"""Guard: re-run when a model, an engine or the server changes; the memory figures the docs quote.

What each model costs in memory, in every gunicorn worker: the figures docs/operations.md's "Several models" quotes.

    .venv/bin/python -m bench.guards.model_memory [--requests 20]

Makes a MobileNetV2 and an Inception-v3 model (random weights: the same sizes as real ones), then
serves each configuration below with one worker (`gunicorn classify_server:app`, MODEL_CONFIG_FILE),
sends every model `--requests` classifications (so the sessions have run and allocated), and reads
the worker's resident memory (VmRSS) and its peak (VmHWM):

    none       the worker with a 3-class colour model of a few bytes: TensorFlow and the server alone
    mobilenet  MobileNetV2 alone
    inception  Inception-v3 alone
    both       both models in one server
    mobilenet x2  two versions of MobileNetV2 loaded at once (`latest { num_versions: 2 }`): what a hot
               reload holds while it swaps one version for the next

Each model's cost is its configuration's RSS minus `none`'s. Traffic goes to 127.0.0.1 only; every
wait is bounded; every process is ended at exit.
"""
import argparse
import http.client
import os
import shutil
import tempfile
import uuid

from bench import _common as C
from bench.guards import serve_bench


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20, help="classifications per model before reading memory")
    return p.parse_args(argv)


def config(work, name, models):
    """A model config file of {model name: (base path, version policy text)}."""
    path = os.path.join(work, f"{name}.config")
    with open(path, "w") as f:
        f.write("model_config_list {\n" + "".join(
            f'  config {{ name: "{n}" base_path: "{p}" {policy} }}\n' for n, (p, policy) in models.items()) + "}\n")
    return path


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"no {field} for process {pid}")


def classify(port, model, jpeg, count):
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"data\"; filename=\"x.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(count):
            conn.request("POST", f"/?model={model}", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"model {model} answered {response.status}")
    finally:
        conn.close()


def measure(work, name, models, jpeg, requests):
    env = serve_bench.caller_env()
    env.update(MODEL_CONFIG_FILE=config(work, name, models), WEB_CONCURRENCY="1", MODEL_POLL_SECONDS="0",
               MODEL_CONFIG_POLL_SECONDS="0", ACCESS_LOG="")
    env.pop("MODEL_DIR", None)
    process, port = C.start_gunicorn(C.ROOT, env, os.path.join(work, f"{name}.log"))
    try:
        for model in models:
            classify(port, model, jpeg, requests)
        (worker,) = C.children_of(process.pid)
        return status_kib(worker, "VmRSS") / 1024, status_kib(worker, "VmHWM") / 1024
    finally:
        C.stop(process)


def main(argv=None):
    flags = parse_args(argv)
    work = tempfile.mkdtemp(prefix="model-memory-")
    try:
        from tests.support.models import write_colour_model  # tests/ as a namespace package, from the repo root
        colour = write_colour_model(os.path.join(work, "colour"))
        built = {}
        for architecture in ("mobilenet_v2", "inception_v3"):
            folder = os.path.join(work, architecture)
            os.makedirs(folder)
            base = os.path.join(folder, "base")
            model = C.make_model(folder, architecture, 50)
            for version in (1, 2):  # two versions, for the hot-reload case
                shutil.copytree(model, os.path.join(base, str(version)))
            built[architecture] = base
        with open(serve_bench.default_image(), "rb") as f:
            jpeg = f.read()
        cases = {
            "none": {"colour": (colour, "")},
            "mobilenet": {"mobilenet": (built["mobilenet_v2"], "")},
            "inception": {"inception": (built["inception_v3"], "")},
            "both": {"mobilenet": (built["mobilenet_v2"], ""), "inception": (built["inception_v3"], "")},
            "mobilenet x2": {"mobilenet": (built["mobilenet_v2"], "model_version_policy { latest { num_versions: 2 } }")},
        }
        C.print_machine(os.cpu_count(), C.revision(), C.other_busy_processes())
        results = {}
        for name, models in cases.items():
            C.log(f"serving {name}")
            results[name] = measure(work, name, models, jpeg, flags.requests)
        base = results["none"][0]
        rows = [[name, C.fmt(rss, 0), C.fmt(peak, 0), C.fmt(rss - base, 0) if name != "none" else "-"]
                for name, (rss, peak) in results.items()]
        print(C.table(["configuration", "worker RSS MiB", "peak RSS MiB", "over none MiB"], rows,
                      f"gunicorn worker memory after {flags.requests} requests per model"))
    finally:
        C.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
