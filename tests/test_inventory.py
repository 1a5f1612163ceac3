"""Inventory files and the per-device choices deploy makes without a device."""

from __future__ import annotations

import pytest
import yaml

from device.errors import ConfigError
from toolkit.deploy import (
    DeployError,
    LocalBundle,
    choose_model,
    health_url,
    runtime_constraints,
    start_script,
)
from toolkit.inventory import DeviceSettings, load_inventory


def write(tmp_path, document) -> object:
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_defaults_apply_to_every_device_and_entries_override_them(tmp_path):
    path = write(
        tmp_path,
        {
            "defaults": {"user": "pi", "root": "/srv/edge", "precision": "fp32"},
            "devices": [
                {"name": "gate", "host": "10.0.0.5"},
                {"host": "yard.local", "port": 2222, "precision": "int8"},
            ],
        },
    )

    gate, yard = load_inventory(path)

    assert (gate.name, gate.user, gate.root, gate.precision) == ("gate", "pi", "/srv/edge", "fp32")
    assert (yard.name, yard.port, yard.precision) == ("yard.local", 2222, "int8")
    assert yard.ssh.label == "pi@yard.local:2222"


def test_a_wrong_key_is_reported_with_its_path_and_value(tmp_path):
    path = write(tmp_path, {"devices": [{"host": "a"}, {"host": "b", "prot": 22}]})

    with pytest.raises(ConfigError) as caught:
        load_inventory(path)

    assert "devices.1.prot: Extra inputs are not permitted (found 22)" in str(caught.value)


def test_relative_root_and_duplicate_names_are_refused(tmp_path):
    relative = write(tmp_path, {"devices": [{"host": "a", "root": "edge"}]})
    with pytest.raises(ConfigError, match="absolute path on the device"):
        load_inventory(relative)

    twice = write(tmp_path, {"devices": [{"host": "a"}, {"host": "a"}]})
    with pytest.raises(ConfigError, match="unique, repeated: \\['a'\\]"):
        load_inventory(twice)


def test_limit_keeps_named_devices_and_refuses_unknown_ones(tmp_path):
    path = write(tmp_path, {"devices": [{"name": "a", "host": "x"}, {"name": "b", "host": "y"}]})

    assert [d.name for d in load_inventory(path, limit=["b"])] == ["b"]
    with pytest.raises(ConfigError, match="no device named \\['c'\\]"):
        load_inventory(path, limit=["c"])


def bundle_with(*precisions: str) -> LocalBundle:
    models = [{"precision": p, "file": f"model-{p}.onnx"} for p in precisions]
    manifest = {
        "models": models,
        "default_model": models[0]["file"],
        "health_url": None,
        "target": {"min_onnxruntime": "1.15"},
    }
    return LocalBundle(path=None, manifest=manifest, manifest_sha256="", size_bytes=0)


def test_auto_precision_follows_the_device_check():
    both = bundle_with("fp32", "int8")

    assert choose_model(both, "auto", "int8") == "model-int8.onnx"
    assert choose_model(both, "auto", "fp32") == "model-fp32.onnx"
    assert choose_model(bundle_with("fp32"), "auto", "int8") == "model-fp32.onnx"
    with pytest.raises(DeployError, match="bundle has only fp32"):
        choose_model(bundle_with("fp32"), "int8", "int8")


def test_health_url_comes_from_run_args_port_when_not_given():
    device = DeviceSettings(host="a", run_args="--source usb --http-port 8090")

    assert health_url(device, bundle_with("fp32")) == "http://127.0.0.1:8090/health"
    given = device.model_copy(update={"health_url": "http://127.0.0.1:9/h"})
    assert health_url(given, bundle_with("fp32")) == "http://127.0.0.1:9/h"


def test_start_script_quotes_its_arguments():
    script = start_script("r1", "/opt/edge yolo/venv/bin/python", "--source 'rtsp://cam/a b'")

    assert "exec '/opt/edge yolo/venv/bin/python' -m device.cli run config.yaml" in script
    assert "--source 'rtsp://cam/a b'" in script


def test_venv_constraints_pin_the_models_onnxruntime_and_numpy_1_for_picamera2():
    assert runtime_constraints(bundle_with("fp32"), False) == "onnxruntime>=1.15\n"
    assert runtime_constraints(bundle_with("fp32"), True) == "onnxruntime>=1.15\nnumpy<2\n"


@pytest.mark.parametrize(
    "host, user",
    [
        ("-oProxyCommand=touch {marker}", None),
        ("127.0.0.1", "-oProxyCommand=touch {marker}"),
        ("cam1; touch {marker}", None),
        ("cam1\nHost *", None),
    ],
)
def test_host_or_user_that_ssh_would_read_as_an_option_is_refused(tmp_path, host, user):
    from toolkit.remote import Remote, RemoteError, SshTarget

    marker = tmp_path / "ran"
    target = SshTarget(
        host=host.format(marker=marker), user=user and user.format(marker=marker), port=22
    )

    with pytest.raises(RemoteError, match=r"Expected an SSH (host|user) name or address"):
        Remote(target).connect()
    assert not marker.exists()


def test_missing_identity_file_is_explained_as_a_key_not_as_known_hosts(tmp_path):
    from toolkit.remote import RemoteError, SshTarget, validate_target

    target = SshTarget(host="cam1", identity_file=tmp_path / "nokey")
    with pytest.raises(RemoteError) as error:
        validate_target(target)
    assert "identity file" in str(error.value) and "authorized_keys" in str(error.value)
    assert "known_hosts" not in str(error.value)


@pytest.mark.parametrize("host", ["cam-1.local", "192.168.1.20", "fe80::1%eth0", "cam_1"])
def test_ordinary_host_names_pass_validation(host):
    from toolkit.remote import SshTarget, validate_target

    validate_target(SshTarget(host=host, user="pi"))


@pytest.mark.parametrize(
    "key, value",
    [
        ("unit_name", "edge-yolo; touch /tmp/x"),
        ("root", "/opt/edge yolo"),
        ("root", "/opt/$(reboot)"),
        ("device_python", "python3 -c 'import os'"),
        ("runtime_python", "/usr/bin/python3;id"),
        ("service_user", "pi && id"),
        ("writable_paths", ["/var/lib/x y"]),
    ],
)
def test_values_that_reach_the_device_shell_must_be_plain_words(tmp_path, key, value):
    path = write(tmp_path, {"devices": [{"host": "a", key: value}]})

    with pytest.raises(ConfigError, match=rf"devices\.0\.{key}.*expected"):
        load_inventory(path)


def test_ordinary_paths_and_names_pass(tmp_path):
    path = write(
        tmp_path,
        {
            "devices": [
                {
                    "host": "a",
                    "root": "/opt/edge-yolo_2",
                    "unit_name": "edge-yolo.cam1",
                    "device_python": "/usr/bin/python3.11",
                    "service_user": "pi",
                    "writable_paths": ["/var/lib/edge-yolo/snapshots"],
                }
            ]
        },
    )
    assert load_inventory(path)[0].unit_name == "edge-yolo.cam1"
