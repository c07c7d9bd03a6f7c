"""Which models a server serves: MODEL_CONFIG_FILE, or MODEL_DIR and MODEL_NAME as one model.

MODEL_CONFIG_FILE is TensorFlow Serving's model config, its `model_config_list` in protobuf's text
format, read with the protos tensorflow-serving-api ships (so TF Serving's own files work here):

    model_config_list {
      config {
        name: "flowers"
        base_path: "/models/flowers"          # numbered versions, or one model folder
        model_platform: "tensorflow"
        model_version_policy { latest { num_versions: 2 } }   # or all {}, or specific { versions: 3 }
        version_labels { key: "stable" value: 3 }
      }
      config { name: "imagenet" base_path: "imagenet" }       # relative: to the config file's folder
    }

The first model is the default (multipart POST / without ?model=). Without a version policy the
newest version is served, as TF Serving does. Each model folder's own model.json describes its graph.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from classify_server.engines import ModelLoadError

if TYPE_CHECKING:
    from classify_server.settings import ModelSettings


class ConfigError(ModelLoadError):
    """The model config cannot be used: its message says where and why."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve, and which of its versions."""
    name: str
    base_path: str
    policy: str = "latest"            # latest, all or specific (TF Serving's model_version_policy)
    num_versions: int = 1             # for latest
    versions: frozenset[int] = frozenset()  # for specific
    labels: dict[str, int] = field(default_factory=dict, compare=False)  # version label -> version

    def wanted(self, candidates: Iterable[int]) -> list[int]:
        """Of the complete versions that have not failed (ascending), those the policy serves."""
        if self.policy == "all":
            return list(candidates)
        if self.policy == "specific":
            return [v for v in candidates if v in self.versions]
        return list(candidates)[-self.num_versions:]


def from_settings(model: ModelSettings) -> list[ModelSpec]:
    """The models of these settings: the config file's (MODEL_CONFIG_FILE), or MODEL_DIR's one."""
    if model.config_file:
        return read(model.config_file)
    return [ModelSpec(model.name, model.dir)]


def read(path: str) -> list[ModelSpec]:
    """The ModelSpecs of a model config file, in its order; ConfigError when it is not a usable one."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read MODEL_CONFIG_FILE {path}: {exc.strerror or exc}") from None
    return parse(text, os.path.dirname(os.path.abspath(path)), path)


def parse(text: str, folder: str, where: str = "model config") -> list[ModelSpec]:
    try:
        server_config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as exc:
        at = f"line {exc.GetLine()}, column {exc.GetColumn()}: " if exc.GetLine() else ""
        message = str(exc).split(" : ", 1)[-1]
        raise ConfigError(f"{where}: not a model_config_list in TensorFlow Serving's text format: "
                          f"{at}{message}") from None
    if server_config.WhichOneof("config") != "model_config_list" or not server_config.model_config_list.config:
        raise ConfigError(f"{where}: no model: expected model_config_list {{ config {{ name: ... base_path: ... }} }}")
    specs = [_spec(c, folder, where) for c in server_config.model_config_list.config]
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{where}: model {name!r} is configured twice")
    return specs


def _spec(c: model_server_config_pb2.ModelConfig, folder: str, where: str) -> ModelSpec:
    if not c.name:
        raise ConfigError(f"{where}: a config has no name")
    if not c.base_path:
        raise ConfigError(f"{where}: model {c.name!r} has no base_path")
    if c.model_platform not in ("", "tensorflow"):
        raise ConfigError(f"{where}: model {c.name!r}: model_platform {c.model_platform!r} is not served here "
                          "(only \"tensorflow\": a frozen graph.pb)")
    policy = c.model_version_policy.WhichOneof("policy_choice") or "latest"
    spec = ModelSpec(c.name, os.path.join(folder, c.base_path), policy,
                     num_versions=max(1, c.model_version_policy.latest.num_versions),
                     versions=frozenset(c.model_version_policy.specific.versions), labels=dict(c.version_labels))
    if policy == "specific" and not spec.versions:
        raise ConfigError(f"{where}: model {c.name!r}: specific {{ }} names no versions")
    return spec
