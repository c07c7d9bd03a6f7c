"""The ImageNet backbones retrain can build on, each with its input size and scaling.

Most come from keras.applications; EfficientNet-Lite, the family TensorFlow Lite Model Maker trains by
default, comes from KerasHub (`keras_hub.models.EfficientNetBackbone`), whose weights are presets: a
folder with config.json, model.weights.h5 and the image converter that says how the preset's pixels are
scaled. Every model built here takes raw RGB pixel values in [0, 255]; the backbone's own preprocessing
is the first layer of the graph (or, for EfficientNetV2 and ConvNeXt, already inside keras' model), so
whoever runs the graph never needs to know it.
"""
import hashlib
import os
from dataclasses import dataclass, field

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
    fine_tune_learning_rate: float = 1e-4  # --fine_tune_learning_rate's default, by CV (docs/benchmark-history.md
                                           # runs Q and V)
    # KerasHub backbones: the constructor's arguments (the architecture, for --weights none; a preset
    # folder brings its own config), and the published preset --weights imagenet loads ("" when none is).
    hub_config: dict = field(default_factory=dict, hash=False, compare=False)
    hub_preset: str = ""
    # The same rule for a fine-tuned model, where it differs ("": `quantization`).
    fine_tuned_quantization: str = ""

    @property
    def from_hub(self):
        return bool(self.hub_config)

    def default_quantization(self, fine_tuned: bool) -> str:
        """--tflite_quantization auto: the fastest within 0.5 points of float, by CV."""
        return (fine_tuned and self.fine_tuned_quantization) or self.quantization


def efficientnet_lite(repeats, filters):
    """KerasHub EfficientNetBackbone's arguments for an EfficientNet-Lite: EfficientNet-B0's blocks with
    ReLU6, no squeeze-and-excitation and a fixed stem, so that it quantizes well (Google's
    efficientnet/lite); Lite1-4 differ only in repeats and filters, given here already rounded."""
    return dict(
        stackwise_width_coefficients=[1.0] * 7, stackwise_depth_coefficients=[1.0] * 7, dropout=0,
        depth_divisor=8, min_depth=None, activation="relu6", input_shape=(None, None, 3),
        stackwise_kernel_sizes=[3, 3, 5, 3, 5, 5, 3], stackwise_num_repeats=repeats,
        stackwise_input_filters=[32, *filters[:-1]], stackwise_output_filters=filters,
        stackwise_expansion_ratios=[1, 6, 6, 6, 6, 6, 6], stackwise_squeeze_and_excite_ratios=[0] * 7,
        stackwise_strides=[1, 2, 2, 2, 1, 2, 1], stackwise_block_types=["v1"] + ["unfused"] * 6,
        stackwise_force_input_filters=[0] * 7, include_stem_padding=False, use_depth_divisor_as_min_depth=True,
        cap_round_filter_decrease=True, stem_conv_padding="same", batch_norm_momentum=0.9,
        batch_norm_epsilon=1e-3, projection_activation=None)


ARCHITECTURES = {
    a.name: a for a in (
        # Both scale to [-1, 1], as keras.applications' preprocess_input does for them.
        Architecture("inception_v3", "InceptionV3", 299, 1 / 127.5, -1.0, "dynamic"),
        # Fine-tuned, int8 costs MobileNetV2 0.6 points by 10-fold CV (run W), past the 0.5 allowed.
        Architecture("mobilenet_v2", "MobileNetV2", 224, 1 / 127.5, -1.0, "int8", fine_tuned_quantization="float16"),
        # These two take [0, 255] and normalise inside keras' model (include_preprocessing).
        # Their quantization default is the conservative one until measured (dynamic: weights only).
        Architecture("efficientnet_v2_b0", "EfficientNetV2B0", 224, 1.0, 0.0, "dynamic"),
        Architecture("convnext_tiny", "ConvNeXtTiny", 224, 1.0, 0.0, "dynamic"),
        Architecture("resnet50", "ResNet50", 224, 1.0, 0.0, "dynamic", caffe=True),
        # KerasHub. Google's weights take (x - 127) / 128, the scaling used with random weights; a preset's
        # own image converter says its scaling (timm's published Lite0 takes ImageNet's mean and std).
        # Their fine-tuning rate: 3e-4, 0.75 points over 1e-4 on Lite0 by 10-fold CV, 8 folds of 10 better (run V).
        Architecture("efficientnet_lite0", "EfficientNetBackbone", 224, 1 / 128, -127 / 128, "int8",
                     fine_tune_learning_rate=3e-4,
                     hub_config=efficientnet_lite([1, 2, 2, 3, 3, 4, 1], [16, 24, 40, 80, 112, 192, 320]),
                     hub_preset="efficientnet_lite0_ra_imagenet"),
        Architecture("efficientnet_lite2", "EfficientNetBackbone", 260, 1 / 128, -127 / 128, "int8",
                     fine_tune_learning_rate=3e-4,
                     hub_config=efficientnet_lite([1, 3, 3, 4, 4, 5, 1], [16, 24, 48, 88, 120, 208, 352])),
    )
}

IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)  # keras.applications.imagenet_utils, "caffe" mode


@keras.saving.register_keras_serializable(package="retrain")
class CaffePreprocessing(keras.layers.Layer):
    """ResNet50's preprocess_input as a layer: RGB [0, 255] to BGR minus ImageNet's channel means."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-1) - keras.ops.convert_to_tensor(IMAGENET_BGR_MEANS, inputs.dtype)


def weights_tag(arch, weights):
    """A short name for the weights, part of the bottleneck cache key: a digest of the file, or of a
    preset folder's files."""
    if weights in ("imagenet", "none"):
        return weights
    digest = hashlib.sha256()
    if arch.from_hub:
        folder = check_preset_folder(arch, weights)
        paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))]
    else:
        paths = [check_weights_file(weights)]
    for path in paths:
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(block)
    return "file-" + digest.hexdigest()[:12]


def check_weights_file(path):
    if not os.path.isfile(path):
        raise SystemExit(f"error: --weights {path}: no such file "
                         "(use imagenet, none, or a path to a .weights.h5 file)")
    return path


def check_preset_folder(arch, path):
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"error: --weights {path}: not a KerasHub preset folder (no config.json); "
                         f"{arch.name} takes imagenet, none, or a preset folder such as "
                         f"../shared/models/{arch.name}_imagenet")
    return path


def build_backbone(arch, weights):
    """The backbone with global average pooling: raw pixels in, pooled features out.

    `weights` is "imagenet" (downloaded and cached by Keras or KerasHub), "none" (random, but seeded so
    that cached bottlenecks stay valid across runs), a local .weights.h5 file, or for a KerasHub backbone a
    local preset folder.
    """
    if weights == "none":
        keras.utils.set_random_seed(0)
    base, scaling = (hub_base(arch, weights) if arch.from_hub else application_base(arch, weights))
    inputs = keras.Input((arch.size, arch.size, 3), name="input")
    return keras.Model(inputs, base(scaling(inputs)), name=f"{arch.name}_backbone")


def application_base(arch, weights):
    """(keras.applications' model with average pooling, the layer that scales pixels for it)."""
    application = getattr(keras.applications, arch.application)
    try:
        base = application(input_shape=(arch.size, arch.size, 3), include_top=False,
                           weights="imagenet" if weights == "imagenet" else None, pooling="avg")
    except Exception as exc:  # Keras raises several kinds when the download fails
        raise SystemExit(f"error: could not get the ImageNet weights of {arch.name}: {exc}\n"
                         "Offline? Pass --weights PATH to a local .weights.h5 file "
                         "(or --weights none for random weights, tests only).") from None
    if weights not in ("imagenet", "none"):
        base.load_weights(check_weights_file(weights))
    if arch.caffe:
        return base, CaffePreprocessing(name="scale")
    return base, keras.layers.Rescaling(arch.scale, arch.offset, name="scale")


def hub_base(arch, weights):
    """(KerasHub's backbone with average pooling, the layer that scales pixels as its preset's image
    converter does). The converter's resizing is left out: the shared preprocessing has already sized
    the image, as for every backbone."""
    import keras_hub
    backbone_class = getattr(keras_hub.models, arch.application)
    if weights == "none":
        backbone, scale, offset = backbone_class(**arch.hub_config), arch.scale, arch.offset
    else:
        if weights == "imagenet" and not arch.hub_preset:
            raise SystemExit(f"error: KerasHub publishes no ImageNet preset of {arch.name}; pass --weights with "
                             f"a local preset folder (e.g. ../shared/models/{arch.name}_imagenet)")
        preset = arch.hub_preset if weights == "imagenet" else check_preset_folder(arch, weights)
        try:
            backbone = backbone_class.from_preset(preset)
            converter = keras_hub.layers.ImageConverter.from_preset(preset)
        except Exception as exc:  # a failed download raises several kinds
            raise SystemExit(f"error: could not get KerasHub's preset {preset} of {arch.name}: {exc}\n"
                             "Offline? Pass --weights with a local preset folder "
                             "(or --weights none for random weights, tests only).") from None
        if tuple(converter.image_size or (arch.size, arch.size)) != (arch.size, arch.size):
            raise SystemExit(f"error: the preset {preset} takes {converter.image_size} images; "
                             f"{arch.name} is built for {arch.size}x{arch.size}")
        scale, offset = converter.scale, converter.offset
    # One functional model of the backbone's own layers, so that fine-tuning unfreezes the top ones.
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    return (keras.Model(backbone.inputs, pooled, name=arch.name),
            keras.layers.Rescaling(1.0 if scale is None else scale, 0.0 if offset is None else offset,
                                   name="scale"))
