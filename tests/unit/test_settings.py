"""classify_server.settings: the one definition of every setting, its typed groups, and the reference
table in docs/settings.md that must name each of them."""
import dataclasses
import os
import re

import pytest
from support import ROOT

from classify_server import settings

NOT_OURS = {"TF_CPP_MIN_LOG_LEVEL"}  # TensorFlow's own variable, documented beside ours


def test_settings_table_names_every_setting_and_nothing_else():
    with open(os.path.join(ROOT, "docs", "settings.md"), encoding="utf-8") as f:
        rows = [line for line in f if line.startswith("| `")]
    documented = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])}
    assert documented - NOT_OURS == settings.NAMES


def test_each_group_is_typed_and_frozen():
    service = settings.from_env({"PORT": "8080", "MAX_PARTS": "3", "HEADER_TIMEOUT": "2.5", "INPUT_MEAN": "127.5"})
    assert (service.http.port, service.limits.max_parts, service.http.header_timeout) == (8080, 3, 2.5)
    assert service.model.graph_overrides() == {"input_mean": 127.5}
    assert isinstance(service.limits, settings.Limits) and isinstance(service.engine, settings.EngineSettings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        service.limits.max_parts = 4  # type: ignore[misc]
    for s in settings.SETTINGS:  # every default is of its field's type (None: "not set", for the graph's)
        assert s.default is None or isinstance(s.default, s.kind), s


def test_choices_are_checked_and_normalised():
    assert settings.from_env({"MODEL_ENGINE": "TFLite", "LOG_LEVEL": "WARNING"}).engine.kind == "tflite"
    with pytest.raises(SystemExit, match=r"MODEL_ENGINE='onnx' must be tf or tflite"):
        settings.from_env({"MODEL_ENGINE": "onnx"})


def test_the_graph_settings_are_refused_beside_a_model_config_file():
    with pytest.raises(SystemExit, match="INPUT_LAYER describes MODEL_DIR's graph"):
        settings.from_env({"MODEL_CONFIG_FILE": "models.config", "INPUT_LAYER": "input"})


def test_a_process_reads_the_environment_once(monkeypatch):
    settings.current.cache_clear()
    try:
        monkeypatch.setenv("TOP_K", "3")
        first = settings.current()
        monkeypatch.setenv("TOP_K", "4")
        assert settings.current() is first and first.limits.top_k == 3
    finally:
        settings.current.cache_clear()
