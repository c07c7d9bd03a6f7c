"""retrain's functions in this process: the split, the bottleneck cache, atomic writes, the CLI's errors
(its main()), the outputs of `trained_model`, training/serving skew (the frozen graph against the Keras
model) and training on pixels. Whole runs of `python -m retrain` are e2e/test_retrain_runs.py's.
"""
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image
from support.images import CLASSES, broken_jpeg, make_image_dir, shape_image
from support.models import MOBILENET_WEIGHTS, TEST_WEIGHTS, run_frozen_graph

from classify_contract import atomic
from classify_contract.preprocessing import decode_image
from retrain.bottlenecks import cache_path, get_bottlenecks
from retrain.images import create_image_lists, which_set

# The cheapest real configuration; --summaries_dir "" skips TensorBoard logs.
FAST = ("--architecture", "mobilenet_v2", "--weights", "none", "--summaries_dir", "")
MODEL_FILES = {"graph.pb", "labels.txt", "model.json", "model.tflite", "report.html", "report"}


def touch_files(folder, names):
    """Empty files: the split looks only at names, so nothing needs decoding."""
    for name in names:
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()


def set_of_each(lists):
    return {path: name for name, image_set in lists.sets().items() for paths in image_set.values()
            for path in paths}


# --- the split -------------------------------------------------------------------------------

def test_split_is_stable_when_images_are_added(tmp_path):
    names = [f"{label}/img_{i:03d}.jpg" for label in ("cats", "dogs") for i in range(60)]
    touch_files(tmp_path, names)
    before = set_of_each(create_image_lists([str(tmp_path)], 20, 20))
    assert set(before.values()) == {"training", "validation", "testing"}   # a split worth checking

    touch_files(tmp_path, [f"{label}/new_{i:03d}.jpg" for label in ("cats", "dogs", "birds") for i in range(60)])
    after = set_of_each(create_image_lists([str(tmp_path)], 20, 20))
    assert len(after) == len(before) + 180
    assert {path: after[path] for path in before} == before


def test_nohash_variants_share_a_set(tmp_path):
    sets = {}
    for i in range(100):
        variants = {which_set(f"photo{i}_nohash_{k}.jpg", 20, 20) for k in range(5)}
        assert len(variants) == 1, f"photo{i}: variants split over {variants}"
        sets[i] = variants.pop()
    assert len(set(sets.values())) == 3   # different photos do spread over the sets

    # Through create_image_lists, with directories in the path.
    touch_files(tmp_path, [f"a/photo{i}_nohash_{k}.jpg" for i in range(30) for k in range(3)]
                + ["b/other.jpg"])   # a second class, as create_image_lists requires
    by_path = set_of_each(create_image_lists([str(tmp_path)], 20, 20))
    for i in range(30):
        assert len({by_path[str(tmp_path / f"a/photo{i}_nohash_{k}.jpg")] for k in range(3)}) == 1


@pytest.mark.parametrize("validation, testing", [(10, 20), (10, 10), (0, 30)])
def test_split_percentages_are_roughly_respected(validation, testing):
    names = [f"IMG_{i:04d}.jpg" for i in range(1000)]
    counts = {name: 0 for name in ("training", "validation", "testing")}
    for name in names:
        counts[which_set(name, validation, testing)] += 1
    # Deterministic (a hash), so no flakiness; +-5 points is 3.5 binomial sigmas.
    assert abs(counts["validation"] - 10 * validation) <= 50, counts
    assert abs(counts["testing"] - 10 * testing) <= 50, counts
    assert counts["training"] == 1000 - counts["validation"] - counts["testing"]


# --- the bottleneck cache ----------------------------------------------------------------------

SIZE = 16


@pytest.fixture(scope="module")
def tiny_backbone():
    """A real (small) Keras model standing in for the backbone: same contract, milliseconds."""
    import keras
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Rescaling(1 / 255.0),
                             keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.GlobalAveragePooling2D()])


