"""Fixtures of both kinds of tests (a generated image folder, a small model trained once, its Flask app) and
CI's no-skip hooks. tests/unit runs in this process; tests/e2e, through real processes, has its own fixtures and
marks its tests `slow` (e2e/conftest.py). What the tests share besides fixtures is in the support package."""
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

from support.clients import make_app  # noqa: E402
from support.deploy import DOCKERFILE, dockerfile_instructions, read, stages  # noqa: E402
from support.images import broken_jpeg, make_image_dir  # noqa: E402
from support.models import TEST_WEIGHTS  # noqa: E402
from support.processes import run_retrain  # noqa: E402

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
def flask_app(trained_model):
    return make_app(trained_model)


@pytest.fixture(scope="module")
def error_dirs(tmp_path_factory):
    """Image folders retrain must refuse or skip parts of: good (2 classes), one (1 class), corrupt (a class of
    broken JPEGs)."""
    root = tmp_path_factory.mktemp("cli_errors")
    dirs = {"root": root,
            "good": make_image_dir(root / "good", classes=("red_circle", "green_square"), per_class=3),
            "one": make_image_dir(root / "one", classes=("red_circle",), per_class=3),
            "corrupt": make_image_dir(root / "corrupt", classes=("red_circle", "green_square"), per_class=3)}
    os.makedirs(root / "corrupt" / "blue_triangle")
    for name in ("bad_0.jpg", "bad_1.jpg"):
        (root / "corrupt" / "blue_triangle" / name).write_bytes(broken_jpeg())
    return dirs


@pytest.fixture(scope="module")
def dockerfile():
    """The Dockerfile's stages (support.deploy.stages)."""
    return stages(dockerfile_instructions(read(DOCKERFILE)))
