"""Study: chose retrain's defaults (L2, --refit, fine-tuning) by cross-validation; re-run only to choose again.

Choose retrain's settings by k-fold cross-validation over all the shared flower photos, never by the
test split of one run.

    .venv/bin/python -m bench.studies.cv                                   # retrain's defaults, 5 folds
    .venv/bin/python -m bench.studies.cv --variants "default;l2_regularization=0.001;how_many_training_steps=8000"
    .venv/bin/python -m bench.studies.cv --folds 10 --variants "no-refit;default"  # as users train: 10 % test
    .venv/bin/python -m bench.studies.cv --bottleneck_dir /var/tmp/cv-bottlenecks   # keep the cache between runs
    .venv/bin/python -m bench.studies.cv --only_folds 1,2 --variants "fine_tune;fine_tune,fine_tune_fraction=0.6"
    .venv/bin/python -m bench.studies.cv --architecture efficientnet_lite2 --folds 10 --seeds 0,1,2
    .venv/bin/python -m bench.studies.cv --architecture efficientnet_lite0 --folds 10 --variants fine_tune --quantization int8

MobileNetV2 on the real ImageNet weights (../shared) by default; --architecture efficientnet_lite0 or
efficientnet_lite2 takes the shared KerasHub presets (--weights for others). Every photo's bottleneck is computed once, as
retrain computes and caches them (--bottleneck_dir; a temp folder by default), so each fold of each
variant costs only the training of the new layer: seconds. The photos are shuffled (once per --seeds entry, 0 by
default) and dealt into --folds folds; for each fold, retrain's path is run on the others with retrain's flags (its
defaults, with the variant's NAME=VALUE changes, parsed by retrain's own parser) and judged on the
held-out fold: the new layer on the training folds less a validation share, then, with --refit (the
default), again on all of them. With 10 folds that is what a user's run does (10 % test, 10 % of the
rest validation). A variant with fine_tune (e.g. "fine_tune") runs retrain's fine-tuning on each fold
too (minutes a fold: its training photos' pixels, a fresh backbone; --only_folds screens such variants
on a few folds first); with --quantization, its model.tflite too, as a row of its own ("fine_tune [int8]": put the
variant first to pair that row against it). Prints each variant's accuracy per shuffle (the mean of its folds), the mean, stdev and range over
every fold of every shuffle, and the mean difference from the first variant over the same folds
(paired: the same photos on both sides); and the seconds each stage took.
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from bench import _common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--variants", default="default",
                   help="';'-separated variants, each 'default' or retrain flags NAME=VALUE,NAME=VALUE")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the shuffles that deal the photos into "
                                                "folds: each is one complete cross-validation")
    p.add_argument("--architecture", default="mobilenet_v2", help="retrain's --architecture")
    p.add_argument("--weights", help="retrain's --weights (default: the shared weights of the architecture)")
    p.add_argument("--bottleneck_dir", help="the bottleneck cache (default: a temp folder, removed at the end)")
    p.add_argument("--quantization", default="",
                   help="also judge each fine_tune variant's model.tflite in this quantization (e.g. int8), converted "
                        "from its frozen graph as retrain converts it: a row 'VARIANT [int8]', paired like the others")
    p.add_argument("--only_folds", help="comma-separated fold numbers to run (default: all), to screen slow "
                                        "variants before a full run")
    return p.parse_args(argv)


class FlowerFolds:
    """Every shared flower photo's bottleneck (real weights, cached as retrain caches them) and its fold."""

    def __init__(self, cache_dir, folds, seed=0, architecture="mobilenet_v2", weights=None):
        weights = weights or C.SHARED_WEIGHTS.get(architecture, "imagenet")
        if not (os.path.isdir(C.FLOWERS) and os.path.exists(weights)):
            raise SystemExit(f"needs {C.FLOWERS} and {weights}")
        from classify_contract import tf_noise
        from retrain import bottlenecks, steps
        tf_noise.import_tensorflow_quietly()
        self.arch, self.weights = steps.choose_architecture(architecture), weights
        self.labels = sorted(d for d in os.listdir(C.FLOWERS) if os.path.isdir(os.path.join(C.FLOWERS, d)))
        photos = [(os.path.join(C.FLOWERS, label, name), i) for i, label in enumerate(self.labels)
                  for name in sorted(os.listdir(os.path.join(C.FLOWERS, label)))]
        backbone = steps.Backbone(self.arch, weights, cache_dir)
        C.log(f"bottlenecks of {len(photos)} photos ({architecture})")
        start = time.time()
        features, _ = bottlenecks.get_bottlenecks([p for p, _ in photos],
                                                  lambda: bottlenecks.frozen_forward(backbone.graph_def),
                                                  self.arch.size, backbone.cache_dir)
        self.bottleneck_seconds = time.time() - start
        self.backbone_def = backbone.graph_def
        kept = [i for i, (p, _) in enumerate(photos) if p in features]
        self.paths = [photos[i][0] for i in kept]
        self.x = np.stack([features[p] for p in self.paths])
        self.y = np.array([photos[i][1] for i in kept])
        self.folds = folds
        self.reshuffle(seed)

    def reshuffle(self, seed):
        """Deal the photos into the folds anew, by the shuffle `seed` (stratified by the shuffle alone)."""
        self.fold = np.random.default_rng(seed).permutation(len(self.y)) % self.folds

    def split(self, fold):
        """(training rows, held-out rows) of `fold`."""
        return np.where(self.fold != fold)[0], np.where(self.fold == fold)[0]


def retrain_flags(variant):
    """retrain's flags, its defaults changed by `variant` ('default' or NAME=VALUE,...)."""
    from retrain import cli
    argv = ["--summaries_dir", ""]
    if variant != "default":
        for item in variant.split(","):
            name, _, value = (part.strip() for part in item.partition("="))
            argv += [f"--{name}"] + ([value] if value else [])
    return cli.parse_args(argv)


