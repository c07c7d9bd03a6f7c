"""Guard: re-run when retrain changes; its wall time, bottleneck throughput and accuracy, with targets.

Benchmark `python -m retrain` on the real flower photos with MobileNetV2's ImageNet weights.

    .venv/bin/python -m bench.guards.retrain_bench [--fine_tune] [--diagnose]

Prints, as tables:
  * run 1 (fresh temp --bottleneck_dir, default flags): test accuracy, wall time and
    its phases (timed from the lines retrain prints, not from its progress bars);
  * bottleneck throughput of run 1 (images computed / time between retrain's
    "computed N bottlenecks in S s" line; the phase between its "computing N
    bottlenecks" and "N training, ... images" lines, which also builds the backbone,
    is shown too) against the raw forward throughput of the same frozen backbone
    graph, run the way retrain runs it (bottlenecks.frozen_forward, batches of 32,
    with 1 and with 2 calls at once) on random float32 batches in this process, right
    before and right after run 1, and their ratio (target >= 0.9);
  * run 2, reusing the cache: wall time and speedup over run 1 (target >= 10x);
  * with --fine_tune, a third run with --fine_tune (cache reused): test accuracy
    (target >= 0.93);
  * when the ratio is under 0.9 (or with --diagnose), where the time goes:
    the product's bottlenecks.get_bottlenecks run in this process on a subset of
    the images, with the same backbone, as is and with one thing changed at a time.

Everything goes into a temp folder that is removed at the end (--keep to keep it);
every child process is ended on exit. Nothing in retrain/ is changed.
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import threading
import time

from bench import _common as C

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_dir", default=C.FLOWERS)
    p.add_argument("--weights", default=C.MOBILENET_WEIGHTS)
    p.add_argument("--architecture", default="mobilenet_v2")
    p.add_argument("--fine_tune", action="store_true", help="also run retrain --fine_tune and report its accuracy")
    p.add_argument("--diagnose", action="store_true", help="run the diagnosis even if the ratio is >= 0.9")
    p.add_argument("--no_diagnose", action="store_true", help="never run the diagnosis")
    p.add_argument("--diagnose_images", type=int, default=640, help="images used by each diagnosis step")
    p.add_argument("--diagnose_rounds", type=int, default=2, help="rounds of the diagnosis (best is kept)")
    p.add_argument("--repeats", type=int, default=7, help="timed measurements per raw forward setting")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed to each retrain run")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (models, cache, logs)")
    return p.parse_args()


# ---------------------------------------------------------------- raw forward throughput

def raw_forward(forward, size, repeats, streams, batch=32, calls=3, seed=0):
    """Images/s of `forward` on random batches, `streams` calls at once: (best, median, all, per CPU-s).

    Each of `repeats` measurements times `streams` threads making `calls` calls each.
    """
    import numpy as np
    x = np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    for _ in range(2):  # first-run optimisation and allocations
        forward(x)

    def loop():
        for _ in range(calls):
            forward(x)

    rates = []
    cpu0 = time.process_time()
    for _ in range(repeats):
        threads = [threading.Thread(target=loop) for _ in range(streams)]
        t = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        rates.append(batch * calls * streams / (time.perf_counter() - t))
    per_cpu_second = batch * calls * streams * repeats / (time.process_time() - cpu0)
    rates.sort()
    return rates[-1], rates[len(rates) // 2], rates, per_cpu_second


def raw_forwards(forward, size, repeats):
    """raw_forward with 1 and with 2 calls at once (get_bottlenecks makes 2)."""
    return {streams: raw_forward(forward, size, repeats, streams) for streams in (1, 2)}


# ---------------------------------------------------------------- retrain runs

def retrain_cmd(flags, out, bottleneck_dir, extra=()):
    return [sys.executable, "-m", "retrain", "--image_dir", flags.image_dir, "--architecture", flags.architecture,
            "--weights", flags.weights, "--bottleneck_dir", bottleneck_dir, "--output_dir", out,
            "--summaries_dir", os.path.join(out, "summaries"), *extra]


def run_retrain(name, cmd, timeout, log_path):
    C.log(f"{name}: {' '.join(cmd)}")
    cpu_log = []
    code, wall, lines = C.run_timed(cmd, timeout, cpu_log=cpu_log)
    with open(log_path, "w") as f:
        for t, stream, line in lines:
            f.write(f"{t:9.2f} {stream} {line}\n")
    if code != 0:
        tail = "\n".join(line for _, _, line in lines[-30:])
        raise SystemExit(f"{name} failed with exit code {code}:\n{tail}")
    C.log(f"{name}: {wall:.1f} s")
    return wall, lines, cpu_log


def first(lines, text):
    for t, _, line in lines:
        if text in line:
            return t, line
    return None, None


def cpu_at(cpu_log, t):
    """CPU seconds the child had used at its line printed at time t."""
    return min(cpu_log, key=lambda entry: abs(entry[0] - t))[1] if cpu_log and t is not None else None


def phases(lines, wall):
    """Seconds spent in each phase of one retrain run, from the lines it prints."""
    t_compute, compute_line = first(lines, "bottlenecks (")
    t_computed, computed_line = first(lines, "computed ")
    t_sets, _ = first(lines, " training, ")
    t_loading, _ = first(lines, "loading images")
    t_val, _ = first(lines, "validation accuracy =")
    t_wrote, _ = first(lines, "wrote ")
    computed = int(compute_line.split("computing ")[1].split()[0]) if compute_line else 0
    compute_seconds = float(computed_line.split(" in ")[1].split()[0]) if computed_line else None
    marks = [("start-up: imports, image list, cache check", 0.0, t_compute or t_sets),
             ("backbone built, frozen, loaded", t_compute, t_computed - compute_seconds if t_computed else None),
             ("bottlenecks computed", t_computed - compute_seconds if t_computed else None, t_computed),
             ("(bottleneck phase: the two above and the cache read)", t_compute, t_sets if t_compute else None),
             ("head training" + (" + fine-tuning" if t_loading else ""), t_sets, t_val),
             ("evaluation, export of graph.pb", t_val, t_wrote),
             ("exit", t_wrote, wall)]
    rows = [(name, b - a) for name, a, b in marks if a is not None and b is not None]
    return rows, computed, compute_seconds, t_computed


def accuracy_of(out):
    with open(os.path.join(out, "model.json")) as f:
        return json.load(f)["accuracy"]


# ---------------------------------------------------------------- diagnosis

def diagnose(flags, forward, feature_dim, arch, paths, work, raw_best):
    """Where does get_bottlenecks lose against the raw forward rate? One change at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from classify_contract import atomic
    from classify_contract.preprocessing import decode_image
    from retrain import bottlenecks

    size = arch.size
    rows = []
    quiet = contextlib.redirect_stderr(io.StringIO())

    def rate(n, seconds):
        return n / seconds

    # Decoding alone, with 1 and 2 threads.
    sample = paths[::max(1, len(paths) // 256)][:256]
    t = time.perf_counter()
    for p in sample:
        decode_image(p, (size, size))
    decode1 = rate(len(sample), time.perf_counter() - t)
    with ThreadPoolExecutor(2) as pool:
        t = time.perf_counter()
        list(pool.map(lambda p: decode_image(p, (size, size)), sample))
        decode2 = rate(len(sample), time.perf_counter() - t)
    rows.append(("decode_image alone, 1 thread", decode1, None, "JPEG decode + resize to float32"))
    rows.append(("decode_image alone, 2 threads", decode2, None, ""))

    # The cache write: atomic.write_bytes (fsync per file) against a plain write.
    vector = np.zeros(feature_dim, np.float32)
    blob = io.BytesIO()
    np.save(blob, vector)
    scratch = os.path.join(work, "diag-writes")
    t = time.perf_counter()
    for i in range(200):
        atomic.write_bytes(os.path.join(scratch, "a", f"{i}.npy"), blob.getvalue(), durable=True)
    fsync_ms = (time.perf_counter() - t) / 200 * 1000
    t = time.perf_counter()
    for i in range(200):
        atomic.write_bytes(os.path.join(scratch, "b", f"{i}.npy"), blob.getvalue(), durable=False)
    plain_ms = (time.perf_counter() - t) / 200 * 1000
    shutil.rmtree(scratch, ignore_errors=True)

    # Forward pass while two threads keep decoding (what the pipeline does).
    stop = threading.Event()

    def decode_forever():
        i = 0
        while not stop.is_set():
            decode_image(paths[i % len(paths)], (size, size))
            i += 1

    decoders = [threading.Thread(target=decode_forever, daemon=True) for _ in range(2)]
    for d in decoders:
        d.start()
    contended = raw_forward(forward, size, max(3, flags.repeats // 2), 1)[0]
    stop.set()
    for d in decoders:
        d.join()
    rows.append(("forward(32), 1 call at a time, while 2 threads decode", contended, contended / raw_best,
                 "TF threads and decode threads share 2 cores"))

    # The product's get_bottlenecks on a subset, as is and with one change at a time.
    step = max(1, len(paths) // flags.diagnose_images)
    subset = paths[::step][:flags.diagnose_images]  # spread over every class and set
    real_write = atomic.write_bytes

    def no_write(path, data, durable=True):
        pass

    best = {}

    def run(label, note, batch_size=bottlenecks.BATCH_SIZE, write=None, **threads):
        cache = tempfile.mkdtemp(dir=work, prefix="diag-cache.")
        saved = {name: getattr(bottlenecks, name) for name in threads}
        try:
            if write:
                atomic.write_bytes = write
            for name, value in threads.items():
                setattr(bottlenecks, name, value)
            with quiet:
                t = time.perf_counter()
                features, _ = bottlenecks.get_bottlenecks(subset, lambda: forward, size, cache,
                                                          batch_size=batch_size)
                seconds = time.perf_counter() - t
        finally:
            atomic.write_bytes = real_write
            for name, value in saved.items():
                setattr(bottlenecks, name, value)
            shutil.rmtree(cache, ignore_errors=True)
        r = rate(len(features), seconds)
        C.log(f"diagnose: {label}: {r:.1f} img/s")
        best.setdefault((label, note), []).append(r)

    # Rounds, best per variant: the machine is shared, one slow round is noise.
    for _ in range(flags.diagnose_rounds):
        run("get_bottlenecks as is (batch 32, 2 decode threads, 2 forward calls at once)",
            "the product code path, warm")
        run("  ... without the cache write", "atomic.write_bytes replaced by a no-op", write=no_write)
        run("  ... 1 decode thread", "", DECODE_THREADS=1)
        run("  ... 1 forward call at a time", "", FORWARD_THREADS=1)
        run("  ... batch 64", "", batch_size=64)
    for (label, note), rates in best.items():
        rows.append((label, max(rates), max(rates) / raw_best,
                     (note + "; " if note else "") + "runs: " + " ".join(f"{r:.1f}" for r in rates)))
    return rows, fsync_ms, plain_ms, decode1, decode2


# ---------------------------------------------------------------- main

def main():
    flags = parse_args()
    flags.image_dir = os.path.abspath(flags.image_dir)
    flags.weights = os.path.abspath(flags.weights) if flags.weights not in ("imagenet", "none") else flags.weights
    work = tempfile.mkdtemp(prefix="retrain_bench.")
    C.log(f"work folder {work}; load average {' '.join(C.load_average())}")
    busy_before = C.other_busy_processes()
    revision = C.revision()
    try:
        report = bench(flags, work)
    finally:
        if flags.keep:
            C.log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        C.stop_all()
    busy_after = C.other_busy_processes()
    print(report)
    C.print_machine(os.cpu_count(), revision, busy_before + busy_after)


def bench(flags, work):
    import keras  # noqa: F401  (imports TensorFlow)

    from retrain import backbones, bottlenecks, export, images

    arch = backbones.ARCHITECTURES[flags.architecture]
    lists = images.create_image_lists([flags.image_dir], 10, 10)
    paths = [p for s in lists.sets().values() for ps in s.values() for p in ps]
    C.log(f"{len(paths)} images; building and freezing the {arch.name} backbone in this process")
    backbone = backbones.build_backbone(arch, flags.weights)
    feature_dim = backbone.output_shape[-1]
    forward = bottlenecks.frozen_forward(
        export.frozen_graph_def(backbone, [None, arch.size, arch.size, 3], export.BOTTLENECK_NAME))

    raw_before = raw_forwards(forward, arch.size, flags.repeats)
    C.log("raw forward before run 1: " + "; ".join(f"{n} at once: median {r[1]:.1f} img/s"
                                                   for n, r in raw_before.items()))

    cache = os.path.join(work, "bottlenecks")
    out1, out2, out3 = (os.path.join(work, n) for n in ("model1", "model2", "model_fine_tune"))
    cmd1 = retrain_cmd(flags, out1, cache)
    wall1, lines1, cpu1 = run_retrain("run 1 (empty cache)", cmd1, flags.timeout, os.path.join(work, "run1.log"))
    raw_after = raw_forwards(forward, arch.size, flags.repeats)
    C.log("raw forward after run 1: " + "; ".join(f"{n} at once: median {r[1]:.1f} img/s"
                                                  for n, r in raw_after.items()))
    cmd2 = retrain_cmd(flags, out2, cache)
    wall2, lines2, _ = run_retrain("run 2 (cache reused)", cmd2, flags.timeout, os.path.join(work, "run2.log"))

    phases1, computed, compute_seconds, t_computed = phases(lines1, wall1)
    phases2, _, _, _ = phases(lines2, wall2)
    acc1, acc2 = accuracy_of(out1), accuracy_of(out2)
    # Every raw measurement of the better setting (1 or 2 calls at once), before and after run 1.
    raw_all = {n: sorted(raw_before[n][2] + raw_after[n][2]) for n in raw_before}
    raw_median = {n: rates[len(rates) // 2] for n, rates in raw_all.items()}
    streams = max(raw_median, key=raw_median.get)
    raw_best, raw_med = raw_all[streams][-1], raw_median[streams]
    bottleneck_rate = computed / compute_seconds if compute_seconds else None
    ratio = bottleneck_rate / raw_best if bottleneck_rate else None
    speedup = wall1 / wall2
    # Per CPU-second of the process, which other load on the machine affects much less
    # than per second of wall time: the bottleneck computation's (decode threads included)
    # against the raw forward pass's.
    phase_cpu = (cpu_at(cpu1, t_computed) - cpu_at(cpu1, t_computed - compute_seconds)) if compute_seconds else None
    per_cpu = computed / phase_cpu if phase_cpu else None
    raw_per_cpu = max(raw_before[streams][3], raw_after[streams][3])

    def shown(arg):
        arg = str(arg)
        if arg == sys.executable:
            return ".venv/bin/python" if arg.startswith(C.ROOT) else "python"
        if os.path.isabs(arg) and not os.path.relpath(arg, C.ROOT).startswith("../.."):
            return os.path.relpath(arg, C.ROOT)
        return arg

    short = lambda cmd: " ".join(shown(c) for c in cmd)  # noqa: E731
    out = [f"# retrain benchmark ({arch.name}, {len(paths)} images, weights {os.path.basename(flags.weights)})\n",
           f"Run 1: `{short(cmd1)}`\n", "Run 2: same, --output_dir elsewhere, same --bottleneck_dir\n"]
    out.append(C.table(
        ["measure", "value", "target", "met"],
        [("test accuracy, run 1 (default flags)", f"{acc1['test']:.4f}", "", ""),
         ("validation accuracy, run 1", f"{acc1['validation']:.4f}", "", ""),
         ("wall time, run 1 (empty cache), s", wall1, "", ""),
         ("bottlenecks computed in run 1", str(computed), "", ""),
         ("time retrain took to compute them, s", compute_seconds, "", ""),
         ("bottleneck throughput, img/s", bottleneck_rate, "", ""),
         (f"raw forward throughput, best, img/s ({streams} call(s) at once, the better)", raw_best, "", ""),
         ("raw forward throughput, median, img/s", raw_med, "", ""),
         ("ratio bottleneck / raw best", f"{ratio:.3f}" if ratio else "-", ">= 0.9",
          "yes" if ratio and ratio >= 0.9 else "no"),
         ("ratio bottleneck / raw median", f"{bottleneck_rate / raw_med:.3f}" if ratio else "-", "", ""),
         ("CPU of that computation, core-seconds (cores busy)",
          f"{phase_cpu:.1f} ({phase_cpu / compute_seconds:.2f})" if phase_cpu else "-", "", ""),
         ("bottlenecks per CPU-second", per_cpu, "", ""),
         ("raw forward images per CPU-second (best of before/after)", raw_per_cpu, "", ""),
         ("  ratio per CPU-second (efficiency, robust to other load)",
          f"{per_cpu / raw_per_cpu:.3f}" if per_cpu else "-", "", ""),
         ("wall time, run 2 (cache reused), s", wall2, "", ""),
         ("test accuracy, run 2", f"{acc2['test']:.4f}", "", ""),
         ("speedup run 1 / run 2", f"{speedup:.2f}x", ">= 10x", "yes" if speedup >= 10 else "no")],
        "Results"))
    out.append(C.table(["raw forward measurement", "calls at once", "best img/s", "median img/s",
                        "img per CPU-s", "all img/s"],
                       [(when, n, r[0], r[1], r[3], " ".join(f"{x:.1f}" for x in r[2]))
                        for when, raws in (("before run 1", raw_before), ("after run 1", raw_after))
                        for n, r in raws.items()],
                       "Raw forward throughput (the frozen backbone, bottlenecks.frozen_forward, "
                       "this process, random batches of 32)"))
    rows = []
    d2 = dict(phases2)
    for name, seconds in phases1:
        rows.append((name, seconds, d2.get(name)))
    out.append(C.table(["phase", "run 1, s", "run 2, s"], rows,
                       "Phases (from the times retrain printed its lines)"))

    if flags.fine_tune:
        cmd3 = retrain_cmd(flags, out3, cache, ["--fine_tune"])
        wall3, lines3, _ = run_retrain("run 3 (--fine_tune)", cmd3, flags.timeout, os.path.join(work, "run3.log"))
        acc3 = accuracy_of(out3)
        phases3 = phases(lines3, wall3)[0]
        out.append(C.table(
            ["measure", "value", "target", "met"],
            [("test accuracy, --fine_tune", f"{acc3['test']:.4f}", ">= 0.93", "yes" if acc3["test"] >= 0.93 else "no"),
             ("validation accuracy, --fine_tune", f"{acc3['validation']:.4f}", "", ""),
             ("wall time, --fine_tune (cache reused), s", wall3, "", "")]
            + [(f"  phase: {n}, s", s, "", "") for n, s in phases3],
            f"Fine-tuning: `{short(cmd3)}`"))

    if flags.diagnose or (ratio is not None and ratio < 0.9 and not flags.no_diagnose):
        C.log("diagnosing the bottleneck throughput")
        rows, fsync_ms, plain_ms, decode1, decode2 = diagnose(flags, forward, feature_dim, arch, paths, work,
                                                              raw_best)
        out.append(C.table(["in-process variant", "img/s", "/ raw best", "note"],
                           [(a, b, f"{c:.3f}" if c else "-", d) for a, b, c, d in rows],
                           f"Diagnosis: get_bottlenecks on {min(len(paths), flags.diagnose_images)} images "
                           "in this process (warm, same frozen backbone), one change at a time"))
        per_batch_ms = 32 * fsync_ms
        out.append(f"Cache write: atomic.write_bytes {fsync_ms:.2f} ms per file with durable=True (fsync), "
                   f"{plain_ms:.2f} ms with durable=False (what get_bottlenecks uses now); per batch of 32, "
                   f"{per_batch_ms:.0f} ms vs {32 * plain_ms:.0f} ms on the main thread, serial with a "
                   f"{32 / raw_best * 1000:.0f} ms forward pass.\n"
                   f"Decode: {decode1:.0f} img/s on 1 thread, {decode2:.0f} img/s on 2; i.e. "
                   f"{1000 / decode1:.1f} ms per image, {raw_best / decode1 * 100:.0f}% of a core at the raw "
                   "forward rate.\n")
    return "\n".join(out)


if __name__ == "__main__":
    main()
