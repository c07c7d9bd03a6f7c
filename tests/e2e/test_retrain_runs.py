"""Whole retrain runs, `python -m retrain` in a subprocess as users run it: what they see (exit codes,
messages, files), the SavedModel, training paths, other backbones, and real flowers. Runs use mobilenet_v2 with
random weights and few steps, except the real-data tests, which need ../shared.
"""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from support import ROOT
from support.images import CLASSES, broken_jpeg, make_image_dir, shape_image
from support.models import TEST_WEIGHTS, run_frozen_graph
from support.processes import run_retrain

from classify_contract.preprocessing import decode_image

# The cheapest real configuration; --summaries_dir "" skips TensorBoard logs.
FAST = ("--architecture", "mobilenet_v2", "--weights", "none", "--summaries_dir", "")
MODEL_FILES = {"graph.pb", "labels.txt", "model.json", "model.tflite", "report.html", "report"}
# A proxy nobody listens on: downloads fail at once, online or not, so no test
# ever fetches flower_photos (218 MB) or ImageNet weights.
DEAD_PROXY = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def retrain_process(*args, env=None, timeout=300):
    """`python -m retrain ARGS` with an optional environment; never raises on failure."""
    return subprocess.run([sys.executable, "-m", "retrain", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def offline_runs(error_dirs):
    """The two download paths, run as users run them, two at a time, with a timeout."""
    root = error_dirs["root"]
    homes = {}
    for name in ("no_image_dir", "imagenet"):
        homes[name] = root / f"home_{name}"
        homes[name].mkdir()
    cases = {"no_image_dir": [*FAST],
             "imagenet": ["--image_dir", error_dirs["good"], "--architecture", "mobilenet_v2",
                          "--weights", "imagenet", "--summaries_dir", ""]}

    def run(name):
        # An empty HOME: no ~/flower_photos, no Keras weights cache to fall back on.
        env = dict(os.environ, HOME=str(homes[name]), **DEAD_PROXY)
        for key in ("KERAS_HOME", "no_proxy", "NO_PROXY"):
            env.pop(key, None)
        out = root / name / "model"
        return name, (homes[name], out, retrain_process(*cases[name], "--output_dir", out, "--bottleneck_dir",
                                                        root / name / "bottlenecks", env=env, timeout=180))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, cases))


@pytest.mark.parametrize("case, expected", [
    ("no_image_dir", ["could not download", "flower_photos.tgz", "Pass --image_dir DIR"]),
    ("imagenet", ["could not get the ImageNet weights of mobilenet_v2", "Pass --weights PATH"]),
])
def test_offline_download_errors_name_the_flag_to_use(offline_runs, case, expected):
    home, out, result = offline_runs[case]
    if case == "imagenet" and result.returncode == 0:
        pytest.skip("the ImageNet weights downloaded: this machine is online")
    assert result.returncode == 1, result.stderr[-2000:]
    # A message, not a crash: no traceback, every expected fragment on stderr.
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(r"^error: ", result.stderr, re.M), result.stderr[-2000:]
    for fragment in expected:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr[-2000:]}"
    assert not os.path.exists(out)
    # No flower_photos and no half-unpacked temp folder left in HOME (only Keras' config dir).
    assert not [n for n in os.listdir(home) if "flower" in n]


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    """One run over a folder with junk in it, using the old output flags and --saved_model_dir."""
    root = tmp_path_factory.mktemp("messy")
    images = make_image_dir(root / "images", per_class=6)
    (root / "images" / "red_circle" / "broken.jpg").write_bytes(broken_jpeg())
    (root / "images" / "red_circle" / "notes.txt").write_text("not an image\n")
    (root / "images" / "README.txt").write_text("a file beside the class folders\n")
    make_image_dir(root / "images" / ".thumbnails", classes=("red_circle",), per_class=2)  # hidden: no class
    out = root / "old_style"
    result = run_retrain("--image_dir", images, *FAST, "--how_many_training_steps", 20,
                         "--eval_step_interval", 10, "--output_graph", out / "retrained_graph.pb",
                         "--output_labels", out / "retrained_labels.txt", "--saved_model_dir",
                         root / "saved_model", "--bottleneck_dir", root / "bottlenecks", check=False)
    return root, out, result


