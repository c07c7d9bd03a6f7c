"""Triton's model configuration and statistics extensions, through Triton's own clients (tritonclient.http
against real gunicorn with 2 workers, tritonclient.grpc against the real gRPC server): the config agrees
with the metadata, and the statistics count exactly the requests sent, through every protocol, summed
over the workers; unknown /v2 paths answer V2's JSON 404; the metadata names the engine that serves."""
import glob
import os
import shutil
import tempfile
import time

import grpc
import numpy as np
import pytest
import requests
from support.clients import post, predict_request, rpc_error
from support.images import CLASSES, shape_image
from support.models import write_colour_model
from support.processes import GrpcServer

tritonhttp = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]: pip install -e '.[test]'")
tritongrpc = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]: pip install -e '.[test]'")
from tritonclient.utils import InferenceServerException  # noqa: E402

LABELS = list(CLASSES)
GOOD = [shape_image(label, 40 + i) for i, label in enumerate(LABELS)]
BAD = b"this is not an image"
ENV = {"MAX_PARTS": "8", "MODEL_POLL_SECONDS": "0"}
DATATYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    return write_colour_model(tmp_path_factory.mktemp("triton") / "model", LABELS, sharpness=16.0)


def assert_config_agrees(config, meta, max_batch_size):
    """Triton's rule: a batched model's metadata shape is [-1] + the config's dims (every tensor has dims:
    `images` is [1], one image a row, which its reshape says the model takes as []); `labels`, answered
    once per request, is the one unbatched output (its dims are its shape)."""
    assert config["name"] == meta["name"] == "model"
    assert int(config["max_batch_size"]) == max_batch_size
    assert config["platform"] == meta["platform"]
    for tensors, configured in ((meta["inputs"], config["input"]), (meta["outputs"], config["output"])):
        assert [t["name"] for t in tensors] == [c["name"] for c in configured]
        for t, c in zip(tensors, configured):
            if t["name"] == "images":  # one image a row, taken as one string (gRPC's JSON leaves [] out)
                assert c["reshape"].get("shape", []) == [], c
            else:
                assert "reshape" not in c, c
            assert DATATYPES[t["datatype"]] == c["data_type"]
            dims = [int(d) for d in c["dims"]]
            shape = [int(d) for d in t["shape"]]
            assert shape == (dims if t["name"] == "labels" else [-1] + dims), (t, c)


def statistics_of(stats, version="1"):
    """The one entry of model "model", `version`, of a get_inference_statistics answer (JSON)."""
    entries = [s for s in stats["model_stats"] if s["name"] == "model" and s["version"] == version]
    assert len(entries) == 1, stats
    return entries[0]


def counts(entry):
    inference = entry["inference_stats"]
    return {"success": int(inference["success"].get("count", 0)), "fail": int(inference["fail"].get("count", 0)),
            "inference_count": int(entry.get("inference_count", 0)),
            "execution_count": int(entry.get("execution_count", 0))}


def batch_counts(entry):
    """{batch size: runs} of an entry's batch_stats, checking that every phase of every size was counted
    and timed for each run."""
    found = {}
    for stats in entry.get("batch_stats", []):  # gRPC's JSON leaves an empty list out
        runs = {int(stats[phase]["count"]) for phase in ("compute_input", "compute_infer", "compute_output")}
        assert len(runs) == 1, stats
        assert all(int(stats[phase]["ns"]) > 0 for phase in ("compute_input", "compute_infer", "compute_output"))
        found[int(stats["batch_size"])] = runs.pop()
    assert list(found) == sorted(found), found  # by batch size, as Triton lists them
    return found


def nanoseconds(entry):
    inference = entry["inference_stats"]
    return {key: int(inference[key].get("ns", 0))
            for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}


def per_worker_requests(folder):
    """{pid: requests counted} of each worker's own Prometheus file in PROMETHEUS_MULTIPROC_DIR `folder`."""
    from prometheus_client import CollectorRegistry, multiprocess
    found = {}
    for path in glob.glob(os.path.join(folder, "counter_*.db")):
        with tempfile.TemporaryDirectory() as alone:  # the collector reads a whole folder: this file alone
            shutil.copy(path, alone)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=alone)
            total = sum(s.value for family in registry.collect() for s in family.samples
                        if s.name == "classify_model_requests_total")
        if total:
            found[os.path.basename(path)] = total
    return found


