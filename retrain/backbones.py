"""The ImageNet backbones retrain can build on (keras.applications), each with its input size and scaling.

Every model built here takes raw RGB pixel values in [0, 255]; the backbone's own
preprocessing is the first layer of the graph (or, for EfficientNetV2 and ConvNeXt,
already inside keras' model), so whoever runs the graph never needs to know it.
"""
import hashlib
import os
from dataclasses import dataclass

import keras


@dataclass(frozen=True)
class Architecture:
    name: str
    application: str       # class name in keras.applications
    size: int              # input height = width
    scale: float           # pixels are fed to the backbone as x * scale + offset
    offset: float
    quantization: str      # --tflite_quantization's default: the fastest within 0.5 points of float
                           # (docs/operations.md: Engines)
    caffe: bool = False    # preprocess_input's "caffe" mode instead: RGB to BGR, minus ImageNet's channel means


ARCHITECTURES = {
    a.name: a for a in (
        # Both scale to [-1, 1], as keras.applications' preprocess_input does for them.
        Architecture("inception_v3", "InceptionV3", 299, 1 / 127.5, -1.0, "dynamic"),
        Architecture("mobilenet_v2", "MobileNetV2", 224, 1 / 127.5, -1.0, "int8"),
        # These two take [0, 255] and normalise inside keras' model (include_preprocessing).
        # Their quantization default is the conservative one until measured (dynamic: weights only).
        Architecture("efficientnet_v2_b0", "EfficientNetV2B0", 224, 1.0, 0.0, "dynamic"),
        Architecture("convnext_tiny", "ConvNeXtTiny", 224, 1.0, 0.0, "dynamic"),
        Architecture("resnet50", "ResNet50", 224, 1.0, 0.0, "dynamic", caffe=True),
    )
}

IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)  # keras.applications.imagenet_utils, "caffe" mode


@keras.saving.register_keras_serializable(package="retrain")
class CaffePreprocessing(keras.layers.Layer):
    """ResNet50's preprocess_input as a layer: RGB [0, 255] to BGR minus ImageNet's channel means."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-1) - keras.ops.convert_to_tensor(IMAGENET_BGR_MEANS, inputs.dtype)


def weights_tag(weights):
    """A short name for the weights, part of the bottleneck cache key."""
    if weights in ("imagenet", "none"):
        return weights
    digest = hashlib.sha256()
    with open(check_weights_file(weights), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "file-" + digest.hexdigest()[:12]


def check_weights_file(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: --weights {path}: no such file "
                         "(use imagenet, none, or a path to a .weights.h5 file)")
    return path


def build_backbone(arch, weights):
    """The backbone with global average pooling: raw pixels in, pooled features out.

    `weights` is "imagenet" (Keras downloads and caches it), "none" (random, but
    seeded so that cached bottlenecks stay valid across runs) or a local file.
    """
    application = getattr(keras.applications, arch.application)
    if weights == "none":
        keras.utils.set_random_seed(0)
    try:
        base = application(input_shape=(arch.size, arch.size, 3), include_top=False,
                           weights="imagenet" if weights == "imagenet" else None, pooling="avg")
    except Exception as exc:  # Keras raises several kinds when the download fails
        raise SystemExit(f"error: could not get the ImageNet weights of {arch.name}: {exc}\n"
                         "Offline? Pass --weights PATH to a local .weights.h5 file "
                         "(or --weights none for random weights, tests only).") from None
    if weights not in ("imagenet", "none"):
        base.load_weights(check_weights_file(weights))
    inputs = keras.Input((arch.size, arch.size, 3), name="input")
    if arch.caffe:
        features = CaffePreprocessing(name="scale")(inputs)
    else:
        features = keras.layers.Rescaling(arch.scale, arch.offset, name="scale")(inputs)
    return keras.Model(inputs, base(features), name=f"{arch.name}_backbone")