def test_corrupt_and_non_image_files_are_skipped(messy_run):
    root, out, result = messy_run
    assert result.returncode == 0, result.stderr[-3000:]
    broken = str(root / "images" / "red_circle" / "broken.jpg")
    assert "warning: skipped 1 unreadable image(s):" in result.stderr
    assert broken in result.stderr
    assert "notes.txt" not in result.stderr + result.stdout
    counts = re.search(r"(\d+) training, (\d+) validation, (\d+) testing images in (\d+) classes", result.stderr)
    assert counts and sum(map(int, counts.groups()[:3])) == 18 and counts.group(4) == "3"


def test_old_output_flags_still_work(messy_run):
    root, out, result = messy_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(os.listdir(out)) == {"retrained_graph.pb", "retrained_labels.txt", "model.json", "model.tflite",
                                    "report.html", "report"}
    assert (out / "retrained_labels.txt").read_text().splitlines() == sorted(CLASSES)
    info = json.loads((out / "model.json").read_text())
    assert info["graph"] == "retrained_graph.pb" and info["labels"] == "retrained_labels.txt"


def test_saved_model_takes_encoded_images(messy_run):
    import tensorflow as tf
    root, out, result = messy_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert [n for n in os.listdir(root) if n.startswith(".")] == []   # the temp dir was renamed away
    assert os.stat(root / "saved_model").st_mode & 0o755 == 0o755    # mkdtemp's 0700 is widened
    serve = tf.saved_model.load(str(root / "saved_model")).signatures["serving_default"]
    encoded = [shape_image("red_circle", 1), shape_image("blue_triangle", 2, fmt="PNG"),
               shape_image("green_square", 3, size=(500, 300))]
    scores = serve(images=tf.constant(encoded))["scores"].numpy()
    assert scores.shape == (3, 3)
    np.testing.assert_allclose(scores.sum(axis=1), 1, atol=1e-5)


# --- training paths ----------------------------------------------------------------------------

def test_augmentation_and_fine_tuning_run_end_to_end(tmp_path):
    images = make_image_dir(tmp_path / "images", classes=("red_circle", "green_square"), per_class=8)
    out = tmp_path / "model"
    # Real weights (when ../shared has them, as CI does): with random ones every image gets the same
    # answer, and a graph that flipped or brightened its input at random would answer the same too.
    run_retrain("--image_dir", images, "--architecture", "mobilenet_v2", "--weights", TEST_WEIGHTS,
                "--summaries_dir", "", "--how_many_training_steps", 10, "--eval_step_interval", 10,
                "--flip_left_right", "--random_brightness", 30, "--fine_tune", "--fine_tune_epochs", 1,
                # A few top layers and no validation set: the same code path, less to compile.
                "--fine_tune_fraction", 0.05, "--validation_percentage", 0, "--testing_percentage", 20,
                "--fine_tune_batch_size", 8, "--output_dir", out, "--bottleneck_dir", tmp_path / "bottlenecks")
    assert set(os.listdir(out)) == MODEL_FILES
    info = json.loads((out / "model.json").read_text())
    assert info["fine_tuned"] is True
    assert info["tflite"]["quantization"] == "float16"  # fine-tuned MobileNetV2: int8 costs it 0.6 points
    # The exported graph has no augmentation in it: copies of one image get one answer, run after run.
    red, green = (decode_image(os.path.join(images, label, f"{label}_000.jpg"), (224, 224))
                  for label in ("red_circle", "green_square"))
    batch = np.stack([red] * 4 + [green])
    probabilities = np.concatenate([run_frozen_graph(str(out / "graph.pb"), info["input"], info["output"], batch)
                                    for _ in range(2)])
    assert probabilities.shape == (10, 2)
    if TEST_WEIGHTS != "none":  # the answer does depend on the pixels, so augmentation would show
        assert np.abs(probabilities[0] - probabilities[4]).max() > 1e-3, probabilities
    for row in (1, 2, 3, 5, 6, 7, 8):
        np.testing.assert_allclose(probabilities[row], probabilities[0], atol=1e-6)
    np.testing.assert_allclose(probabilities[9], probabilities[4], atol=1e-6)


