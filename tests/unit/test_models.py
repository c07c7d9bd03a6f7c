"""Several models in one server (MODEL_CONFIG_FILE, TensorFlow Serving's model config), in this process:
the config format, version policies and labels, models added, removed and broken at run time. Real
servers with several models are e2e/test_models_served.py's."""
import io
import logging
import os
import shutil

import pytest
from support.clients import b64
from support.images import shape_image
from support.models import write_colour_model, write_config

from classify_server.core import model_config
from classify_server.http_api import create_app

IMAGES = [shape_image(label, 40 + i, size=(70, 50)) for i, label in enumerate(["red_circle", "green_square",
                                                                                "blue_triangle"])]


# --- the config format ----------------------------------------------------------------------------

def test_config_reads_every_field_of_tf_servings_format(tmp_path):
    path = tmp_path / "models.config"
    path.write_text('''
        model_config_list {
          config { name: "flowers" base_path: "/models/flowers" model_platform: "tensorflow"
                   model_version_policy { latest { num_versions: 2 } } }
          config { name: "pinned" base_path: "pinned"
                   model_version_policy { specific { versions: 3 versions: 5 } }
                   version_labels { key: "stable" value: 3 } version_labels { key: "canary" value: 5 } }
          config { name: "every" base_path: "../every" model_version_policy { all {} } }
        }''')
    flowers, pinned, every = model_config.read(path)
    assert (flowers.name, flowers.base_path, flowers.policy, flowers.num_versions) == \
        ("flowers", "/models/flowers", "latest", 2)
    assert pinned.base_path == str(tmp_path / "pinned")  # relative: to the config file's folder
    assert (pinned.policy, pinned.versions, pinned.labels) == ("specific", {3, 5}, {"stable": 3, "canary": 5})
    assert every.policy == "all" and every.base_path == os.path.join(str(tmp_path), "../every")
    assert flowers.wanted([1, 2, 3, 4]) == [3, 4] and pinned.wanted([1, 2, 3, 4, 5]) == [3, 5]
    assert every.wanted([1, 2]) == [1, 2]
    default = model_config.parse('model_config_list { config { name: "m" base_path: "/m" } }', "/")[0]
    assert (default.policy, default.num_versions, default.wanted([1, 2, 3])) == ("latest", 1, [3])  # TF Serving's


@pytest.mark.parametrize("text, expected", [
    ("model_config_list { config { name: 'm' base_path: '/m' }", "line"),  # unclosed: where it broke
    ("model_config_list { config { name: 'm' base_pth: '/m' } }", "base_pth"),
    ("model_config_list { }", "no model"),
    ("", "no model"),
    ("model_config_list { config { base_path: '/m' } }", "has no name"),
    ("model_config_list { config { name: 'm' } }", "'m' has no base_path"),
    ("model_config_list { config { name: 'm' base_path: '/a' } config { name: 'm' base_path: '/b' } }",
     "'m' is configured twice"),
    ("model_config_list { config { name: 'm' base_path: '/m' model_platform: 'pytorch' } }", "only \"tensorflow\""),
    ("model_config_list { config { name: 'm' base_path: '/m' model_version_policy { specific { } } } }",
     "names no versions"),
])
def test_config_errors_say_what_is_wrong(text, expected):
    with pytest.raises(model_config.ConfigError) as info:
        model_config.parse(text, "/", "models.config")
    assert expected in str(info.value) and str(info.value).startswith("models.config: "), info.value


# --- version policies and labels, in one process ---------------------------------------------------

@pytest.fixture(scope="module")
def colour_versions(tmp_path_factory):
    """A base folder with versions 1, 2, 3 of the colour model, each with its own label suffix."""
    base = tmp_path_factory.mktemp("versions") / "colours"
    for version in (1, 2, 3):
        write_colour_model(base / str(version), [f"{c}_v{version}" for c in ("red", "green", "blue")])
    return base


