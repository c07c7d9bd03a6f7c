"""Dynamic batching: concurrent requests share session runs, and each gets exactly its own answer."""
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from support.images import CLASSES, shape_image

from classify_server.http_api import create_app

IMAGES = [shape_image(label, seed) for seed in range(8) for label in CLASSES]


def answers(app, images, workers):
    def one(data):
        response = app.test_client().post("/?top_k=3", data={"data": (io.BytesIO(data), "x.jpg")})
        assert response.status_code == 200, response.get_json()
        return response.get_json()
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, images))


def test_batched_answers_equal_unbatched_ones(trained_model):
    plain = create_app({"MODEL_DIR": trained_model, "BATCH_MAX_SIZE": 0})
    batched = create_app({"MODEL_DIR": trained_model, "BATCH_MAX_SIZE": 8, "BATCH_TIMEOUT_MS": 50})
    batcher = batched.extensions["models"].get().latest.engine.batcher
    runs = []
    run = batcher.run
    batcher.run = lambda inputs: runs.append(len(inputs)) or run(inputs)  # count the session runs

    expected = answers(plain, IMAGES, workers=1)
    got = answers(batched, IMAGES, workers=16)
    for e, g in zip(expected, got):
        assert [label for label, _ in e] == [label for label, _ in g]
        np.testing.assert_allclose([s for _, s in e], [s for _, s in g], atol=1e-5)
    assert sum(runs) == len(IMAGES) and len(runs) < len(IMAGES) and max(runs) <= 8, runs
    assert len({tuple(label for label, _ in a) for a in got}) > 1  # answers differ by image


def test_a_bad_image_in_a_batch_harms_no_other_request(trained_model):
    app = create_app({"MODEL_DIR": trained_model, "BATCH_MAX_SIZE": 8, "BATCH_TIMEOUT_MS": 50})
    with ThreadPoolExecutor(8) as pool:
        bad = [pool.submit(app.test_client().post, "/", data={"data": (io.BytesIO(b"junk"), "x.jpg")})
               for _ in range(4)]
        good = answers(app, IMAGES[:8], workers=8)
    assert all(f.result().status_code == 400 for f in bad)
    assert len(good) == 8


def test_requests_that_queued_during_a_run_form_the_next_batch_without_waiting():
    # BATCH_TIMEOUT_MS=0: no waiting for company, yet what queued while the last
    # batch ran goes into the next one, whole.
    import threading
    import time

    from classify_server.engines.batching import Batcher
    sizes, started = [], threading.Event()

    def run(inputs):
        sizes.append(len(inputs))
        started.set()
        time.sleep(0.3)
        return [x * 10 for x in inputs]

    batcher = Batcher(run, max_size=8, timeout_ms=0)
    try:
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(batcher.predict, [1])
            assert started.wait(5)
            rest = [pool.submit(batcher.predict, [x]) for x in (2, 3, 4)]
            assert first.result(5) == [10]
            assert [f.result(5) for f in rest] == [[20], [30], [40]]
        assert sizes == [1, 3]
    finally:
        batcher.close()


def test_runners_keep_several_batches_in_the_session_at_once():
    # Two runners: while one batch runs, the next starts (as two unbatched requests'
    # runs would), and each caller still gets exactly its own answer.
    import threading
    import time

    from classify_server.engines.batching import Batcher
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def run(inputs):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.2)
        with lock:
            in_flight[0] -= 1
        return [x * 10 for x in inputs]

    batcher = Batcher(run, max_size=2, timeout_ms=0, runners=2)
    try:
        with ThreadPoolExecutor(8) as pool:
            futures = {x: pool.submit(batcher.predict, [x]) for x in range(8)}
            assert {x: f.result(10) for x, f in futures.items()} == {x: [x * 10] for x in range(8)}
        assert most[0] == 2
    finally:
        batcher.close()
    for thread in batcher.threads:
        thread.join(5)
        assert not thread.is_alive()


def test_a_graph_with_a_fixed_batch_of_one_is_never_batched(tmp_path):
    # A third-party graph may take exactly one image per run: batching it would break every run.
    import tensorflow as tf

    from classify_server.core.inference import preprocess
    from classify_server.engines.tf_session import TFSessionEngine
    graph = tf.Graph()
    with graph.as_default():
        images = tf.compat.v1.placeholder(tf.float32, [1, 8, 8, 3], name="input")
        tf.nn.softmax(tf.stack([tf.reduce_mean(images), -tf.reduce_mean(images)])[tf.newaxis] / 255.0,
                      name="final_result")
    (tmp_path / "graph.pb").write_bytes(graph.as_graph_def().SerializeToString())
    (tmp_path / "labels.txt").write_text("bright\ndark\n")
    classifier = TFSessionEngine(str(tmp_path), batch_max_size=4, batch_timeout_ms=0)
    try:
        assert classifier.batcher is None
        classifier.warm_up()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda data: classifier.predict([preprocess(classifier.input_spec, data, None)]),
                                    [shape_image(label, 1) for label in CLASSES]))
        assert all(a.shape == (1, 2) for a in answers)
    finally:
        classifier.close()