def test_real_flowers_reach_a_sane_accuracy(flower_model):
    # 150 photos a class, linked in place (../shared is never copied); 30% for testing gives 216 test
    # images. The run is deterministic (hash split, seeded head): 0.838 in each of two runs. The floor
    # leaves 8 images for other CPUs' numerics: a drop of 4 points fails; chance is 0.2.
    out, result = flower_model
    tested = re.search(r"^test accuracy = ([\d.]+) \(N=(\d+)\)", result.stdout, re.M)
    assert tested, result.stdout
    accuracy, count = float(tested.group(1)), int(tested.group(2))
    assert count == 216
    assert accuracy >= 0.80, result.stdout
    info = json.loads((out / "model.json").read_text())
    assert info["accuracy"]["test"] == pytest.approx(accuracy, abs=1e-4)
    assert info["labels_count"] == 5


def readme_flag_table():
    """{flag: default} of README's retrain flag table."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    table = text[text.index("| flag | default | what it does |"):]
    table = table[:table.index("\n\n")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {flag.strip("`"): default.strip("`") for flag, default, _ in rows}


def test_help_shows_every_default_and_readme_agrees():
    """Issue 19: every flag of `python -m retrain --help` has one line on what it does and shows its default,
    and README's table names the same flags with the same defaults."""
    from retrain import cli
    actions = [a for a in cli.build_parser()._actions if a.option_strings != ["-h", "--help"]]
    assert all(a.help for a in actions), [a.dest for a in actions if not a.help]
    assert readme_flag_table() == {a.option_strings[0]: cli.shown_default(a) for a in actions}
    text = " ".join(subprocess.run([sys.executable, "-m", "retrain", "--help"], cwd=ROOT, capture_output=True,
                                   text=True, check=True, timeout=60).stdout.split())
    for action in actions:
        default = cli.shown_default(action)
        if default:
            assert re.search(re.escape(action.option_strings[0]) + r"\b.*?\(default: " + re.escape(default) + r"\)",
                             text), (action.option_strings[0], default)


@pytest.mark.parametrize("architecture,preprocess", [
    ("efficientnet_v2_b0", "efficientnet_v2"), ("resnet50", "resnet50"), ("convnext_tiny", "convnext")])
def test_more_backbones_export_their_preprocessing_and_serve(architecture, preprocess, image_dir, tmp_path):
    """Issue 19: efficientnet_v2_b0, resnet50 and convnext_tiny (random weights) retrain, export and serve;
    graph.pb takes raw [0, 255] pixels and its features equal keras.applications' own model fed through that
    family's preprocess_input (ResNet50's subtracts the ImageNet means from BGR; the other two normalise
    inside the model), so nobody serving the graph needs to know the backbone's preprocessing."""
    import keras
    import tensorflow as tf
    from support.clients import make_app, post_images

    from retrain import backbones
    out = tmp_path / "model"
    run_retrain("--image_dir", image_dir, "--architecture", architecture, "--weights", "none",
                "--how_many_training_steps", 20, "--output_dir", out, "--bottleneck_dir", tmp_path / "bottlenecks",
                "--summaries_dir", "", "--tflite_quantization", "none")
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["architecture"] == architecture and sidecar["input_height"] == 224

    image = shape_image("red_circle", 3, size=(300, 200))
    pixels = decode_image(image, (224, 224))[None]
    graph = tf.Graph()
    with graph.as_default():
        graph_def = tf.compat.v1.GraphDef()
        graph_def.ParseFromString((out / "graph.pb").read_bytes())
        tf.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        features = session.run("bottleneck:0", {"input:0": pixels})
    arch = backbones.ARCHITECTURES[architecture]
    keras.utils.set_random_seed(0)  # as build_backbone seeds random weights
    reference = getattr(keras.applications, arch.application)(input_shape=(224, 224, 3), include_top=False,
                                                               weights=None, pooling="avg")
    family = getattr(keras.applications, preprocess)
    expected = np.asarray(reference(family.preprocess_input(pixels.copy())))
    np.testing.assert_allclose(features, expected, rtol=1e-3, atol=1e-3 * float(np.abs(expected).max()))

    response = post_images(make_app(str(out)).test_client(), [image])
    assert response.status_code == 200, response.get_data(as_text=True)
    answer = response.get_json()
    assert {label for label, _ in answer} == set(CLASSES) and sum(s for _, s in answer) == pytest.approx(1, abs=1e-4)


