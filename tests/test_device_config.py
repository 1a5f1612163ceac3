"""The daemon's YAML config: errors name the line, key path, value and what is expected;
check-config exits 0 or 1; flags override the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from device.cli import RUN_FLAGS, app, run_overrides
from device.config import load_config
from device.daemon import newest_frame, postprocess_config
from device.errors import ConfigError
from tests.constant_model import write_constant_model

REPO = Path(__file__).resolve().parent.parent
TOOLKIT_DEVICE = REPO / ".venv" / "bin" / "toolkit-device"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "daemon.yaml"
    path.write_text(text)
    return path


VALID = """\
model:
  path: {model}
source:
  type: file
  path: video.mp4
detect:
  conf: 0.4
  classes: [person, 1]
  class_conf: {{car: 0.6}}
outputs:
  jsonl: {{enabled: true, path: out.jsonl}}
"""


@pytest.fixture
def model(tmp_path):
    rows = [[320, 320, 64, 128, 0.9, 0.9, 0.1]]
    return write_constant_model(tmp_path / "m.onnx", rows, ["person", "car"])


def problems(path: Path, overrides=None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides, flag_names=RUN_FLAGS)
    return str(caught.value)


def test_a_valid_file_loads_with_defaults_filled_in(tmp_path, model):
    config = load_config(write(tmp_path, VALID.format(model=model)))

    assert config.model.path == model
    assert config.model.intra_op_threads == 0
    assert config.source.type == "file"
    assert config.detect.classes == ["person", "1"]
    assert config.pipeline.max_frames is None
    assert config.outputs.jsonl.enabled and not config.outputs.mqtt.enabled
    assert config.outputs.http.enabled and config.outputs.http.host == "127.0.0.1"
    assert newest_frame(config) is False  # a file: every frame


def test_class_names_and_ids_resolve_against_the_model(tmp_path, model):
    config = load_config(write(tmp_path, VALID.format(model=model)))
    settings = postprocess_config(config, ["person", "car"])

    assert settings.classes == frozenset({0, 1})
    assert dict(settings.class_thresholds) == {1: 0.6}
    assert settings.conf_threshold == 0.4


def test_unknown_class_name_suggests_the_closest(tmp_path, model):
    config = load_config(write(tmp_path, VALID.format(model=model).replace("person", "persn")))

    with pytest.raises(ConfigError, match=r"'persn' is not a class .* Did you mean 'person'"):
        postprocess_config(config, ["person", "car"])


def test_unknown_key_is_reported_with_line_path_and_the_keys_expected(tmp_path):
    text = "model:\n  path: m.onnx\n  threads: 4\nsource: {type: file, path: v.mp4}\n"
    message = problems(write(tmp_path, text))

    assert "daemon.yaml:3: model.threads: unknown key; did you mean 'intra_op_threads'?" in message
    assert "expected one of: path, intra_op_threads, inter_op_threads, allow_spinning" in message


def test_bad_values_are_reported_with_path_value_and_expectation(tmp_path):
    text = (
        "model: {path: m.onnx}\n"
        "source: {type: file, path: v.mp4}\n"
        "detect:\n"
        "  conf: 1.5\n"
        "  classes: [person, 2.5]\n"
        "outputs:\n"
        "  mqtt:\n"
        "    port: http\n"
    )
    message = problems(write(tmp_path, text))

    assert "has 3 problems" in message
    assert "daemon.yaml:4: detect.conf = 1.5: expected a number at most 1" in message
    expected = "daemon.yaml:5: detect.classes[1] = 2.5: expected a class name (person) or id (0)"
    assert expected in message
    assert "daemon.yaml:8: outputs.mqtt.port = 'http': input should be a valid integer" in message


def test_source_keys_are_checked_against_the_chosen_type(tmp_path):
    text = "model: {path: m.onnx}\nsource:\n  type: usb\n  device: /dev/video0\n  paht: x\n"
    message = problems(write(tmp_path, text))

    assert "daemon.yaml:5: source.paht: unknown key; did you mean 'path'?" not in message
    assert "daemon.yaml:5: source.paht: unknown key" in message
    assert "(expected one of: type, camera" not in message  # the usb keys, not the Pi camera's
    assert "device" in message


def test_unknown_source_type_lists_the_known_ones(tmp_path):
    message = problems(write(tmp_path, "model: {path: m.onnx}\nsource: {type: webcam}\n"))

    assert "daemon.yaml:2: source = " in message
    assert "'picamera', 'usb', 'stream', 'file', 'folder'" in message


def test_missing_sections_say_what_they_are_for(tmp_path):
    message = problems(write(tmp_path, "detect: {conf: 0.3}\n"))

    assert "model: required key is missing" in message
    assert "source: required key is missing" in message


def test_yaml_syntax_errors_point_at_the_line(tmp_path):
    message = problems(write(tmp_path, "model:\n  path: [m.onnx\nsource: {}\n"))

    assert "daemon.yaml:" in message and "not valid YAML" in message


def test_duplicate_keys_are_rejected(tmp_path):
    text = "model: {path: a.onnx}\nsource: {type: file, path: v.mp4}\nmodel: {path: b.onnx}\n"
    message = problems(write(tmp_path, text))

    assert "daemon.yaml:3: model: key given twice (first on line 1)" in message


def test_a_top_level_list_is_rejected(tmp_path):
    message = problems(write(tmp_path, "- model\n"))

    assert "expected a mapping of sections" in message


def test_a_folder_or_a_binary_file_as_config_says_what_was_expected(tmp_path):
    with pytest.raises(ConfigError) as folder:
        load_config(tmp_path)
    binary = tmp_path / "daemon.yaml"
    binary.write_bytes(b"\xb7\x00\xff" * 50)
    with pytest.raises(ConfigError) as undecodable:
        load_config(binary)

    assert "is a folder" in str(folder.value) and "daemon.yaml" in str(folder.value)
    assert "is not UTF-8 text" in str(undecodable.value)
    assert "Errno" not in str(folder.value) + str(undecodable.value)


def test_flags_override_the_file_and_errors_name_the_flag(tmp_path, model):
    path = write(tmp_path, VALID.format(model=model))
    overrides = run_overrides(conf=0.7, classes="car", max_frames=5, mqtt_host="broker.lan")
    config = load_config(path, overrides, flag_names=RUN_FLAGS)

    assert config.detect.conf == 0.7
    assert config.detect.classes == ["car"]
    assert config.pipeline.max_frames == 5
    assert config.outputs.mqtt.enabled and config.outputs.mqtt.host == "broker.lan"
    assert config.outputs.jsonl.path == "out.jsonl"  # untouched by the flags

    message = problems(path, run_overrides(conf=3.0))
    assert "--conf: detect.conf = 3.0: expected a number at most 1" in message


def test_source_flag_replaces_the_whole_source_section(tmp_path, model):
    path = write(tmp_path, VALID.format(model=model))
    config = load_config(path, run_overrides(source="rtsp://cam.local/stream"))

    assert config.source.type == "stream"
    assert config.source.url == "rtsp://cam.local/stream"
    assert newest_frame(config) is True  # a live source: newest frame only


runner = CliRunner()


def test_check_config_exits_0_for_a_valid_file(tmp_path, model):
    result = runner.invoke(app, ["check-config", str(write(tmp_path, VALID.format(model=model)))])

    assert result.exit_code == 0, result.output
    assert "OK (model" in result.output and "outputs: jsonl, http" in result.output


def test_check_config_exits_1_with_the_problem_for_a_bad_file(tmp_path, model):
    text = VALID.format(model=model).replace("conf: 0.4", "conf: high")
    result = runner.invoke(app, ["check-config", str(write(tmp_path, text))])

    assert result.exit_code == 1
    assert "daemon.yaml:7: detect.conf = 'high': input should be a valid number" in result.output


def test_check_config_checks_the_model_file_unless_schema_only(tmp_path):
    path = write(tmp_path, VALID.format(model=tmp_path / "absent.onnx"))

    missing = runner.invoke(app, ["check-config", str(path)])
    schema_only = runner.invoke(app, ["check-config", "--schema-only", str(path)])

    assert missing.exit_code == 1
    assert "absent.onnx does not exist" in missing.output
    assert schema_only.exit_code == 0, schema_only.output


def test_check_config_checks_class_names_against_the_model(tmp_path, model):
    text = VALID.format(model=model).replace("[person, 1]", "[person, bus]")
    result = runner.invoke(app, ["check-config", str(write(tmp_path, text))])

    assert result.exit_code == 1
    assert "'bus' is not a class of this model" in result.output


def test_check_config_of_a_missing_file_exits_1(tmp_path):
    result = runner.invoke(app, ["check-config", str(tmp_path / "nope.yaml")])

    assert result.exit_code == 1
    assert "Config file not found" in result.output


def test_the_installed_command_reports_a_bad_flag_and_exits_2(tmp_path, model):
    command = [str(TOOLKIT_DEVICE), "run", "--model", str(model), "--source", "v.mp4"]
    if not TOOLKIT_DEVICE.exists():
        command = [sys.executable, "-m", "device.cli", *command[1:]]
    result = subprocess.run(
        [*command, "--iou", "2"], capture_output=True, text=True, timeout=60, cwd=REPO
    )

    assert result.returncode == 2
    assert "--iou: detect.iou = 2.0: expected a number at most 1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("source", ["picamera", "usb", "stream", "file", "folder"])
def test_example_config_is_valid_and_shows_every_default(tmp_path, source):
    result = runner.invoke(app, ["example-config", "--source", source])
    assert result.exit_code == 0, result.output
    path = tmp_path / "example.yaml"
    path.write_text(result.output)

    config = load_config(path)

    assert config.source.type == source
    # Nothing in the example differs from the defaults it documents.
    assert config.detect == type(config.detect)()
    assert config.pipeline == type(config.pipeline)()
    assert config.outputs.model_dump() == type(config.outputs)().model_dump()
    assert "# minimum objectness x class score" in result.output
