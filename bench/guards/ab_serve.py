"""Guard: re-run for any change to the serving path; two commits measured in one run, alternating.

The serving path of two commits side by side, in one run: did a change make the server slower?

    .venv/bin/python -m bench.guards.ab_serve --old COMMIT [--new COMMIT] [--rounds 5] [--duration 5]

Each commit is checked out in a temporary git worktree (removed at exit) and served from there,
`gunicorn classify_server:app` with that commit's gunicorn.conf.py defaults, over one model
(inception_v3, random weights: each image costs what a real one does). Both servers stay up; wrk
(the multipart POST of serve_bench.py, a 500x375 flower JPEG) loads one at a time, alternating
old/new and new/old round after round, at each concurrency, so that the machine's drift falls on
both sides alike. Prints every run, then per concurrency the median req/s and p50 of each side,
their spread (min-max), and new / old: of the medians, and the median of each round's own ratio.

Traffic goes to 127.0.0.1 only; every wrk run and wait is bounded; every process is ended at exit.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from bench import _common as C
from bench.guards import serve_bench  # its multipart body, wrk script and runner


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the commit to compare against (e.g. the one before a change)")
    p.add_argument("--new", default="HEAD", help="the commit measured (default HEAD)")
    p.add_argument("--rounds", type=int, default=5, help="runs of each side at each concurrency (default 5)")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--concurrency", default="1,4", help="comma-separated wrk connection counts (default 1,4)")
    p.add_argument("--architecture", default="inception_v3")
    p.add_argument("--model_dir", help="serve this model folder instead of training one of --architecture")
    p.add_argument("--env", default="", help="settings of both servers, NAME=VALUE,NAME=VALUE (e.g. MODEL_ENGINE=tflite)")
    p.add_argument("--image", help="the JPEG to send (default: the first 500x375 flower photo)")
    return p.parse_args(argv)


def checkout(commit, folder):
    """`commit` in a new git worktree at `folder` (detached); its full hash."""
    subprocess.run(["git", "-C", C.ROOT, "worktree", "add", "--detach", "-q", folder, commit], check=True)
    return subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def serve(checkout_dir, model_dir, log_path, settings=()):
    """gunicorn from `checkout_dir` (its code, its gunicorn.conf.py), ready: its port."""
    env = serve_bench.caller_env()
    env.update({"MODEL_DIR": model_dir, "MODEL_POLL_SECONDS": "0", "ACCESS_LOG": ""})
    env.update(dict(settings))  # --env wins (e.g. ACCESS_LOG=/dev/null for a commit where empty meant '-')
    return C.start_gunicorn(checkout_dir, env, log_path)[1]


def main(argv=None):
    flags = parse_args(argv)
    concurrency = [int(c) for c in flags.concurrency.split(",")]
    work = tempfile.mkdtemp(prefix="ab-serve-")
    trees = {}
    try:
        for side, commit in (("old", flags.old), ("new", flags.new)):
            folder = os.path.join(work, side)
            trees[side] = (folder, checkout(commit, folder))
        model_dir = flags.model_dir or C.make_model(work, flags.architecture, 200)
        settings = [item.split("=", 1) for item in flags.env.split(",") if item]
        image = flags.image or serve_bench.default_image()
        _, lua = serve_bench.write_body(image, work)
        ports = {side: serve(folder, model_dir, os.path.join(work, f"{side}.log"), settings)
                 for side, (folder, _) in trees.items()}
        for port in ports.values():  # warm both: first runs of each shape, connection set-up
            serve_bench.wrk(f"http://127.0.0.1:{port}/", lua, max(concurrency), 3)
        runs = {(side, c): [] for side in ports for c in concurrency}
        for r in range(flags.rounds):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for c in concurrency:
                for side in order:
                    result = serve_bench.wrk(f"http://127.0.0.1:{ports[side]}/", lua, c, flags.duration)
                    bad = result["non200"] + result["socket_errors"]
                    runs[side, c].append((result["rps"], result["p50_us"] / 1000, bad))
                    C.log(f"round {r + 1} c={c} {side}: {result['rps']:.2f} req/s, p50 {result['p50_us'] / 1000:.1f} ms"
                          f", {bad} errors")
        rows = []
        for c in concurrency:
            old, new = runs["old", c], runs["new", c]
            rps = {side: [x for x, _, _ in runs[side, c]] for side in ("old", "new")}
            p50 = {side: statistics.median(x for _, x, _ in runs[side, c]) for side in ("old", "new")}
            paired = statistics.median(n[0] / o[0] for o, n in zip(old, new))  # the same round: the same minutes
            rows.append([c] + [f"{statistics.median(rps[s]):.2f} ({min(rps[s]):.2f}-{max(rps[s]):.2f})"
                               for s in ("old", "new")]
                        + [f"{statistics.median(rps['new']) / statistics.median(rps['old']):.3f}", f"{paired:.3f}",
                           f"{p50['old']:.1f}", f"{p50['new']:.1f}", f"{p50['new'] - p50['old']:+.1f}",
                           sum(b for _, _, b in old + new)])
        print(C.table(["c", f"old {trees['old'][1]} req/s (min-max)", f"new {trees['new'][1]} req/s (min-max)",
                       "new / old (medians)", "new / old (per round, median)", "old p50 ms", "new p50 ms",
                       "p50 new - old", "errors"], rows,
                      title=f"{flags.rounds} alternating runs of {flags.duration} s per side and concurrency"))
        C.print_machine(os.cpu_count() or 1, f"old {trees['old'][1]}, new {trees['new'][1]}",
                        C.other_busy_processes())
    finally:
        C.stop_all()
        for folder, _ in trees.values():
            subprocess.run(["git", "-C", C.ROOT, "worktree", "remove", "--force", folder], check=False)
        subprocess.run(["rm", "-rf", work], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
