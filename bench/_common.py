"""Helpers shared by the benchmark scripts: tables, child processes, /proc readings.

Every child process is started in a session of its own and registered here, so
that `stop_all` (run at exit, on SIGTERM and on Ctrl-C) can end its whole process
group: nothing a benchmark starts outlives it.
"""
import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
FLOWERS = os.path.join(SHARED, "data", "flower_photos")
MOBILENET_WEIGHTS = os.path.join(SHARED, "models", "mobilenet_v2_1.0_224_no_top.weights.h5")
# The real ImageNet weights ../shared has, by architecture (the others have random weights offline).
SHARED_WEIGHTS = {"mobilenet_v2": MOBILENET_WEIGHTS,
                  "efficientnet_lite0": os.path.join(SHARED, "models", "efficientnet_lite0_imagenet"),
                  "efficientnet_lite2": os.path.join(SHARED, "models", "efficientnet_lite2_imagenet")}

_children = []


def log(*args):
    print(time.strftime("[%H:%M:%S]"), *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tables

def fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def table(headers, rows, title=None):
    """A Markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) if _numeric(c) else c.ljust(w)
                                        for c, w in zip(row, widths)) + " |")
    return "\n".join(lines) + "\n"


def _numeric(text):
    t = text.replace(",", "").replace("x", "").replace("%", "").replace(" ms", "").strip()
    try:
        float(t)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- processes

def start(cmd, **kwargs):
    """Popen in a new session (its own process group), registered for cleanup."""
    kwargs.setdefault("start_new_session", True)
    process = subprocess.Popen(cmd, **kwargs)
    _children.append(process)
    return process


def stop(process, timeout=30):
    """SIGTERM the child's process group, SIGKILL it if it lingers, then any straggler of the group."""
    if process is None:
        return
    pgid = process.pid  # start() makes every child the leader of its own group
    if process.poll() is None:
        _signal_group(pgid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            process.wait()
    for pid in group_members(pgid):  # e.g. a worker whose master died first
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process in _children:
        _children.remove(process)


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid):
    return [pid for pid, fields in _proc_stats() if int(fields[2]) == pgid and fields[0] != "Z"]


def stop_all():
    for process in list(_children):
        stop(process, timeout=10)


def _on_signal(signum, frame):
    stop_all()
    raise SystemExit(128 + signum)


atexit.register(stop_all)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGHUP, _on_signal)


