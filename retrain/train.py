"""Training: the new softmax layer on cached bottlenecks, and optional fine-tuning.

The model is built in one place, `build_classifier`: raw pixels -> backbone
(scaling included) -> new softmax layer named `final_result`.
"""
import keras
import numpy as np
import tensorflow as tf

from classify_contract.preprocessing import decode_image
from retrain import progress


class ProgressBar(keras.callbacks.Callback):
    """A progress bar over training steps, with the latest validation accuracy."""

    def __init__(self, total_steps, steps_per_epoch, desc):
        super().__init__()
        self.bar = progress.bar(total=total_steps, unit="step", desc=desc)
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.bar.update(self.steps_per_epoch)
        self.bar.set_postfix(loss=f"{logs.get('loss', 0):.3f}", train_acc=f"{logs.get('accuracy', 0):.3f}",
                             val_acc=f"{logs.get('val_accuracy', float('nan')):.3f}")
        if epoch == 0 or (epoch + 1) % 10 == 0:
            progress.write(f"step {(epoch + 1) * self.steps_per_epoch}: train accuracy {logs.get('accuracy', 0):.3f}, "
                       f"validation accuracy {logs.get('val_accuracy', float('nan')):.3f}")

    def on_train_end(self, logs=None):
        self.bar.close()


def build_head(feature_dim, class_count, l2=0.0):
    # An L2 penalty keeps the layer from memorising the training set: it is a
    # logistic regression on the features, and it generalises like a regularised one.
    # A fixed seed: the same bottlenecks give the same layer, whether this run computed
    # them (and built the backbone, which draws from Keras' default seed) or read them.
    return keras.Sequential([keras.Input((feature_dim,), name="bottleneck"),
                             keras.layers.Dense(class_count, activation="softmax", name="final_result",
                                                kernel_initializer=keras.initializers.GlorotUniform(seed=0),
                                                kernel_regularizer=keras.regularizers.L2(l2) if l2 else None)],
                            name="head")


def build_classifier(backbone, head, augmentation=None):
    """Raw RGB pixels in [0, 255] -> class probabilities; augmentation only acts in training."""
    inputs = keras.Input(backbone.input_shape[1:], name="input")
    x = augmentation(inputs) if augmentation is not None else inputs
    return keras.Model(inputs, head(backbone(x)), name="classifier")


def _fit(model, dataset, validation, epochs, steps_per_epoch, summaries_dir, desc):
    callbacks = [ProgressBar(epochs * steps_per_epoch, steps_per_epoch, desc)]
    if validation is not None:
        # Keep the epoch that did best on validation, not merely the last: fine-tuning's
        # accuracy moves a point or two from epoch to epoch on a few thousand images.
        callbacks.append(keras.callbacks.EarlyStopping("val_accuracy", patience=epochs, restore_best_weights=True,
                                                       verbose=1))
    if summaries_dir:
        callbacks.append(keras.callbacks.TensorBoard(summaries_dir))
    return model.fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch,
                     validation_data=validation, callbacks=callbacks, verbose=0,
                     shuffle=False)  # the dataset shuffles itself


def train_head(train_x, train_y, val, class_count, flags, history=None, quiet=False):
    """Train the softmax layer on cached bottlenecks, as retrain.py did; each report (every
    --eval_step_interval steps) is appended to `history` when given, and printed unless `quiet` (a fit
    among many, e.g. retrain.label_issues' folds, which show their own progress).

    Each step trains on a random batch of --train_batch_size bottlenecks. The
    --eval_step_interval steps between two reports run as one TensorFlow graph
    call, which is several times faster than Keras' fit on such a small layer.
    """
    head = build_head(train_x.shape[1], class_count, flags.l2_regularization)
    # The rate decays to zero over the run, so the layer settles at the end instead of
    # jittering with the last random batches (run to run, test accuracy varies less).
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(
        flags.learning_rate, flags.how_many_training_steps))
    cross_entropy = keras.losses.SparseCategoricalCrossentropy()
    x, y = tf.constant(train_x), tf.constant(train_y)
    batch_size = min(flags.train_batch_size, len(train_x))
    tf.random.set_seed(0)

    @tf.function
    def run_steps(count):
        loss, accuracy = tf.constant(0.0), tf.constant(0.0)
        for _ in tf.range(count):
            batch = tf.random.uniform([batch_size], 0, len(train_x), tf.int32)
            labels = tf.gather(y, batch)
            with tf.GradientTape() as tape:
                probabilities = head(tf.gather(x, batch), training=True)
                loss = cross_entropy(labels, probabilities) + sum(head.losses)
            optimizer.apply_gradients(zip(tape.gradient(loss, head.trainable_variables), head.trainable_variables))
            accuracy = tf.reduce_mean(tf.cast(tf.argmax(probabilities, 1) == labels, tf.float32))
        return loss, accuracy

    writers = {}
    if flags.summaries_dir:
        writers = {name: tf.summary.create_file_writer(f"{flags.summaries_dir}/head/{name}")
                   for name in ("train", "validation")}
    steps, interval = flags.how_many_training_steps, max(1, flags.eval_step_interval)
    with progress.bar(total=steps, unit="step", desc="training head", disable=quiet) as bar:
        for step in range(0, steps, interval):
            count = min(interval, steps - step)
            loss, train_accuracy = (float(v) for v in run_steps(tf.constant(count)))
            scores = {"train": {"loss": loss, "accuracy": train_accuracy}}
            if val is not None:
                scores["validation"] = {"accuracy": accuracy_of(head, *val)}
            val_accuracy = scores.get("validation", {}).get("accuracy", float("nan"))
            bar.update(count)
            bar.set_postfix(loss=f"{loss:.3f}", train_acc=f"{train_accuracy:.3f}",
                            **({"val_acc": f"{val_accuracy:.3f}"} if val is not None else {}))
            done = step + count
            if not quiet and (step == 0 or done % (10 * interval) == 0 or done == steps):
                progress.write(f"step {done}: train accuracy {train_accuracy:.3f}"
                               + (f", validation accuracy {val_accuracy:.3f}" if val is not None else ""))
            if history is not None:
                history.append({"step": done, "loss": loss, "train_accuracy": train_accuracy,
                                "validation_accuracy": val_accuracy})
            for name, writer in writers.items():
                with writer.as_default(step=done):
                    for key, value in scores.get(name, {}).items():
                        tf.summary.scalar(key, value)
    return head