def test_http_config_and_statistics_through_tritonclient(start_server, colour_model, tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    server = start_server(dict(ENV, MODEL_DIR=colour_model, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)), workers=2)
    address = f"127.0.0.1:{server.port}"

    def client():  # a connection of its own each time, so that both workers take some
        return tritonhttp.InferenceServerClient(address)

    c = client()
    assert {"model_configuration", "statistics"} <= set(c.get_server_metadata()["extensions"])
    meta, config = c.get_model_metadata("model"), c.get_model_config("model")
    assert_config_agrees(config, meta, max_batch_size=8)
    assert config["platform"] == "tensorflow_graphdef" and config["backend"] == "tensorflow"
    # Each worker runs cores / workers requests at once (gunicorn.conf.py's TF_INTER_OP_THREADS), each alone.
    assert config["instance_group"] == [{"name": "model", "kind": "KIND_CPU", "count": max(1, os.cpu_count() // 2)}]
    assert "dynamic_batching" not in config
    assert c.get_model_config("model", "1") == config
    for call in (lambda: c.get_model_config("other"), lambda: c.get_model_config("model", "7"),
                 lambda: c.get_inference_statistics("other"), lambda: c.get_inference_statistics("model", "7")):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "404", info.value

    entry = statistics_of(c.get_inference_statistics())
    assert counts(entry) == {"success": 0, "fail": 0, "inference_count": 0, "execution_count": 0}
    assert entry["last_inference"] == 0
    c.close()

    sent = {"success": 0, "fail": 0, "inference_count": 0, "execution_count": 0}
    batches = {1: 0, 2: 0}  # runs of each batch size
    before = nanoseconds(entry)
    started_ms = time.time() * 1000

    def send_round():
        """Through V2 (2 good requests of 2 images, 1 bad) and multipart (2 good of 1 image, 1 bad)."""
        for images in ([GOOD[0], GOOD[1]], [GOOD[2], GOOD[0]]):
            tensor = tritonhttp.InferInput("images", [len(images)], "BYTES")
            tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
            one = client()
            one.infer("model", [tensor])
            one.close()
        tensor = tritonhttp.InferInput("images", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([BAD], dtype=np.object_))
        one = client()
        with pytest.raises(InferenceServerException) as info:
            one.infer("model", [tensor])
        one.close()
        assert info.value.status() == "400", info.value
        for image in GOOD[:2]:
            assert post(server.url, [image]).status_code == 200
        assert post(server.url, [BAD]).status_code == 400
        sent["success"] += 4
        sent["fail"] += 2
        sent["inference_count"] += 6
        sent["execution_count"] += 4
        batches[1] += 2
        batches[2] += 2

    # Until each worker has counted some (the sums must add up both): the second worker may still be loading
    # its model when the first answers, so this is bounded in time (and rounds), not in a few rounds.
    deadline = time.monotonic() + 120
    for _ in range(600):
        send_round()
        if len(per_worker_requests(metrics_dir)) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    workers = per_worker_requests(metrics_dir)
    assert len(workers) == 2, workers
    assert sum(workers.values()) == sent["success"] + sent["fail"]

    c = client()
    every, one_model, one_version = (c.get_inference_statistics(), c.get_inference_statistics("model"),
                                     c.get_inference_statistics("model", "1"))
    entry = statistics_of(every)
    assert statistics_of(one_model) == entry and statistics_of(one_version) == entry
    assert counts(entry) == sent
    grown = nanoseconds(entry)
    assert all(grown[key] > before[key] for key in grown), (before, grown)
    inference = entry["inference_stats"]
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(inference[phase]["count"]) == sent["success"]
    assert started_ms <= entry["last_inference"] <= time.time() * 1000

    send_round()  # and they go on growing
    tensor = tritonhttp.InferInput("images", [9], "BYTES")  # over MAX_PARTS: a failure, whatever the protocol
    tensor.set_data_from_numpy(np.array([GOOD[0]] * 9, dtype=np.object_))
    with pytest.raises(InferenceServerException) as info:
        c.infer("model", [tensor])
    assert info.value.status() == "413", info.value
    assert post(server.url, [GOOD[0]] * 9).status_code == 413
    sent["fail"] += 2
    entry = statistics_of(c.get_inference_statistics("model"))
    assert counts(entry) == sent
    assert all(nanoseconds(entry)[key] > grown[key] for key in grown)
    assert batch_counts(entry) == batches  # refusals ran nothing
    c.close()

    # /metrics shows the same counters, summed the same way.
    text = requests.get(server.url + "/metrics", timeout=10).text
    assert f'classify_model_requests_total{{model="model",outcome="success",version="1"}} {sent["success"]}.0' in text


@pytest.mark.parametrize("path", ["/v2/nothing", "/v2/models/model/nothing", "/v2/models/model/versions/1/x/y",
                                  "/v2/repository/index"])
def test_unknown_v2_paths_answer_v2s_json_404(colour_model, path):
    from support.clients import make_app
    c = make_app(colour_model).test_client()
    r = c.get(path)
    assert r.status_code == 404 and r.is_json
    assert set(r.get_json()) == {"error"} and "Open Inference Protocol" in r.get_json()["error"]
    assert "POST an image" not in r.get_json()["error"]
    assert "POST an image" in c.get("/nothing").get_json()["error"]  # elsewhere, the multipart hint


def test_grpc_config_and_statistics_through_tritonclient(colour_model, tmp_path):
    server = GrpcServer(dict(ENV, MODEL_DIR=colour_model), tmp_path / "grpc.log")
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        server.wait_ready()
        assert {"model_configuration", "statistics"} <= set(client.get_server_metadata().extensions)
        meta = client.get_model_metadata("model", as_json=True)
        config = client.get_model_config("model", as_json=True)["config"]
        assert_config_agrees(config, meta, max_batch_size=8)
        assert client.get_model_config("model", "1").config.backend == "tensorflow"
        for call in (lambda: client.get_model_config("other"), lambda: client.get_inference_statistics("other"),
                     lambda: client.get_inference_statistics("model", "7")):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "StatusCode.NOT_FOUND", info.value

        stats = client.get_inference_statistics(as_json=True)
        entry = statistics_of(stats)
        assert counts(entry) == {"success": 0, "fail": 0, "inference_count": 0, "execution_count": 0}

        def infer(images):
            tensor = tritongrpc.InferInput("images", [len(images)], "BYTES")
            tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
            return client.infer("model", [tensor])

        for _ in range(3):
            infer(GOOD)
        for _ in range(2):
            with pytest.raises(InferenceServerException):
                infer([BAD])
        with pytest.raises(InferenceServerException) as info:  # over MAX_PARTS: refused for the model, counted
            infer([GOOD[0]] * 9)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED", info.value
        server.predict([GOOD[0]])  # TF Serving's Predict goes through the same core: counted too
        for images in ([BAD], [GOOD[0]] * 9):
            error = rpc_error(server.prediction.Predict, predict_request(images), timeout=30)
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), error
        # Not counted: a malformed tensor, and a version not served (nothing of it runs).
        wrong = tritongrpc.InferInput("images", [1], "FP32")
        wrong.set_data_from_numpy(np.zeros(1, np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("model", [wrong])
        with pytest.raises(InferenceServerException):
            client.infer("model", [wrong], model_version="7")
        entry = statistics_of(client.get_inference_statistics("model", "1", as_json=True))
        assert counts(entry) == {"success": 4, "fail": 5, "inference_count": 10, "execution_count": 4}
        assert all(ns > 0 for ns in nanoseconds(entry).values()), entry
        assert statistics_of(client.get_inference_statistics("model", as_json=True)) == entry
    finally:
        client.close()
        server.stop()


def test_grpc_config_says_dynamic_batching_and_statistics_count_each_batch_size(colour_model, tmp_path):
    """With BATCH_MAX_SIZE on, the config says dynamic_batching with its settings and the instance_group says
    the runs at once (TF_INTER_OP_THREADS); batch_stats counts each run under its batch size."""
    env = dict(ENV, MODEL_DIR=colour_model, BATCH_MAX_SIZE="4", BATCH_TIMEOUT_MS="7", TF_INTER_OP_THREADS="3")
    server = GrpcServer(env, tmp_path / "grpc.log")
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        server.wait_ready()
        config = client.get_model_config("model", as_json=True)["config"]
        assert config["instance_group"] == [{"name": "model", "kind": "KIND_CPU", "count": 3}]
        assert config["dynamic_batching"] == {"preferred_batch_size": [4], "max_queue_delay_microseconds": "7000"}
        assert batch_counts(statistics_of(client.get_inference_statistics("model", as_json=True))) == {}

        def infer(images):
            tensor = tritongrpc.InferInput("images", [len(images)], "BYTES")
            tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
            return client.infer("model", [tensor])

        for i in range(5):
            infer([GOOD[i % len(GOOD)]])
        infer(GOOD)  # a batch of 3
        tensor = tritongrpc.InferInput("images", [2, 1], "BYTES")  # Triton's [N, 1] of the config's dims: 2
        tensor.set_data_from_numpy(np.array([[GOOD[0]], [GOOD[1]]], dtype=np.object_))
        assert client.infer("model", [tensor]).as_numpy("scores").shape == (2, len(LABELS))
        with pytest.raises(InferenceServerException):
            infer([BAD, GOOD[0]])  # refused: nothing runs
        entry = statistics_of(client.get_inference_statistics("model", as_json=True))
        assert batch_counts(entry) == {1: 5, 2: 1, 3: 1}
        assert counts(entry) == {"success": 7, "fail": 1, "inference_count": 10, "execution_count": 7}
    finally:
        client.close()
        server.stop()


def test_metadata_and_config_name_the_tflite_engine(colour_model, tmp_path):
    import tensorflow as tf
    from support.clients import make_app

    from retrain import tflite
    folder = tmp_path / "lite"
    shutil.copytree(colour_model, folder)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString((folder / "graph.pb").read_bytes())
    (folder / "model.tflite").write_bytes(tflite.convert(graph_def, 32, "float32"))
    c = make_app(str(folder), MODEL_ENGINE="tflite", MAX_PARTS=5).test_client()
    meta, config = c.get("/v2/models/model").get_json(), c.get("/v2/models/model/config").get_json()
    assert meta["platform"] == config["platform"] == "tensorflow_lite"
    assert config["backend"] == "tflite" and config["default_model_filename"] == "model.tflite"
    # An interpreter per request at once (TF_INTER_OP_THREADS, by default one per core), each request alone.
    assert config["instance_group"] == [{"name": "model", "kind": "KIND_CPU", "count": os.cpu_count()}]
    assert "dynamic_batching" not in config
    assert_config_agrees(config, meta, max_batch_size=5)
    assert c.get("/v1/models/model/metadata").status_code == 200


def test_each_message_of_a_stream_batch_counts_as_a_request(colour_model):
    """classify_each (the Kafka consumer's): every image a request of its own, good and bad apart. The
    counters live as long as this process, so what is checked is what this batch added."""
    from support.clients import make_app
    core = make_app(colour_model).extensions["inference"]
    before = core.statistics("model", 1)[0]
    version, _, results = core.classify_each([GOOD[0], BAD, GOOD[1], b""])
    assert version == 1 and [isinstance(r, Exception) for r in results] == [False, True, False, True]
    after = core.statistics("model", 1)[0]
    assert {key: after[key] - before[key] for key in ("inference_count", "execution_count")} == \
        {"inference_count": 2, "execution_count": 1}
    for outcome in ("success", "fail"):
        assert after["inference_stats"][outcome]["count"] - before["inference_stats"][outcome]["count"] == 2
        assert after["inference_stats"][outcome]["ns"] > before["inference_stats"][outcome]["ns"]
