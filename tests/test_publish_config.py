"""The outputs' settings: the documented example is valid, and bad values are refused."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from device.publish import config as publish_config
from device.publish.config import HttpConfig, MqttConfig, SnapshotConfig


def test_documented_example_is_valid():
    example = publish_config.__doc__.split("For example::")[1]
    outputs = yaml.safe_load("\n".join(line[4:] for line in example.splitlines()))["outputs"]

    mqtt = MqttConfig(**outputs["mqtt"])
    assert mqtt.tls is not None and mqtt.events.labels == ["person", "car"]
    assert HttpConfig(**outputs["http"]).token_env == "EDGE_HTTP_TOKEN"
    assert SnapshotConfig(**outputs["snapshots"]).min_interval == 10


def test_secure_defaults():
    http = HttpConfig()
    assert http.host == "127.0.0.1", "the HTTP server must not listen on the network by default"
    assert MqttConfig().enabled is False and SnapshotConfig().enabled is False


@pytest.mark.parametrize(
    "model, settings, expected",
    [
        (HttpConfig, {"port": -1}, "greater than or equal to 0"),
        (HttpConfig, {"token": "a", "token_env": "B"}, "not both"),
        (HttpConfig, {"stream_fps": 0}, "greater than 0"),
        (HttpConfig, {"tokn": "a"}, "Extra inputs are not permitted"),
        (SnapshotConfig, {"max_files": 0}, "greater than or equal to 1"),
        (SnapshotConfig, {"min_score": 1.5}, "less than or equal to 1"),
        (SnapshotConfig, {"jpeg_quality": 5}, "greater than or equal to 10"),
    ],
)
def test_bad_values_are_refused(model, settings, expected):
    with pytest.raises(ValidationError, match=expected):
        model(**settings)


def test_every_field_is_described():
    for model in (MqttConfig, HttpConfig, SnapshotConfig, publish_config.MqttTlsConfig,
                  publish_config.MqttEventsConfig):  # fmt: skip
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