def run_timed(cmd, timeout, env=None, cwd=ROOT, echo=False, cpu_log=None):
    """Run `cmd`, timestamping every line (\\r or \\n ended) of stdout and stderr.

    Returns (returncode, wall seconds, [(seconds since start, stream, line)]).
    With a list as `cpu_log`, appends (seconds since start, CPU seconds the child has
    used so far) at every line. Kills the process group at `timeout`.
    """
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    process = start(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines, lock = [], threading.Lock()

    def pump(stream, name):
        buffer = b""
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            buffer += chunk
            while True:
                cut = min([i for i in (buffer.find(b"\n"), buffer.find(b"\r")) if i >= 0], default=-1)
                if cut < 0:
                    break
                line, buffer = buffer[:cut].decode(errors="replace"), buffer[cut + 1:]
                if line.strip():
                    now = time.monotonic() - t0
                    if cpu_log is not None:
                        cpu = cpu_seconds(process.pid)
                        if cpu is not None:
                            with lock:
                                cpu_log.append((now, cpu))
                    with lock:
                        lines.append((now, name, line))
                    if echo:
                        print(f"    {name}| {line}", file=sys.stderr, flush=True)
        if buffer.strip():
            with lock:
                lines.append((time.monotonic() - t0, name, buffer.decode(errors="replace")))

    threads = [threading.Thread(target=pump, args=(process.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(process.stderr, "err"), daemon=True)]
    for t in threads:
        t.start()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(process)
        raise RuntimeError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}") from None
    for t in threads:
        t.join(5)
    wall = time.monotonic() - t0
    stop(process)
    return process.returncode, wall, sorted(lines)


def rate(call, callers, seconds):
    """Calls per second, sustained: `callers` threads each calling `call(i)` (i: the caller's number)
    for `seconds`; `call` returns how many items it did."""
    counts, deadline = [0] * callers, time.perf_counter() + seconds

    def loop(i):
        while time.perf_counter() < deadline:
            counts[i] += call(i)

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- /proc

def flower_subset(images, per_class):
    """A folder of symlinks to the first `per_class` flower photos of each class (read in place)."""
    for label in sorted(os.listdir(FLOWERS)):
        folder = os.path.join(FLOWERS, label)
        if os.path.isdir(folder):
            os.makedirs(os.path.join(images, label))
            for name in sorted(os.listdir(folder))[:per_class]:
                os.symlink(os.path.join(folder, name), os.path.join(images, label, name))
    return images


def _proc_stats():
    """(pid, fields after the command name) of every process in /proc."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        yield int(name), stat[stat.rfind(")") + 2:].split()


def children_of(pid):
    """PIDs whose parent is `pid`."""
    return sorted(p for p, fields in _proc_stats() if int(fields[1]) == pid)


def descendants_of(pid):
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return sorted(out)


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average():
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def other_busy_processes(exclude=()):
    """Command lines of processes (not ours) that used CPU lately: the noise to report."""
    mine = set(exclude) | {os.getpid()}
    for p in _children:
        mine.add(p.pid)
        mine.update(descendants_of(p.pid))
    first = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in mine:
            c = cpu_seconds(int(name))
            if c is not None:
                first[int(name)] = c
    time.sleep(1.0)
    busy = []
    for pid, c0 in first.items():
        c1 = cpu_seconds(pid)
        if c1 is not None and c1 - c0 > 0.05:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            busy.append((round(c1 - c0, 2), cmd[:100]))
    return sorted(busy, reverse=True)


def revision():
    """The code measured: HEAD, and whether product files differ from it (others may edit them)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--", "retrain", "classify_server", "gunicorn.conf.py", "setup.py")
    files = [line[3:] for line in dirty.splitlines() if line.strip()]
    return f"commit {head}" + (f", with uncommitted changes in {', '.join(files)}" if files else ", product code clean")


def machine_cpu_seconds():
    """(busy, steal): CPU seconds all cores of this machine have spent busy (user, nice, system,
    irq, softirq) and stolen by the hypervisor, since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]] + [0] * 8
    tick = os.sysconf("SC_CLK_TCK")
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy / tick, fields[7] / tick


def print_machine(cores, code_revision, busy):
    """The "Machine" section every benchmark ends with: cores, load, code, other busy processes."""
    print("### Machine\n")
    print(f"{cores} cores; load average at the end {' '.join(load_average())}.")
    after = revision()
    print(f"Code: {code_revision}" + ("" if after == code_revision else f"; at the end: {after} (changed during the run)"))
    if busy:
        print("Other processes using CPU, sampled 1 s before and after the benchmark (figures are noisy):")
        for cpu, cmd in busy[:10]:
            print(f"  {cpu:4.2f} CPU-s/s  {cmd}")
    else:
        print("No other busy process was seen before or after the benchmark.")


def make_model(work, architecture, steps, env=None):
    """A model for speed runs: `architecture` with random weights (each image costs what a real
    one does), its head trained for `steps` on a few flower photos. Returns its folder."""
    images = flower_subset(os.path.join(work, "images"), per_class=8)
    out = os.path.join(work, "model")
    cmd = [sys.executable, "-m", "retrain", "--image_dir", images, "--architecture", architecture,
           "--weights", "none", "--how_many_training_steps", str(steps), "--output_dir", out,
           "--bottleneck_dir", os.path.join(work, "bottlenecks"), "--summaries_dir", ""]
    log("making the model: " + " ".join(cmd))
    code, _, lines = run_timed(cmd, 1800, env=env)
    if code != 0:
        raise SystemExit("retrain failed:\n" + "\n".join(line for _, _, line in lines[-30:]))
    return out


def start_gunicorn(cwd, env, log_path, timeout=180):
    """`gunicorn classify_server:app` from `cwd` (its code and gunicorn.conf.py) on a free loopback port,
    its output in `log_path`: (process, port), once /readyz answers 200."""
    import http.client
    port = free_port()
    with open(log_path, "wb") as log:
        process = start([sys.executable, "-m", "gunicorn", "classify_server:app", "-b", f"127.0.0.1:{port}"],
                        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return process, port
        except OSError:
            pass
        finally:
            conn.close()
        if process.poll() is not None or time.monotonic() > deadline:
            with open(log_path, errors="replace") as f:
                raise SystemExit(f"gunicorn from {cwd} did not start:\n{f.read()[-3000:]}")
        time.sleep(0.5)