def validation_split(train_rows, settings):
    """(validation rows, the rest): --validation_percentage of the training folds, by a seeded draw."""
    shuffled = np.random.default_rng(1).permutation(train_rows)
    cut = len(shuffled) * settings.validation_percentage // 100
    return shuffled[:cut], shuffled[cut:]


def head_accuracy(data, train_rows, test_rows, settings):
    """The held-out fold's accuracy after retrain's default path: the new layer trained on the training
    folds less a validation share, or with --refit (the default) on all of them, as retrain ends up."""
    from retrain import train
    val_rows, fit_rows = validation_split(train_rows, settings)
    rows = train_rows if settings.refit and len(val_rows) else fit_rows
    head = train.train_head(data.x[rows], data.y[rows], None, len(data.labels), settings)
    return train.accuracy_of(head, data.x[test_rows], data.y[test_rows])


def fine_tuned_accuracy(data, train_rows, test_rows, settings, quantization=""):
    """The held-out fold's accuracy after retrain's --fine_tune path: the new layer on the bottlenecks, then
    the top of a fresh backbone trained on pixels, keeping the epoch best on a validation share of the
    training folds, as retrain does; and, with `quantization`, its model.tflite's (else None)."""
    from retrain import backbones, train
    val_rows, fit_rows = validation_split(train_rows, settings)
    head = train.train_head(data.x[fit_rows], data.y[fit_rows], (data.x[val_rows], data.y[val_rows]),
                            len(data.labels), settings)
    backbone = backbones.build_backbone(data.arch, data.weights)
    model = train.train_on_images(backbone, head, [data.paths[i] for i in fit_rows], data.y[fit_rows],
                                  ([data.paths[i] for i in val_rows], data.y[val_rows]), data.arch, settings)
    test_paths = [data.paths[i] for i in test_rows]
    pixels = train.load_images(test_paths, data.arch.size).astype(np.float32)
    accuracy = float(np.mean(np.argmax(model.predict(pixels, verbose=0), axis=1) == data.y[test_rows]))
    if not quantization:
        return accuracy, None
    from retrain import export, tflite
    content = tflite.convert(export.frozen_graph_def(model, [None, data.arch.size, data.arch.size, 3]),
                             data.arch.size, quantization, [data.paths[i] for i in fit_rows])
    return accuracy, float(np.mean(tflite.predictions(content, data.arch.size, test_paths) == data.y[test_rows]))


def main(argv=None):
    flags = parse_args(argv)
    work = flags.bottleneck_dir or tempfile.mkdtemp(prefix="cv-")
    try:
        seeds = [int(seed) for seed in flags.seeds.split(",")]
        data = FlowerFolds(work, flags.folds, seeds[0], flags.architecture, flags.weights)
        variants = [v.strip() for v in flags.variants.split(";") if v.strip()]
        run = ([int(f) - 1 for f in flags.only_folds.split(",")] if flags.only_folds
               else list(range(flags.folds)))
        scores = {variant: {} for variant in variants}  # {variant: {seed: [accuracy of each fold]}}
        seconds = {variant: 0.0 for variant in variants}
        for seed in seeds:
            data.reshuffle(seed)
            for variant in variants:
                settings = retrain_flags(variant)
                folds = scores[variant][seed] = []
                for fold in run:
                    train_rows, test_rows = data.split(fold)
                    start = time.time()
                    if settings.fine_tune:
                        accuracy, quantized = fine_tuned_accuracy(data, train_rows, test_rows, settings,
                                                                  flags.quantization)
                        folds.append(accuracy)
                        if quantized is not None:
                            scores.setdefault(f"{variant} [{flags.quantization}]", {}).setdefault(seed, []).append(
                                quantized)
                        C.log(f"{variant}, seed {seed}, fold {fold + 1}: {accuracy:.4f}" + (
                            "" if quantized is None else f", model.tflite ({flags.quantization}) {quantized:.4f}"))
                    else:
                        folds.append(head_accuracy(data, train_rows, test_rows, settings))
                    seconds[variant] += time.time() - start
                C.log(f"{variant}, seed {seed}: " + " ".join(f"{a:.4f}" for a in folds))
        every = {variant: [a for seed in seeds for a in by_seed[seed]] for variant, by_seed in scores.items()}
        for variant in every:  # a model.tflite row: its conversion and judging, beside its fine-tuning's seconds
            seconds.setdefault(variant, 0.0)
        base = every[variants[0]]
        rows = [[v, *(f"{statistics.mean(scores[v][seed]):.4f}" for seed in seeds), f"{statistics.mean(s):.4f}",
                 f"{statistics.stdev(s):.4f}" if len(s) > 1 else "-",
                 f"{min(s):.4f} .. {max(s):.4f}", f"{statistics.mean(a - b for a, b in zip(s, base)):+.4f}",
                 f"{seconds[v] / len(s):.1f}" if seconds[v] else "-"]
                for v, s in every.items()]
        C.print_machine(os.cpu_count(), C.revision(), C.other_busy_processes())
        print(C.table(["variant", *(f"seed {seed}" for seed in seeds), "mean", "stdev", "range",
                       f"- {variants[0]} (paired)", "s/fold"], rows,
                      f"{flags.folds}-fold accuracy ({len(run)} folds run) x {len(seeds)} shuffles over "
                      f"{len(data.y)} flower photos, {flags.architecture} (real weights); bottlenecks: "
                      f"{data.bottleneck_seconds:.0f} s in this run (a few when cached)"))
    finally:
        if not flags.bottleneck_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