class CountingForward:
    """The real forward pass, counting the images it is asked to compute."""

    def __init__(self, model, fail_on_call=None):
        self.model, self.images, self.calls, self.fail_on_call = model, 0, 0, fail_on_call
        self.lock = threading.Lock()  # get_bottlenecks calls it from two threads

    def __call__(self, batch):
        with self.lock:
            self.calls += 1
            if self.calls == self.fail_on_call:
                raise RuntimeError("killed midway")
            self.images += len(batch)
        return self.model.predict_on_batch(batch)


@pytest.fixture
def cache_case(tmp_path, tiny_backbone):
    """12 images, an empty cache dir, and a fresh counter."""
    images = make_image_dir(tmp_path / "images", per_class=4)
    paths = sorted(os.path.join(images, label, name) for label in os.listdir(images)
                   for name in os.listdir(os.path.join(images, label)))
    return paths, str(tmp_path / "cache"), lambda **kw: CountingForward(tiny_backbone, **kw)


def cache_files(cache_dir):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(cache_dir) for f in files)


def test_second_run_reuses_the_cache(cache_case):
    paths, cache_dir, counter = cache_case
    first = counter()
    features, skipped = get_bottlenecks(paths, lambda: first, SIZE, cache_dir, batch_size=4)
    assert first.images == len(paths) and not skipped and set(features) == set(paths)
    assert len(cache_files(cache_dir)) == len(paths)

    def no_network():
        raise AssertionError("the network was built although every bottleneck is cached")
    again, skipped = get_bottlenecks(paths, no_network, SIZE, cache_dir, batch_size=4)
    assert not skipped
    for path in paths:
        np.testing.assert_allclose(again[path], features[path], rtol=1e-6)


def test_a_newer_image_is_recomputed(cache_case, tiny_backbone):
    paths, cache_dir, counter = cache_case
    features, _ = get_bottlenecks(paths, counter, SIZE, cache_dir, batch_size=4)
    # Replace one photo and make it clearly newer than its cache file.
    changed = paths[0]
    with open(changed, "wb") as f:
        f.write(shape_image("green_square", 12345))
    future = time.time() + 100
    os.utime(changed, (future, future))

    second = counter()
    again, _ = get_bottlenecks(paths, lambda: second, SIZE, cache_dir, batch_size=4)
    assert second.images == 1
    expected = tiny_backbone.predict_on_batch(decode_image(changed, (SIZE, SIZE))[None])[0]
    np.testing.assert_allclose(again[changed], expected, rtol=1e-5)
    assert not np.allclose(again[changed], features[changed])
    for path in paths[1:]:
        np.testing.assert_array_equal(again[path], features[path])


@pytest.mark.parametrize("corrupt", [
    lambda data: os.urandom(len(data)),
    lambda data: data[:-16],   # whole header, half the 8 floats
    lambda data: data[:60],    # half the 128-byte header
    lambda data: b"",
], ids=["garbage", "data-cut", "header-cut", "empty"])
def test_a_corrupt_cache_file_is_recomputed(cache_case, corrupt):
    paths, cache_dir, counter = cache_case
    features, _ = get_bottlenecks(paths, counter, SIZE, cache_dir, batch_size=4)
    victim = cache_path(cache_dir, paths[3])
    with open(victim, "rb") as f:
        data = f.read()
    with open(victim, "wb") as f:
        f.write(corrupt(data))
    future = time.time() + 100   # newer than the image: only the content can tell it is bad
    os.utime(victim, (future, future))

    second = counter()
    again, skipped = get_bottlenecks(paths, lambda: second, SIZE, cache_dir, batch_size=4)
    assert second.images == 1 and not skipped
    np.testing.assert_allclose(again[paths[3]], features[paths[3]], rtol=1e-5)
    np.testing.assert_allclose(np.load(victim), features[paths[3]], rtol=1e-5)   # repaired