def app_with(tmp_path, *models, **config):
    path = write_config(tmp_path / "models.config", *models)
    return create_app(dict(MODEL_CONFIG_FILE=path, MODEL_POLL_SECONDS=0, MODEL_CONFIG_POLL_SECONDS=0, **config))


def version_of(answer):
    """The version whose labels answered ("red_v3" -> 3)."""
    versions = {label.rsplit("_v", 1)[1] for label, _ in answer}
    assert len(versions) == 1, answer
    return int(versions.pop())


def served(client, name):
    statuses = client.get(f"/v1/models/{name}").get_json()["model_version_status"]
    return sorted(int(s["version"]) for s in statuses if s["state"] == "AVAILABLE")


@pytest.mark.parametrize("policy, versions", [
    ("", [3]),
    ("model_version_policy { latest { num_versions: 2 } }", [2, 3]),
    ("model_version_policy { all {} }", [1, 2, 3]),
    ("model_version_policy { specific { versions: 1 versions: 3 } }", [1, 3]),
])
def test_version_policies_load_the_versions_they_name(colour_versions, tmp_path, policy, versions):
    c = app_with(tmp_path, ("colours", colour_versions, policy)).test_client()
    assert served(c, "colours") == versions
    assert c.get("/v2/models/colours").get_json()["versions"] == [str(v) for v in versions]  # what may be asked for
    assert c.get(f"/v2/models/colours/versions/{versions[0]}").get_json()["versions"] == [str(versions[0])]
    image = {"data": (io.BytesIO(IMAGES[0]), "x.jpg")}
    assert version_of(c.post("/?model=colours", data=image).get_json()) == max(versions)  # the newest by default
    for version in (1, 2, 3):
        r = c.post(f"/v1/models/colours/versions/{version}:predict", json={"instances": [b64(IMAGES[0])]})
        ready = c.get(f"/v2/models/colours/versions/{version}/ready")
        if version in versions:
            assert r.status_code == 200 and ready.status_code == 200
            meta = c.get(f"/v1/models/colours/versions/{version}/metadata").get_json()
            assert meta["metadata"]["labels"][0] == f"red_v{version}"
        else:
            assert r.status_code == 404 and r.get_json()["code"] == "version_not_served", r.get_json()
            assert ready.status_code == 404


def test_version_labels_name_versions_on_every_rest_api(colour_versions, tmp_path):
    policy = ("model_version_policy { specific { versions: 1 versions: 3 } } "
              "version_labels { key: 'stable' value: 1 } version_labels { key: 'canary' value: 3 }")
    c = app_with(tmp_path, ("colours", colour_versions, policy)).test_client()
    for label, version in (("stable", 1), ("canary", 3)):
        r = c.post(f"/v1/models/colours/labels/{label}:predict", json={"instances": [b64(IMAGES[1])]})
        assert r.status_code == 200
        meta = c.get(f"/v1/models/colours/labels/{label}/metadata").get_json()
        assert meta["model_spec"]["version"] == str(version) and meta["metadata"]["labels"][1] == f"green_v{version}"
        classified = c.post(f"/v1/models/colours/labels/{label}:classify", json={"examples": [b64(IMAGES[1])]})
        assert {name for name, _ in classified.get_json()["result"][0]} == {f"{x}_v{version}"
                                                                            for x in ("red", "green", "blue")}
        status = c.get(f"/v1/models/colours/labels/{label}").get_json()["model_version_status"]
        assert [s["version"] for s in status] == [str(version)]
    r = c.post("/v1/models/colours/labels/beta:predict", json={"instances": [b64(IMAGES[1])]})
    assert r.status_code == 404 and "Unrecognized servable version label: beta" in r.get_json()["error"]


# --- models added, removed, changed and broken at run time ---------------------------------------

