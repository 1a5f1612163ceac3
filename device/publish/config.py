"""Typed settings for the MQTT, HTTP and snapshot outputs.

Every model rejects unknown keys, and every field has a default, bounds where a number can be
wrong, and one line of description. The daemon's config (device/config.py) embeds them under
``outputs`` and hands each to its sink's constructor. For example::

    outputs:
      mqtt:
        enabled: true
        host: broker.lan
        port: 8883
        topic_prefix: garage_cam
        username: cam
        password_env: EDGE_MQTT_PASSWORD
        tls: {ca_file: /etc/ssl/certs/lan-ca.pem}
        events: {labels: [person, car], min_frames: 3, end_after: 5}
        detections: with_objects
        detections_interval: 1.0
      http:
        enabled: true
        host: 0.0.0.0
        port: 8080
        token_env: EDGE_HTTP_TOKEN
      snapshots:
        enabled: true
        directory: /var/lib/edge-yolo/snapshots
        labels: [person]
        min_interval: 10
        max_megabytes: 200
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from device.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _secret_from(value: SecretStr | None, env_name: str | None, what: str) -> str | None:
    """A secret given inline or through an environment variable; never both."""
    if env_name is None:
        return value.get_secret_value() if value is not None else None
    secret = os.environ.get(env_name)
    if not secret:
        raise ConfigError(
            f"{what} is to be read from the environment variable {env_name}, which is not set "
            f"or empty: export it (e.g. in the systemd unit's EnvironmentFile) or remove the "
            f"*_env setting"
        )
    return secret


class MqttTlsConfig(_Strict):
    """TLS towards the broker; present means TLS is on."""

    ca_file: Path | None = Field(
        None, description="CA bundle that signed the broker (None: system store)"
    )
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS")
    key_file: Path | None = Field(None, description="Private key of the client certificate")
    insecure: bool = Field(False, description="Skip the broker hostname check (testing only)")

    @model_validator(mode="after")
    def _cert_needs_key(self) -> MqttTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self


class MqttEventsConfig(_Strict):
    """Per-object events (new / update / end with before and after state), as Frigate sends."""

    enabled: bool = Field(True, description="Publish object events on <prefix>/events")
    labels: list[str] | None = Field(None, description="Only track these labels (None: all)")
    min_frames: int = Field(
        2, ge=1, le=100, description="Frames an object must be seen before 'new'"
    )
    end_after: float = Field(
        2.0, ge=0.1, le=600, description="Seconds unseen after which an object's event ends"
    )
    iou: float = Field(
        0.3, gt=0.0, lt=1.0, description="Box overlap that makes a detection the same object"
    )
    update_interval: float = Field(
        1.0, ge=0.0, le=600, description="Minimum seconds between 'update' events of one object"
    )
    snapshot: bool = Field(
        False,
        description="Retained JPEG of new objects and better views on <prefix>/snapshot/<label>",
    )
    snapshot_height: int = Field(270, ge=64, le=2160, description="Height of those JPEGs in pixels")
    snapshot_quality: int = Field(70, ge=10, le=100, description="JPEG quality of those snapshots")


class MqttConfig(_Strict):
    """Publishing to an MQTT broker with paho-mqtt."""

    enabled: bool = Field(False, description="Publish to an MQTT broker")
    host: str = Field("localhost", min_length=1, description="Broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS)")
    client_id: str | None = Field(
        None, description="MQTT client id (None: edge-yolo-<hostname>-<pid>)"
    )
    topic_prefix: str = Field("edge_yolo", min_length=1, description="First level of every topic")
    username: str | None = Field(None, description="User name for the broker")
    password: SecretStr | None = Field(None, description="Password for the broker")
    password_env: str | None = Field(
        None, description="Read the password from this environment variable instead"
    )
    tls: MqttTlsConfig | None = Field(None, description="TLS settings; omit for plain TCP")
    keepalive: int = Field(30, ge=5, le=3600, description="Seconds between keepalive pings")
    qos: int = Field(1, ge=0, le=2, description="QoS of event, detection and stats messages")
    events: MqttEventsConfig = Field(
        default_factory=MqttEventsConfig, description="Per-object events"
    )
    detections: Literal["off", "with_objects", "all"] = Field(
        "off",
        description="Per-frame messages on <prefix>/detections: none, frames with objects, all",
    )
    detections_interval: float = Field(
        0.0, ge=0.0, le=3600, description="Minimum seconds between per-frame messages"
    )
    counts: bool = Field(
        True, description="Retained object counts on <prefix>/objects/<label> when they change"
    )
    stats_interval: float = Field(
        60.0, ge=0.0, le=86400, description="Seconds between messages on <prefix>/stats (0: off)"
    )
    max_queued: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="Messages kept while the broker is away; oldest dropped",
    )
    reconnect_min_delay: float = Field(
        1.0, ge=0.1, le=600, description="First wait before reconnecting, doubled up to the max"
    )
    reconnect_max_delay: float = Field(
        30.0, ge=0.1, le=3600, description="Longest wait between reconnect attempts"
    )
    connect_timeout: float = Field(5.0, gt=0, le=120, description="Seconds a TCP connect may take")
    close_timeout: float = Field(
        3.0, ge=0.0, le=60, description="Seconds to flush and send 'offline' when closing"
    )

    @field_validator("topic_prefix")
    @classmethod
    def _plain_topic(cls, value: str) -> str:
        if any(c in value for c in "+#\0") or value.startswith("/") or value.endswith("/"):
            raise ValueError(
                f"expected a topic without wildcards (+ #) or leading/trailing '/', got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> MqttConfig:
        if self.reconnect_min_delay > self.reconnect_max_delay:
            raise ValueError(
                f"reconnect_min_delay ({self.reconnect_min_delay}) is larger than "
                f"reconnect_max_delay ({self.reconnect_max_delay})"
            )
        if self.password is not None and self.password_env is not None:
            raise ValueError("set password or password_env, not both")
        if (self.password is not None or self.password_env) and not self.username:
            raise ValueError("a password needs a username")
        return self

    def resolved_password(self) -> str | None:
        return _secret_from(self.password, self.password_env, "The MQTT password")


class HttpConfig(_Strict):
    """The built-in HTTP server: health, metrics, stats, latest frame, MJPEG stream."""

    enabled: bool = Field(True, description="Serve the HTTP endpoints")
    host: str = Field(
        "127.0.0.1", min_length=1, description="Address to listen on (0.0.0.0: every interface)"
    )
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on (0: any free port)")
    token: SecretStr | None = Field(
        None, description="Bearer token required on every endpoint but /health"
    )
    token_env: str | None = Field(
        None, description="Read the bearer token from this environment variable instead"
    )
    jpeg_quality: int = Field(
        80, ge=10, le=100, description="JPEG quality of latest.jpg and the stream"
    )
    stream_fps: float = Field(
        5.0, gt=0.0, le=60.0, description="Highest frame rate sent to one MJPEG client"
    )
    stream_max_clients: int = Field(4, ge=1, le=64, description="MJPEG clients served at once")
    stream_max_seconds: float = Field(
        0.0, ge=0.0, le=86400, description="End each MJPEG stream after this long (0: never)"
    )
    send_timeout: float = Field(
        10.0, gt=0.0, le=600, description="Seconds a client may stall a write before it is dropped"
    )

    @model_validator(mode="after")
    def _one_token_source(self) -> HttpConfig:
        if self.token is not None and self.token_env is not None:
            raise ValueError("set token or token_env, not both")
        return self

    def resolved_token(self) -> str | None:
        return _secret_from(self.token, self.token_env, "The HTTP bearer token")


class SnapshotConfig(_Strict):
    """Annotated JPEGs with JSON sidecars of frames that hold chosen objects."""

    enabled: bool = Field(False, description="Save snapshots to disk")
    directory: Path = Field(Path("snapshots"), description="Folder for the JPEG and JSON files")
    labels: list[str] | None = Field(None, description="Only frames with these labels (None: all)")
    min_score: float = Field(
        0.5, ge=0.0, le=1.0, description="Lowest score that triggers a snapshot"
    )
    min_interval: float = Field(
        5.0, ge=0.0, le=86400, description="Minimum seconds between two snapshots"
    )
    max_files: int | None = Field(
        1000, ge=1, le=10_000_000, description="Keep at most this many snapshots (None: no limit)"
    )
    max_megabytes: float | None = Field(
        500.0,
        gt=0.0,
        le=10_000_000,
        description="Keep at most this many MB of snapshots (None: no limit)",
    )
    jpeg_quality: int = Field(90, ge=10, le=100, description="JPEG quality of saved snapshots")
    annotate: bool = Field(True, description="Draw boxes and labels on the saved image")
    queue_size: int = Field(
        4, ge=1, le=256, description="Frames waiting to be written; more are dropped and counted"
    )
