"""Issue 20: TensorFlow's start-up lines are noise and nothing else is (classify_contract.tf_noise's
NoiseFilter, in this process)."""
from classify_contract.tf_noise import NoiseFilter

# As TensorFlow 2.21 prints them on a machine without a GPU.
BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
ONEDNN = (b"I0000 00:00:1795827903.450424   25565 port.cc:153] oneDNN custom operations are on. You may see "
          b"slightly different numerical results due to floating-point round-off errors.")
NO_DRIVER = (b"I0000 00:00:1795827903.450770   25565 cudart_stub.cc:31] Could not find cuda drivers on your "
             b"machine, GPU will not be used.")
CUINIT = (b"E0000 00:00:1795827905.835789   25565 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA "
          b"error: Failed call to cuInit: UNKNOWN ERROR (303)")


def judge(*lines):
    f = NoiseFilter()
    return [f.is_noise(line + b"\n") for line in lines]


def test_the_start_up_lines_are_noise_and_warnings_errors_and_text_are_not():
    warning = b"W0000 00:00:1795827905.8 25565 op_kernel.cc:1829] OP_REQUIRES failed at save_restore.cc:40"
    error = b"E1128 01:02:03.456789 25565 graph.cc:12] Invalid argument: a real failure"
    fatal = b"F0000 00:00:1795827905.8 25565 check.cc:7] Check failed: x == y"
    assert judge(BANNER, ONEDNN, NO_DRIVER, CUINIT) == [True] * 4
    assert judge(b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, output_inference_type: "
                 b"FLOAT32", b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.") == [True] * 2
    assert judge(warning, error, fatal, b"Traceback (most recent call last):", b"") == [False] * 5


def test_cuinit_failing_is_an_error_when_tensorflow_did_not_say_there_is_no_driver():
    # A GPU machine with a broken driver: no "Could not find cuda drivers" first, so it must be seen.
    assert judge(CUINIT) == [False]
    assert judge(CUINIT.replace(b"(303)", b"(999)"), NO_DRIVER, CUINIT) == [False, True, True]
