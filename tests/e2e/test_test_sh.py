"""test.sh, as users run it (issue 20): a retrain run on a folder of photos (generated shapes here), then the
model served and asked; and its refusal of a folder with one class."""
import os
import re
import shutil
import subprocess

import pytest
from support import ROOT
from support.images import make_image_dir


def _test_sh(flowers_dir, work, timeout=420, **env):
    venv_bin = os.path.join(ROOT, ".venv", "bin")
    if not os.path.isdir(venv_bin):
        pytest.skip(f"test.sh runs with {venv_bin} first on PATH: no such folder")
    settings = dict(os.environ, FLOWERS_DIR=str(flowers_dir), ARCHITECTURE="mobilenet_v2", WEIGHTS="none",
                    STEPS="100", NO_VENV="1", PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    if work:
        settings.update(WORK=str(work), MODEL_OUT=str(work / "model"))
    settings.update(env)
    settings.pop("VIRTUAL_ENV", None)
    return subprocess.run(["bash", os.path.join(ROOT, "test.sh")], cwd=ROOT, env=settings, capture_output=True,
                          text=True, timeout=timeout)


def test_test_sh_end_to_end(tmp_path):
    """Issue 20: it ends by saying where the model is and the exact command that serves it; the model goes
    to MODEL_OUT; its own temp folder (WORK when not given) and the server's are gone afterwards."""
    if not shutil.which("curl"):
        pytest.skip("test.sh needs curl")
    temp = tmp_path / "tmp"
    temp.mkdir()
    model = tmp_path / "model"
    env = {"TMPDIR": str(temp), "MODEL_OUT": str(model)}
    result = _test_sh(make_image_dir(tmp_path / "flowers", per_class=8), None, **env)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert re.search(r"^OK\b", result.stdout, re.M), result.stdout
    assert os.path.isfile(model / "graph.pb") and os.path.isfile(model / "report.html")
    assert f"== the model is in {model} " in result.stdout
    assert f"MODEL_DIR={model} {os.path.join(ROOT, '.venv', 'bin', 'gunicorn')} classify_server:app" in result.stdout
    assert [p for p in os.listdir(temp) if os.path.isdir(temp / p)] == []  # WORK and the metrics folder removed
    # The server's log is shown, with its ready line, and neither it nor retrain's output has TensorFlow's
    # start-up noise (classify_contract.tf_noise).
    assert re.search(r"serving model 'model' version 1 from .*: tf engine, \d+ labels, loaded and warmed up in",
                     result.stdout), result.stdout
    for noise in ("cuInit", "cuda drivers", "oneDNN", "absl::InitializeLog", "I0000"):
        assert noise not in result.stdout + result.stderr, noise


def test_test_sh_fails_with_one_class(tmp_path):
    result = _test_sh(make_image_dir(tmp_path / "flowers", classes=("red_circle",), per_class=4),
                      tmp_path / "work", timeout=120)
    assert result.returncode != 0, result.stdout
    assert not re.search(r"^OK\b", result.stdout, re.M)
    assert "found 1 class(es) with images" in result.stderr and "need at least 2" in result.stderr, result.stderr
