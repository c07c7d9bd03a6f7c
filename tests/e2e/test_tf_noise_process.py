"""Issue 20: TensorFlow's start-up lines are kept off stderr, and nothing else is, in real processes
(classify_contract.tf_noise's filter child process)."""
import os
import subprocess
import sys

from support import ROOT

ONEDNN = (b"I0000 00:00:1795827903.450424   25565 port.cc:153] oneDNN custom operations are on. You may see "
          b"slightly different numerical results due to floating-point round-off errors.")


def run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"} | env)


def test_lines_written_just_before_the_process_aborts_still_come_out():
    """The filter is a child process, so it reads the pipe to its end even when this process dies inside
    the window: every real line comes out, in order, and the noise does not."""
    code = ("import os\nfrom classify_contract.tf_noise import filtered_stderr\n"
            "with filtered_stderr():\n"
            f"    os.write(2, {ONEDNN + bytes([10])!r})\n"
            "    for i in range(2000):\n"
            "        os.write(2, b'E0000 00:00:1.2 7 check.cc:7] real line %d\\n' % i)\n"
            "    os.abort()\n")
    result = run(code)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert lines == [b"E0000 00:00:1.2 7 check.cc:7] real line %d" % i for i in range(2000)], result.stderr[-300:]


def test_importing_tensorflow_is_quiet_unless_the_user_sets_the_log_level():
    code = ("from classify_contract.tf_noise import import_tensorflow_quietly\nimport_tensorflow_quietly()\n"
            "import os, sys, tensorflow as tf\nprint(int(tf.constant(1) + 1))\n"
            "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))\n"
            "print('after the window', file=sys.stderr)\n")
    quiet = run(code)
    assert quiet.returncode == 0 and quiet.stdout == b"2\nNone\n", quiet  # child processes are not told to be quiet
    assert quiet.stderr == b"after the window\n", quiet.stderr
    # The user's own TF_CPP_MIN_LOG_LEVEL wins: nothing is filtered (and this shows the noise is real here).
    loud = run(code, TF_CPP_MIN_LOG_LEVEL="0")
    assert loud.returncode == 0 and b"Could not find cuda drivers" in loud.stderr, loud.stderr
