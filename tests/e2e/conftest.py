"""End-to-end tests: through real processes (gunicorn, the gRPC server, Kafka, nginx, a browser, test.sh,
whole retrain runs). Every test in this folder is `slow`, and nothing else is: `-m "not slow"` runs tests/unit."""
import os
import pathlib

import pytest
from support.models import FLOWERS, METADATA_PYTHON, MOBILENET_WEIGHTS, TEST_WEIGHTS
from support.processes import Server, run_retrain, starting

HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(items):
    for item in items:  # this hook sees the whole session's items: only this folder's are slow
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def flower_model(tmp_path_factory):
    """(model folder, retrain's CompletedProcess): MobileNetV2 with the real ImageNet weights, retrained on
    150 real flower photos a class (linked in place, ../shared is never copied), 30 % held out for testing;
    with its model.tflite (int8, the default for mobilenet_v2; with TFLite metadata when METADATA_PYTHON is
    there), model.onnx and a Triton repository beside the folder (triton/flower_photos: test_exports.py)."""
    if not (os.path.isdir(FLOWERS) and os.path.isfile(MOBILENET_WEIGHTS)):
        pytest.skip(f"real data absent: needs {FLOWERS} and {MOBILENET_WEIGHTS}")
    root = tmp_path_factory.mktemp("flowers")
    images = root / "flowers"
    for label in sorted(os.listdir(FLOWERS)):
        folder = os.path.join(FLOWERS, label)
        if not os.path.isdir(folder):
            continue
        os.makedirs(images / label)
        for name in sorted(os.listdir(folder))[:150]:
            os.symlink(os.path.join(folder, name), images / label / name)
    out = root / "model"
    metadata = ["--tflite_metadata_python", METADATA_PYTHON] if os.path.isfile(METADATA_PYTHON) else []
    result = run_retrain("--image_dir", images, "--architecture", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                         "--how_many_training_steps", 300, "--testing_percentage", 30,
                         "--validation_percentage", 10, "--output_dir", out,
                         "--bottleneck_dir", root / "bottlenecks", "--summaries_dir", "", *metadata,
                         "--model_name", "flower_photos", "--export", "onnx", "--export", "triton", root / "triton")
    return out, result


@pytest.fixture(scope="session")
def report_run(tmp_path_factory, image_dir):
    """(model folder, retrain's CompletedProcess) of a run meant to get test photos wrong (one step at a tiny
    rate), with 40 % of the shapes held out and the misclassified ones printed: its report.html has
    something to show."""
    out = tmp_path_factory.mktemp("report") / "model"
    result = run_retrain("--image_dir", image_dir, "--architecture", "mobilenet_v2", "--weights", TEST_WEIGHTS,
                         "--how_many_training_steps", 1, "--learning_rate", 1e-6, "--testing_percentage", 40,
                         "--output_dir", out, "--bottleneck_dir", tmp_path_factory.mktemp("report-bottlenecks"),
                         "--summaries_dir", "", "--tflite_quantization", "none", "--print_misclassified_test_images")
    return out, result


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(env, workers=1, args=(), wait=True) -> a ready Server; all are stopped at the
    end of the test."""
    def make(n, env, workers=1, args=()):
        return Server(env, workers, args, log_path=tmp_path / f"gunicorn-{n}.log")

    with starting(make) as start:
        yield start


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    """One gunicorn server with 2 workers over the trained model, shared by a test module."""
    s = Server({"MODEL_DIR": trained_model}, workers=2,
               log_path=tmp_path_factory.mktemp("server") / "gunicorn.log")
    yield s.wait_ready()
    s.stop()