def test_same_name_in_two_image_folders_keeps_two_bottlenecks(tmp_path, tiny_backbone):
    paths = [str(tmp_path / root / "cats" / "IMG_0001.jpg") for root in ("photos", "feedback")]
    for path, label in zip(paths, ("red_circle", "green_square")):
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(shape_image(label, 1))
    cache_dir = str(tmp_path / "cache")
    first, _ = get_bottlenecks(paths, lambda: CountingForward(tiny_backbone), SIZE, cache_dir)
    assert not np.allclose(first[paths[0]], first[paths[1]])
    second, _ = get_bottlenecks(paths, lambda: CountingForward(tiny_backbone), SIZE, cache_dir)
    for path in paths:
        np.testing.assert_allclose(second[path], first[path], rtol=1e-5)


def test_cache_files_are_written_atomically(cache_case):
    paths, cache_dir, counter = cache_case
    # A run that dies in its second network call keeps the batches computed before, whole,
    # and no temp files. (Two batches run at once, so the one that failed may be the third.)
    with pytest.raises(RuntimeError, match="killed midway"):
        get_bottlenecks(paths, lambda: counter(fail_on_call=2), SIZE, cache_dir, batch_size=4)
    written = cache_files(cache_dir)
    assert len(written) in (4, 8)
    for path in written:
        assert path.endswith(".npy") and not os.path.basename(path).startswith(".")
        assert np.load(path).shape == (8,)

    resumed = counter()
    get_bottlenecks(paths, lambda: resumed, SIZE, cache_dir, batch_size=4)
    assert resumed.images == len(paths) - len(written)
    assert len(cache_files(cache_dir)) == len(paths)
    assert not [f for f in cache_files(cache_dir) if f.endswith(".tmp") or "/." in f]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "graph.pb"
    atomic.write_bytes(str(path), b"old model")
    with pytest.raises(TypeError):
        atomic.write_bytes(str(path), "not bytes")   # fails inside the write
    assert path.read_bytes() == b"old model"
    assert os.listdir(tmp_path) == ["graph.pb"]


def test_unreadable_images_are_skipped_with_a_reason(cache_case):
    paths, cache_dir, counter = cache_case
    broken = os.path.join(os.path.dirname(paths[0]), "broken.jpg")
    with open(broken, "wb") as f:
        f.write(broken_jpeg())
    features, skipped = get_bottlenecks(paths + [broken], counter, SIZE, cache_dir, batch_size=4)
    assert set(features) == set(paths)
    assert list(skipped) == [broken] and "truncated" in skipped[broken]
    assert not os.path.exists(cache_path(cache_dir, broken))


# In-process: main() ends with SystemExit("error: ..."), which Python prints to stderr
# before exiting with status 1; the subprocess tests below check that for real.
@pytest.mark.parametrize("case, expected", [
    ("one_class", ["found 1 class(es)", "need at least 2", "one subfolder per class"]),
    ("corrupt_class", ["class 'blue_triangle' has no usable image", "add images or remove its folder"]),
    ("missing_image_dir", ["no_such_dir", "does not exist"]),
    ("unknown_architecture", ["unknown --architecture 'resnet9000'", "inception_v3, mobilenet_v2"]),
    ("missing_weights", ["--weights", "missing.weights.h5: no such file", "imagenet, none, or a path"]),
])
def test_cli_errors_are_clear(error_dirs, tmp_path, capsys, case, expected):
    from retrain import cli
    root = error_dirs["root"]
    args = {"one_class": ["--image_dir", error_dirs["one"], *FAST],
            "corrupt_class": ["--image_dir", error_dirs["corrupt"], *FAST],
            "missing_image_dir": ["--image_dir", root / "no_such_dir", *FAST],
            "unknown_architecture": ["--image_dir", error_dirs["good"], "--architecture", "resnet9000",
                                     "--weights", "none"],
            "missing_weights": ["--image_dir", error_dirs["good"], "--architecture", "mobilenet_v2",
                                "--weights", root / "missing.weights.h5"]}[case]
    with pytest.raises(SystemExit) as exit_:
        cli.main([*map(str, args), "--output_dir", str(tmp_path / "model"),
                  "--bottleneck_dir", str(tmp_path / "bottlenecks"), "--summaries_dir", ""])
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: "), message   # exit status 1
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not os.path.exists(tmp_path / "model")
    if case == "corrupt_class":   # the warning names the unreadable files
        stderr = capsys.readouterr().err
        assert "bad_0.jpg" in stderr and "bad_1.jpg" in stderr