def test_progress_is_plain_lines_when_not_a_terminal(image_dir, tmp_path):
    """Issue 20: written to a file (as here) or a pipe, the progress bars are plain lines, not one line of
    carriage returns. (Read as bytes: text mode would turn each carriage return into a newline.)"""
    with open(tmp_path / "stderr", "wb") as err:
        subprocess.run([sys.executable, "-m", "retrain", "--image_dir", str(image_dir), "--architecture",
                        "mobilenet_v2", "--weights", "none", "--how_many_training_steps", "5", "--output_dir",
                        str(tmp_path / "model"), "--bottleneck_dir", str(tmp_path / "cache"), "--summaries_dir", "",
                        "--tflite_quantization", "none"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                       timeout=300, check=True)
    output = (tmp_path / "stderr").read_bytes()
    assert b"\r" not in output
    assert any(line.startswith(b"bottlenecks: 100%") for line in output.splitlines()), output


def test_refit_trains_the_final_layer_again_on_training_and_validation(image_dir, tmp_path):
    """Issue 19: by default, once its validation accuracy is judged, the new layer is trained again on the
    training and validation images together (+0.2 points on unseen photos by CV); --no-refit keeps the first.
    The validation accuracy reported is the first layer's in both runs; the final layers differ."""
    import tensorflow as tf

    from retrain.export import OUTPUT_NAME
    bottlenecks, outputs, results = tmp_path / "bottlenecks", {}, {}
    for flag in ("--refit", "--no-refit"):
        outputs[flag] = tmp_path / flag.strip("-")
        results[flag] = run_retrain("--image_dir", image_dir, "--architecture", "mobilenet_v2", "--weights",
                                    TEST_WEIGHTS, "--how_many_training_steps", 200, "--validation_percentage", 30,
                                    "--output_dir", outputs[flag], "--bottleneck_dir", bottlenecks,
                                    "--summaries_dir", "", "--tflite_quantization", "none", flag)
    sidecars = {flag: json.loads((out / "model.json").read_text()) for flag, out in outputs.items()}
    validation = {flag: re.search(r"validation accuracy = ([\d.]+) \(N=(\d+)\)", result.stdout)
                  for flag, result in results.items()}
    assert validation["--refit"].groups() == validation["--no-refit"].groups()  # the same first layer, judged
    assert sidecars["--refit"]["accuracy"]["validation"] == sidecars["--no-refit"]["accuracy"]["validation"]
    assert (sidecars["--refit"]["refit"], sidecars["--no-refit"]["refit"]) == (True, False)
    refit = re.search(r"refitting the new layer on the (\d+) training and (\d+) validation images",
                      results["--refit"].stdout)
    split = re.search(r"(\d+) training, (\d+) validation, \d+ testing images", results["--refit"].stderr)
    assert refit and refit.groups() == split.groups(), results["--refit"].stdout
    assert "refitting" not in results["--no-refit"].stdout

    def weights(out):  # the final layer's kernel, as frozen into graph.pb
        graph = tf.compat.v1.GraphDef.FromString((out / "graph.pb").read_bytes())
        kernels = [n for n in graph.node if n.op == "Const" and OUTPUT_NAME in n.name
                   and len(tf.make_ndarray(n.attr["value"].tensor).shape) == 2]
        return tf.make_ndarray(kernels[0].attr["value"].tensor)
    assert not np.allclose(weights(outputs["--refit"]), weights(outputs["--no-refit"]))
    page = (outputs["--refit"] / "report.html").read_text()
    assert "validation (the layer before its refit on training + validation)" in page
    assert "before its refit" not in (outputs["--no-refit"] / "report.html").read_text()