def accuracy_of(model, x, y):
    return float(np.mean(np.argmax(model.predict_on_batch(x), axis=1) == y))


def augmentation_layers(flags):
    """retrain.py's distortion flags as Keras preprocessing layers (training only)."""
    layers = []
    if flags.flip_left_right:
        layers.append(keras.layers.RandomFlip("horizontal"))
    if flags.random_crop:
        layers.append(keras.layers.RandomZoom((-flags.random_crop / 100.0, 0.0)))
    if flags.random_scale:
        layers.append(keras.layers.RandomZoom((0.0, flags.random_scale / 100.0)))
    if flags.random_brightness:
        layers.append(keras.layers.RandomBrightness(flags.random_brightness / 100.0, value_range=(0, 255)))
    return keras.Sequential(layers, name="augmentation") if layers else None


def load_images(paths, size):
    """Decode images once into uint8 memory for training on pixels (augmentation, fine-tuning)."""
    return np.stack([decode_image(p, (size, size)).astype(np.uint8)
                     for p in progress.bar(paths, unit="img", desc="loading images")])


def train_on_images(backbone, head, train_paths, train_y, val, arch, flags, history=None):
    """Train on pixels (`arch`'s size): the head with augmented inputs, and with --fine_tune the backbone's
    top; Keras' per-epoch history goes into the dict `history` when given."""
    size = arch.size
    augmentation = augmentation_layers(flags)
    model = build_classifier(backbone, head, augmentation)
    if flags.fine_tune:
        # Unfreeze the top of the backbone; BatchNorm layers stay frozen so their
        # statistics, learned on ImageNet, are not disturbed by small batches.
        backbone.trainable = True
        layers = [layer for layer in backbone.layers[-1].layers]
        cut = int(len(layers) * (1 - flags.fine_tune_fraction))
        for i, layer in enumerate(layers):
            layer.trainable = i >= cut
            # Keras has no public walk of a layer's sublayers (KerasHub's blocks hold their own BatchNorms).
            for sublayer in layer._flatten_layers(include_self=True):
                if isinstance(sublayer, keras.layers.BatchNormalization):
                    sublayer.trainable = False
    else:
        backbone.trainable = False
    steps_per_epoch = max(1, len(train_paths) // flags.fine_tune_batch_size)
    # As for the head: the rate decays to zero, so the last epochs settle instead of jitter.
    start = arch.fine_tune_learning_rate if flags.fine_tune_learning_rate == "auto" else flags.fine_tune_learning_rate
    rate = keras.optimizers.schedules.CosineDecay(start,
                                                  flags.fine_tune_epochs * steps_per_epoch)
    model.compile(optimizer=keras.optimizers.Adam(rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train_x = load_images(train_paths, size)
    dataset = (tf.data.Dataset.from_tensor_slices((train_x, train_y))
               .shuffle(len(train_x), seed=0).repeat()
               .map(lambda x, y: (tf.cast(x, tf.float32), y)).batch(flags.fine_tune_batch_size)
               .prefetch(2))
    val_x, val_y = val
    val_images = (load_images(val_x, size).astype(np.float32), val_y) if len(val_x) else None
    fitted = _fit(model, dataset, val_images, flags.fine_tune_epochs, steps_per_epoch,
                  flags.summaries_dir and flags.summaries_dir + "/fine_tune", "fine-tuning")
    if history is not None:
        history.update({key: [float(v) for v in values] for key, values in fitted.history.items()})
    return build_classifier(backbone, head)
