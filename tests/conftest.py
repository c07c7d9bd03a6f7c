"""Fixtures (a generated image folder, a small trained model, real gunicorn servers) and hooks (CI's
no-skip rule, the `slow` marker). The helpers the tests share are in helpers.py, a plain module."""
import atexit
import os
import shutil
import tempfile

import pytest

# Nothing of the tests' in $HOME (issue 20): Keras' config and matplotlib's font cache go to a folder
# removed at exit, for this process and the retrain and server processes the tests start.
_state = tempfile.mkdtemp(prefix="classify-tests-")
atexit.register(shutil.rmtree, _state, ignore_errors=True)
os.environ.setdefault("KERAS_HOME", os.path.join(_state, "keras"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_state, "matplotlib"))

from helpers import FLOWERS, MOBILENET_WEIGHTS, TEST_WEIGHTS, Server, make_app, make_image_dir, run_retrain  # noqa: E402

from classify_contract.tf_noise import import_tensorflow_quietly  # noqa: E402

import_tensorflow_quietly()  # as the product's entry points do; the servers the tests start run their own


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (CI=true) a skip is a failure: CI has every tool and ../shared, so a test that skips
    there means something is missing from .ci/run, and a green run must mean that everything ran."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may skip: {reason}"


# End-to-end tests (`slow`): whole modules of real processes, and tests that start one through these fixtures.
# `python -m pytest -m "not slow"` runs the rest in under a minute.
SLOW_MODULES = {"test_deploy", "test_faults", "test_grpc", "test_http_attacks", "test_page", "test_protocols",
                "test_stream", "test_triton_extensions", "test_v2"}
SLOW_FIXTURES = {"flower_model", "server", "start_server", "broken_servers", "third_party", "foreign", "messy_run",
                 "offline_runs", "report_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session):
    """The same for a whole module skipped at collection (an importorskip at the top of a file)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("CI") == "true" and reporter and reporter.stats.get("skipped"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped")
    if os.environ.get("CI") == "true" and skipped:
        terminalreporter.write_line(f"FAILED: {len(skipped)} skipped under CI=true, where nothing may skip "
                                    "(install what they need in .ci/run)", red=True)

@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    return make_image_dir(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, image_dir):
    """A model folder (graph.pb, labels.txt, model.json): MobileNetV2 over 3 shape classes."""
    out = tmp_path_factory.mktemp("model")
    run_retrain("--image_dir", image_dir, "--architecture", "mobilenet_v2", "--weights", TEST_WEIGHTS,
                "--how_many_training_steps", 1000, "--output_dir", out,
                "--bottleneck_dir", tmp_path_factory.mktemp("bottlenecks"), "--summaries_dir", "")
    return str(out)


@pytest.fixture(scope="session")
def flower_model(tmp_path_factory):
    """(model folder, retrain's CompletedProcess): MobileNetV2 with the real ImageNet weights, retrained on
    150 real flower photos a class (linked in place, ../shared is never copied), 30 % held out for testing;
    with its model.tflite (int8, the default for mobilenet_v2)."""
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
    result = run_retrain("--image_dir", images, "--architecture", "mobilenet_v2", "--weights", MOBILENET_WEIGHTS,
                         "--how_many_training_steps", 300, "--testing_percentage", 30,
                         "--validation_percentage", 10, "--output_dir", out,
                         "--bottleneck_dir", root / "bottlenecks", "--summaries_dir", "")
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
    """Factory: start_server(env) -> a ready Server; all are stopped at the end of the test."""
    servers = []

    def start(env, workers=1, args=(), wait=True):
        server = Server(env, workers, args, log_path=tmp_path / f"gunicorn-{len(servers)}.log")
        servers.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    """One gunicorn server with 2 workers over the trained model, shared by a test module."""
    s = Server({"MODEL_DIR": trained_model}, workers=2,
               log_path=tmp_path_factory.mktemp("server") / "gunicorn.log")
    yield s.wait_ready()
    s.stop()


@pytest.fixture(scope="session")
def flask_app(trained_model):
    return make_app(trained_model)
