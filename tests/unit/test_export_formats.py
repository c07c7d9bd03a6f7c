"""retrain's exports (issue 30), in process: --export's usage errors, the ONNX conversion and Triton config of a
tiny graph, and report.html's table of them (the real model's: tests/e2e/test_exports.py)."""
import numpy as np
import pytest

from retrain import cli, report


@pytest.mark.parametrize("args, expected", [
    (["--export", "pdf"], "--export pdf: unknown format; choose onnx or triton DIR"),
    (["--export", "onnx", "somewhere"], "--export onnx takes no folder"),
    (["--export", "triton"], "--export triton takes one folder"),
    (["--export", "triton", "a", "b"], "--export triton takes one folder"),
    (["--export", "triton", "models", "--model_name", "my model"], "'my model' is not a Triton model name"),
])
def test_export_usage_errors(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["--image_dir", "photos", *args])
    assert exit_.value.code == 2 and expected in capsys.readouterr().err


def test_exports_and_names_parsed():
    flags = cli.parse_args(["--image_dir", "/data/flower_photos/", "--export", "onnx", "--export", "triton", "m"])
    assert flags.exports == {"onnx": None, "triton": "m"}
    from retrain import exports
    assert exports.model_name(flags) == "flower_photos"


def test_onnx_and_triton_config_of_a_graph(tmp_path):
    """A tiny graph (softmax of the mean colour) as ONNX gives graph.pb's scores, and its config.pbtxt, read
    back with Triton's ModelConfig, declares the ONNX model's input and output after the batch dimension."""
    import tensorflow as tf
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from retrain import onnx_export, triton_repository
    graph = tf.Graph()
    with graph.as_default():
        pixels = tf.compat.v1.placeholder(tf.float32, [None, 8, 6, 3], name="input")
        tf.nn.softmax(tf.reduce_mean(pixels, axis=[1, 2]) / 32.0, name="final_result")
    content = onnx_export.convert(graph.as_graph_def())
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 6, 3)).astype(np.float32)
    with tf.compat.v1.Session(graph=graph) as session:
        want = session.run("final_result:0", {"input:0": x})
    np.testing.assert_allclose(onnx_export.session(content).run(["scores"], {"input": x})[0], want, atol=1e-6)
    config = text_format.Parse(triton_repository.config_text("colours", content), mc.ModelConfig())
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [8, 6, 3])]
    assert [(t.name, list(t.dims), t.label_filename) for t in config.output] == [("scores", [3], "labels.txt")]
    target = triton_repository.write(tmp_path / "models", "colours", 4, content, ["red", "green", "blue"])
    assert (tmp_path / "models" / "colours" / "4" / "model.onnx").read_bytes() == content
    assert (tmp_path / "models" / "colours" / "labels.txt").read_text() == "red\ngreen\nblue\n"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["colours"] and target.endswith("colours")


def test_the_report_lists_the_exports():
    run = report.Run(["a", "b"], "mobilenet_v2", "none", counts={"training": {}, "validation": {}, "testing": {}},
                     skipped={}, settings={})
    run.tflite = {"quantization": "int8", "bytes": 2_700_000, "accuracy": {"test": 0.89}, "metadata": True}
    run.exports = {"onnx": {"bytes": 8_900_000, "opset": 17, "accuracy": {"test": 0.9125}},
                   "triton": {"bytes": 8_900_000, "accuracy": {"test": 0.9125}, "path": "/srv/models/flowers"}}
    html = report.render(run, {}, None, [])
    table = html[html.index('<table id="exports">'):]
    table = table[:table.index("</table>")]
    for cell in ("model.tflite (int8)", "2.7", "0.8900", "with TFLite metadata", "model.onnx", "8.9", "0.9125",
                 "/srv/models/flowers"):
        assert f"<td>{cell}" in table, cell