# --- outputs -----------------------------------------------------------------------------------

def test_outputs_are_complete_and_consistent(trained_model, image_dir):
    assert set(os.listdir(trained_model)) == MODEL_FILES   # and no temp files left behind
    with open(os.path.join(trained_model, "labels.txt")) as f:
        labels = f.read().splitlines()
    assert labels == sorted(os.listdir(image_dir)) == sorted(CLASSES)
    with open(os.path.join(trained_model, "model.json")) as f:
        info = json.load(f)
    assert info["input"] == "input:0" and info["output"] == "final_result:0"
    assert info["input_height"] == info["input_width"] == 224
    assert info["architecture"] == "mobilenet_v2"
    # Issue 20: the weights file and the image folder are both recorded as absolute paths.
    assert info["weights"] == (TEST_WEIGHTS if TEST_WEIGHTS == "none" else os.path.abspath(TEST_WEIGHTS))
    assert os.path.isabs(info["image_dir"])
    assert info["labels_count"] == 3 and info["graph"] == "graph.pb" and info["labels"] == "labels.txt"
    assert set(info["accuracy"]) == {"validation", "test"}
    assert all(0 <= v <= 1 for v in info["accuracy"].values())

    # The graph answers one probability per label at the tensors the sidecar names.
    path = os.path.join(image_dir, "red_circle", "red_circle_000.jpg")
    batch = decode_image(path, (224, 224))[None]
    probabilities = run_frozen_graph(os.path.join(trained_model, "graph.pb"), info["input"], info["output"], batch)
    assert probabilities.shape == (1, 3)
    np.testing.assert_allclose(probabilities.sum(), 1, atol=1e-5)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.skipif(_umask() & 0o044 != 0, reason="the umask itself hides files from group/others")
def test_model_files_are_readable_by_others(trained_model):
    # tempfile.mkstemp makes 0600 files: a server running as another user could not read them.
    files = [os.path.join(folder, name) for folder, _, names in os.walk(trained_model) for name in names]
    assert len(files) > len(MODEL_FILES)  # the report's pictures too
    for path in files:
        mode = os.stat(path).st_mode & 0o777
        assert mode == 0o666 & ~_umask(), f"{path} is {oct(mode)}"


def test_training_on_pixels_keeps_the_epoch_best_on_validation():
    # A learning rate far too high makes validation accuracy jump from epoch to epoch;
    # the model that comes back must be the best epoch's, not merely the last one's.
    import keras

    from retrain import train
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=256) > 0).astype(np.int64)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(30.0), "sparse_categorical_crossentropy", metrics=["accuracy"])
    import tensorflow as tf
    dataset = tf.data.Dataset.from_tensor_slices((x[:192], y[:192])).repeat().batch(16)
    history = train._fit(model, dataset, (x[192:], y[192:]), 6, 12, None, "test").history["val_accuracy"]
    best = int(np.argmax(history))
    assert best != len(history) - 1, f"the last epoch was the best, nothing to check: {history}"
    kept = float(np.mean(np.argmax(model.predict_on_batch(x[192:]), 1) == y[192:]))
    assert kept == pytest.approx(history[best]), (kept, history)


# --- training/serving skew ---------------------------------------------------------------------

def skew_images(folder, image_dir):
    """Files of many kinds, decoded by the one decode_image on both sides."""
    paths = [os.path.join(image_dir, label, f"{label}_{i:03d}.jpg") for label in sorted(CLASSES) for i in (0, 1)]
    extra = {
        "rgba.png": (Image.new("RGBA", (90, 70), (200, 10, 10, 120)), "PNG", {}),
        "gray.jpg": (Image.new("L", (50, 80), 90), "JPEG", {}),
        "big.jpg": (Image.open(io.BytesIO(shape_image("blue_triangle", 7, size=(900, 600)))), "JPEG", {}),
        "anim.gif": (Image.new("RGB", (40, 40), (0, 200, 0)), "GIF",
                     {"save_all": True, "append_images": [Image.new("RGB", (40, 40), (0, 0, 200))]}),
    }
    exif = Image.Exif()
    exif[0x0112] = 6
    extra["rotated.jpg"] = (Image.open(io.BytesIO(shape_image("red_circle", 8, size=(300, 200)))), "JPEG",
                            {"exif": exif.tobytes()})
    for name, (image, fmt, params) in extra.items():
        path = os.path.join(folder, name)
        image.save(path, fmt, **params)
        paths.append(path)
    return paths


