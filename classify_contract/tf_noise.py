"""TensorFlow's start-up lines, kept off stderr: `import_tensorflow_quietly()` at each entry point.

Importing TensorFlow 2.21 and enumerating its devices prints, on a machine without a GPU, an absl
banner, "oneDNN custom operations are on", "Could not find cuda drivers" (each twice) and
`E0000 ... failed call to cuInit ... (303)`, which reads like a failure. They are written before absl's
logging is initialised, so TF_CPP_MIN_LOG_LEVEL cannot hide them. So the import and the device
enumeration run with file descriptor 2 passed through a filter that drops, in that window only:
absl's info lines, its pre-initialisation banner, and cuInit's error when TensorFlow has just said
there is no CUDA driver. Warnings, errors and anything else pass. After it, TF_CPP_MIN_LOG_LEVEL=2
(errors only) keeps TensorFlow's own logging quiet; the TFLite converter and LiteRT print two info
lines whatever that level, and retrain.tflite runs them in a window too.

The filter is a child process (this file, run as a script), not a thread: if TensorFlow aborts inside
the window, the child still reads the pipe to its end, so a fatal line is never lost. A user's own
TF_CPP_MIN_LOG_LEVEL wins: set it (to 0 to see everything) and nothing is filtered.
"""
import contextlib
import os
import re
import subprocess
import sys
import threading

_BANNER = re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$")
_INFO = re.compile(rb"^I\d{4} [\d:.]+ +\d+ \S+:\d+\] ")
_NO_DRIVER = re.compile(rb"^I\d{4} .*\] Could not find cuda drivers on your machine")
_CUINIT = re.compile(rb"^E\d{4} .* cuda_platform\.cc:\d+\] failed call to cuInit: .*\(303\)$")
# The TFLite converter's and LiteRT's chatter, printed whatever the log level (retrain.tflite).
_TFLITE = re.compile(rb"^(fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, "
                     rb"output_inference_type: \w+|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.)$")
_window = threading.Lock()  # file descriptor 2 is the process's: one window at a time


class NoiseFilter:
    """Judges the lines of one process's start-up in order (cuInit's error is noise only after
    TensorFlow has said there is no CUDA driver)."""

    def __init__(self):
        self.no_driver = False

    def is_noise(self, line):
        line = line.rstrip(b"\r\n")
        self.no_driver = self.no_driver or bool(_NO_DRIVER.match(line))
        return bool(_BANNER.match(line) or _INFO.match(line) or _TFLITE.match(line)
                    or (self.no_driver and _CUINIT.match(line)))


def _pass_through(source, sink):
    """The child: copy `source` to `sink` line by line as they come, without the noise, until EOF."""
    judge = NoiseFilter()
    for line in iter(source.readline, b""):
        if not judge.is_noise(line):
            sink.write(line)
            sink.flush()


@contextlib.contextmanager
def filtered_stderr():
    """Pass file descriptor 2 (C++ and Python alike) through the noise filter while the block runs."""
    with _window:
        with _filtered_fd2():
            yield


@contextlib.contextmanager
def _filtered_fd2():
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    try:
        # -S: no site packages, a 10 ms start; SIGINT ignored so a Ctrl-C mid-import still drains the pipe.
        child = subprocess.Popen([sys.executable, "-S", "-u", os.path.abspath(__file__)], stdin=read,
                                 stdout=saved, stderr=saved, close_fds=True)
    except OSError:
        os.close(read), os.close(write), os.close(saved)
        yield
        return
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the child reads to the end and exits
        os.close(saved)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)  # a process forked inside the window may hold the pipe: don't hang on it


def import_tensorflow_quietly():
    """Import TensorFlow and initialise its devices without the start-up noise (see the module's doc)."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    # Read once, at the import: errors only in this process from then on (the converters warn a lot).
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    try:
        with filtered_stderr():
            import tensorflow as tf
            tf.config.list_physical_devices()  # cuInit's error comes at the first device enumeration
    finally:
        del os.environ["TF_CPP_MIN_LOG_LEVEL"]  # not inherited: a child process runs its own start-up


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _pass_through(sys.stdin.buffer, sys.stdout.buffer)