def test_config_reload_adds_removes_changes_and_survives_bad_configs(colour_versions, tmp_path, caplog):
    one = write_colour_model(tmp_path / "one", ["a", "b", "c"])
    app = app_with(tmp_path, ("colours", colour_versions), ("one", one))
    models, c = app.extensions["models"], app.test_client()
    path = tmp_path / "models.config"

    def post(query):
        return c.post("/" + query, data={"data": (io.BytesIO(IMAGES[2]), "x.jpg")})

    assert c.get("/v1/models").get_json() == {"models": ["colours", "one"]}
    assert version_of(post("").get_json()) == 3  # the first model is the default
    # Added and removed, and a changed policy (loaded anew, then swapped in).
    two = write_colour_model(tmp_path / "two", ["x", "y", "z"])
    write_config(path, ("two", two), ("colours", colour_versions, "model_version_policy { specific { versions: 1 } }"))
    models.reload_config()
    assert c.get("/v1/models").get_json() == {"models": ["two", "colours"]}
    assert {label for label, _ in post("").get_json()} == {"x", "y", "z"}  # the new first model
    assert version_of(post("?model=colours").get_json()) == 1
    r = post("?model=one")
    assert r.status_code == 404 and r.get_json()["code"] == "model_not_found" and "'two'" in r.get_json()["error"]
    # A model that does not load is reported in its status; the others serve, and the server stays ready.
    broken = tmp_path / "broken"
    shutil.copytree(one, broken)
    (broken / "graph.pb").write_bytes(b"not a graph")
    write_config(path, ("two", two), ("colours", colour_versions, "model_version_policy { specific { versions: 1 } }"),
                 ("broken", broken))
    with caplog.at_level(logging.ERROR, logger="classify_server"):
        models.reload_config()
    assert "model 'broken' failed to load" in caplog.text and "graph.pb" in caplog.text
    status = c.get("/v1/models/broken").get_json()["model_version_status"]
    assert status[0]["state"] == "END" and "graph.pb" in status[0]["status"]["error_message"]
    r = post("?model=broken")
    assert r.status_code == 404 and "graph.pb" in r.get_json()["error"]
    assert c.get("/v2/models/broken/ready").status_code == 404
    assert c.get("/readyz").status_code == 200 and c.get("/v2/health/ready").status_code == 200
    assert post("?model=two").status_code == 200 and post("?model=colours").status_code == 200
    # A config that does not parse keeps the models served, and the log says why.
    path.write_text("model_config_list { config { name: 'half")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="classify_server"):
        models.reload_config()
    assert "not a model_config_list" in caplog.text and "still serving two, colours, broken" in caplog.text
    assert post("?model=colours").status_code == 200
    # Labels change in place: the loaded versions stay.
    before = models.get("colours")
    write_config(path, ("colours", colour_versions,
                        "model_version_policy { specific { versions: 1 } } version_labels { key: 'now' value: 1 }"))
    models.reload_config()
    assert models.get("colours") is before and models.names == ["colours"]
    r = c.post("/v1/models/colours/labels/now:predict", json={"instances": [b64(IMAGES[0])]})
    assert r.status_code == 200


def test_a_changed_model_that_does_not_load_leaves_the_old_one_serving(tmp_path, caplog):
    good = write_colour_model(tmp_path / "good", ["a", "b", "c"])
    app = app_with(tmp_path, ("m", good))
    broken = write_colour_model(tmp_path / "broken", ["x", "y", "z"])
    (tmp_path / "broken" / "graph.pb").write_bytes(b"not a graph")  # (a folder with no version would wait for one)
    write_config(tmp_path / "models.config", ("m", broken))
    with caplog.at_level(logging.ERROR, logger="classify_server"):
        app.extensions["models"].reload_config()
    assert "its new config does not load, the old one keeps serving" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="classify_server"):
        app.extensions["models"].reload_config()  # the same config again: not tried again on every poll
    assert caplog.text == ""
    r = app.test_client().post("/?model=m", data={"data": (io.BytesIO(IMAGES[0]), "x.jpg")})
    assert r.status_code == 200 and {label for label, _ in r.get_json()} == {"a", "b", "c"}
