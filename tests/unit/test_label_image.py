"""`classify_server.label_image`'s errors, through its main() in this process: one line each. The command
itself is e2e/test_label_image_cli.py's."""
import pytest


def test_a_missing_graph_is_one_error_line(tmp_path, capsys):
    from classify_server import label_image
    assert label_image.main(["--graph", str(tmp_path / "graph.pb"), "--image", str(tmp_path / "x.jpg")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(tmp_path / "graph.pb") in err, err


@pytest.mark.parametrize("kind", ["not_an_image", "missing_file"])
def test_a_bad_image_is_one_error_line(trained_model, tmp_path, capsys, kind):
    from classify_server import label_image
    image = tmp_path / "x.jpg"
    if kind == "not_an_image":
        image.write_text("not an image\n")
    assert label_image.main(["--graph", f"{trained_model}/graph.pb", "--image", str(image)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(image) in err, err
