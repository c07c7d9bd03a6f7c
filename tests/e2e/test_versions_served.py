"""Model versions through real processes: hot reload under load, the SavedModel of a retrain run, and
/metrics across gunicorn's workers."""
import io
import os
import shutil
import threading
import time

import numpy as np
import requests
from support.images import encode, shape_image
from support.models import TEST_WEIGHTS, publish_copy

IMAGES = [shape_image(label, seed) for seed, label in enumerate(["red_circle", "green_square", "blue_triangle"])]


def test_hot_reload_under_load_fails_no_request(trained_model, tmp_path, start_server):
    base = tmp_path / "models"
    base.mkdir()
    label_sets = {1: publish_copy(trained_model, base, 1, "_v1")}
    server = start_server({"MODEL_DIR": str(base), "MODEL_POLL_SECONDS": "1"}, workers=2)
    answers, failures, stop = [], [], threading.Event()

    def client_loop():  # without pause, bounded in count and time
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline and len(answers) < 5000:
            try:
                r = requests.post(server.url + "/", files={"data": ("x.jpg", IMAGES[0])}, timeout=30)
                (answers if r.status_code == 200 else failures).append(r.json())
            except requests.RequestException as exc:
                failures.append(str(exc))

    thread = threading.Thread(target=client_loop)
    thread.start()
    try:
        time.sleep(2)
        label_sets[2] = publish_copy(trained_model, base, 2, "_v2")
        time.sleep(4)
        label_sets[3] = publish_copy(trained_model, base, 3, "_v3")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # both workers on version 3
            status = requests.get(server.url + "/metrics").text
            if 'classify_model_version' in status and all(
                    line.endswith(" 3.0") for line in status.splitlines()
                    if line.startswith("classify_model_version{")):
                break
            time.sleep(0.5)
        time.sleep(2)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures[:3]
    seen = set()
    for answer in answers:  # every answer comes from one complete version
        labels = {label for label, _ in answer}
        versions = [v for v, s in label_sets.items() if labels <= s]
        assert len(versions) == 1, answer
        seen.add(versions[0])
    assert seen >= {1, 3}, seen
    assert answers[-1][0][0].endswith("_v3")
    status = requests.get(server.url + "/v1/models/model").json()["model_version_status"]
    assert {"version": "3", "state": "AVAILABLE"} == {k: status[0][k] for k in ("version", "state")}


def saved_model_images():
    """Images whose pixels depend on each step of the serving_default signature's decode: a wide JPEG (the
    centre crop), a tall PNG over half transparent (alpha over white), a grayscale PNG (to RGB)."""
    from PIL import Image
    wide = shape_image("red_circle", 11, size=(160, 60))
    tall = Image.open(io.BytesIO(shape_image("blue_triangle", 12, size=(60, 150), fmt="PNG"))).convert("RGBA")
    alpha = np.full((150, 60), 255, np.uint8)
    alpha[:, :30] = 0  # the left half transparent: white once composited, black if alpha were dropped
    tall.putalpha(Image.fromarray(alpha))
    gray = Image.open(io.BytesIO(shape_image("green_square", 13, size=(90, 90)))).convert("L")
    return [wide, encode(tall, "PNG"), encode(gray, "PNG")]


def test_saved_model_gives_the_graph_probabilities(tmp_path, image_dir):
    import tensorflow as tf
    from support.processes import run_retrain

    from classify_server.core.inference import preprocess
    from classify_server.engines.tf_session import TFSessionEngine
    base = tmp_path / "models"
    # Real weights (when ../shared has them, as CI does): answers that depend on the image, so a broken
    # decode, crop or alpha step in the signature shows in its scores.
    run_retrain("--image_dir", image_dir, "--architecture", "mobilenet_v2", "--weights", TEST_WEIGHTS,
                "--how_many_training_steps", 300, "--model_base_path", base,
                "--bottleneck_dir", tmp_path / "bn", "--summaries_dir", "")
    version = base / "1"
    assert (version / "saved_model.pb").is_file() and (version / "graph.pb").is_file()
    images = saved_model_images()
    classifier = TFSessionEngine(str(version))
    pixels = [preprocess(classifier.input_spec, image, None) for image in images]
    expected = classifier.predict(pixels)
    if TEST_WEIGHTS != "none":
        assert np.ptp(expected, axis=0).max() > 0.5, expected  # the answers do differ between the images
    loaded = tf.saved_model.load(str(version))
    same_pixels = loaded.signatures["predict_images"](tf.constant(np.stack(pixels)))
    np.testing.assert_allclose(list(same_pixels.values())[0].numpy(), expected, atol=1e-5)
    # From encoded bytes TensorFlow's own decoder and resizer stand in for Pillow: close, not equal
    # (measured: 0.005 at most; squashing instead of cropping moved a score by 0.05, alpha over black by 0.26).
    from_bytes = loaded.signatures["serving_default"](images=tf.constant(images))["scores"].numpy()
    np.testing.assert_allclose(from_bytes, expected, atol=0.02)


def worker_counts(metrics_dir):
    """{pid: classified requests} from each worker's own counter file (prometheus_client's multiprocess
    files are named counter_<pid>.db), read alone, as /metrics would if only that worker existed."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    counts = {}
    for name in os.listdir(metrics_dir):
        if name.startswith("counter_") and name.endswith(".db"):
            alone = metrics_dir.parent / ("alone-" + name)
            alone.mkdir(exist_ok=True)
            shutil.copy(metrics_dir / name, alone / name)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=str(alone))
            counts[name[8:-3]] = requests_200(generate_latest(registry).decode())
    return counts


def requests_200(metrics_text):
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
               if line.startswith('classify_requests_total{route="/",status="200"}'))


def test_metrics_count_requests_of_every_worker(tmp_path, start_server, trained_model):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    server = start_server({"MODEL_DIR": trained_model, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, workers=2)
    before = requests_200(requests.get(server.url + "/metrics").text)
    sent = 0
    deadline = time.monotonic() + 60
    # Four clients at once, each on a connection of its own, until both workers have answered some
    # (which worker accepts a connection is the kernel's choice): bounded in count and time.
    while len([n for n in worker_counts(metrics_dir).values() if n]) < 2:
        assert time.monotonic() < deadline and sent < 400, f"one worker served all {sent} requests"
        threads = [threading.Thread(target=lambda: requests.post(
            server.url + "/", files={"data": ("x.jpg", IMAGES[1])}, timeout=30).raise_for_status())
            for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sent += 4
    per_worker = worker_counts(metrics_dir)
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    after = requests.get(server.url + "/metrics").text
    assert requests_200(after) - before == sent == sum(per_worker.values()), (per_worker, sent)
    assert "classify_inference_seconds_bucket" in after and "classify_model_version" in after