def test_frozen_graph_gives_the_keras_models_probabilities(tmp_path, image_dir):
    from retrain import backbones, export, train
    # Random backbone weights give features of ~1e-12 that barely depend on the image,
    # so use the real ones when available; the head is scaled to the features anyway.
    weights = MOBILENET_WEIGHTS if os.path.isfile(MOBILENET_WEIGHTS) else "none"
    arch = backbones.ARCHITECTURES["mobilenet_v2"]
    backbone = backbones.build_backbone(arch, weights)
    paths = skew_images(str(tmp_path), image_dir)
    batch = np.stack([decode_image(p, (arch.size, arch.size)) for p in paths])

    # Head weights that make the probabilities swing with the features, so a small
    # difference in pixels or numerics would show in the comparison.
    features = backbone.predict(batch, verbose=0)
    head = train.build_head(features.shape[1], 3)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(features.shape[1], 3)) / (features.std(axis=0)[:, None] + 1e-30)
    kernel *= 3 / np.sqrt(features.shape[1])
    bias = -features.mean(axis=0) @ kernel
    head.get_layer("final_result").set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    model = train.build_classifier(backbone, head)

    in_memory = model.predict(batch, verbose=0)
    assert np.ptp(in_memory, axis=0).max() > 0.3, in_memory   # the probabilities do depend on the image
    # Both ways retrain writes graph.pb: the whole model frozen (after fine-tuning), and
    # the frozen backbone with the frozen head appended (after training the head alone).
    graphs = {"whole": export.frozen_graph_def(model, [None, arch.size, arch.size, 3]),
              "stitched": export.stitched_graph_def(
                  export.frozen_graph_def(backbone, [None, arch.size, arch.size, 3], export.BOTTLENECK_NAME),
                  export.frozen_graph_def(head, [None, features.shape[1]]))}
    for name, graph_def in graphs.items():
        assert [n.name for n in graph_def.node if n.op == "Placeholder"] == ["input"], name
        out = tmp_path / name
        export.write_model(str(out / "graph.pb"), str(out / "labels.txt"), graph_def, arch.size, sorted(CLASSES),
                           {"architecture": arch.name, "weights": weights})
        info = json.loads((out / "model.json").read_text())
        frozen = run_frozen_graph(str(out / "graph.pb"), info["input"], info["output"], batch)
        assert frozen.shape == in_memory.shape == (len(paths), 3)
        assert np.abs(frozen - in_memory).max() <= 1e-4, name


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_lite_architectures_are_the_shared_presets_architectures(name):
    """Issue 29: the EfficientNet-Lite built for --weights none is the very architecture of the shared preset
    (KerasHub's config, argument for argument), so that random weights cost what the real ones do; and a
    weights file where a preset folder is needed says so."""
    import keras_hub
    from support.models import SHARED

    from retrain import backbones
    arch = backbones.ARCHITECTURES[name]
    preset = os.path.join(SHARED, "models", f"{name}_imagenet")
    with open(os.path.join(preset, "config.json")) as f:
        expected = json.load(f)["config"]
    built = keras_hub.models.EfficientNetBackbone(**arch.hub_config).get_config()
    for key in set(expected) - {"name", "dtype", "trainable"}:
        assert json.loads(json.dumps(built[key])) == expected[key], key
    with pytest.raises(SystemExit, match="not a KerasHub preset folder"):
        backbones.weights_tag(arch, os.path.join(SHARED, "models", "mobilenet_v2_1.0_224_no_top.weights.h5"))
    assert backbones.weights_tag(arch, preset).startswith("file-")
