"""toolkit bundle and the device's refusal of a bundle whose checksums do not match."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from device.bundle import verify_bundle
from device.cli import app as device_app
from device.errors import ToolkitError
from tests.tiny_model import NAMES, write_tiny_model, write_unloadable_model
from toolkit.bundle import (
    BundleModel,
    build_bundle,
    build_runtime_wheel,
    min_onnxruntime,
    open_bundle,
)
from toolkit.cli import app as toolkit_app


@pytest.fixture(scope="session")
def runtime_wheel(tmp_path_factory) -> Path:
    return build_runtime_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture
def models(tmp_path) -> dict[str, Path]:
    return {
        "fp32": write_tiny_model(tmp_path / "tiny.onnx"),
        "int8": write_tiny_model(tmp_path / "tiny-int8.onnx", precision="int8", seed=1),
    }


@pytest.fixture
def daemon_config(tmp_path) -> Path:
    path = tmp_path / "daemon.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "/somewhere/else.onnx", "intra_op_threads": 2},
                "source": {"type": "folder", "path": str(tmp_path), "loop": True},
                "outputs": {"http": {"enabled": True, "port": 8123}},
            }
        )
    )
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bundle_directory_holds_models_config_wheel_and_a_true_manifest(
    tmp_path, models, daemon_config, runtime_wheel
):
    out = build_bundle(
        [BundleModel("fp32", models["fp32"]), BundleModel("int8", models["int8"])],
        tmp_path / "bundle",
        config=daemon_config,
        runtime_wheel=runtime_wheel,
    )

    manifest = json.loads((out / "manifest.json").read_text())
    listed = set(manifest["files"])
    on_disk = {
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name != "manifest.json"
    }
    assert (
        listed
        == on_disk
        == {
            "config.yaml",
            "model-fp32.onnx",
            "model-int8.onnx",
            f"runtime/{runtime_wheel.name}",
        }
    )
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(out / name)
        assert entry["size"] == (out / name).stat().st_size

    assert (out / "model.onnx").readlink() == Path("model-fp32.onnx")
    assert manifest["default_model"] == "model-fp32.onnx"
    assert [m["precision"] for m in manifest["models"]] == ["fp32", "int8"]
    fp32 = manifest["models"][0]
    assert fp32["opset"] == 17 and fp32["ir_version"] == 8
    assert fp32["min_onnxruntime"] == "1.12"
    assert fp32["info"]["names"] == NAMES and fp32["info"]["input_size"] == [64, 64]
    assert manifest["models"][1]["info"]["precision"] == "int8"
    assert manifest["target"] == {"arch": "aarch64", "min_onnxruntime": "1.12", "python": ">=3.10"}
    assert manifest["built_with"]["onnxruntime"] and manifest["built_with"]["edge-yolo-toolkit"]
    assert manifest["health_url"] == "http://127.0.0.1:8123/health"

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"] == {"path": "model.onnx", "intra_op_threads": 2}
    assert verify_bundle(out).release_id == manifest["release"]


def test_runtime_wheel_is_reproducible_so_devices_reuse_its_venv(tmp_path, runtime_wheel):
    again = build_runtime_wheel(tmp_path)

    assert again.name == runtime_wheel.name
    assert sha256(again) == sha256(runtime_wheel)


def test_archive_bundle_unpacks_to_the_same_verified_content(
    tmp_path, models, daemon_config, runtime_wheel
):
    archive = build_bundle(
        [BundleModel("fp32", models["fp32"])],
        tmp_path / "cam.tar.gz",
        config=daemon_config,
        runtime_wheel=runtime_wheel,
        release="v1.2.0",
    )

    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    unpacked = open_bundle(archive, tmp_path / "work")
    assert names == [
        "config.yaml",
        "manifest.json",
        "model-fp32.onnx",
        "model.onnx",
        "runtime",
        f"runtime/{runtime_wheel.name}",
    ]
    assert verify_bundle(unpacked).release_id == "v1.2.0"
    assert not list(tmp_path.glob(".*partial*")), "no partial archive left behind"


@pytest.mark.parametrize(
    ("opset", "ir", "expected"),
    [(11, 6, "1.6"), (13, 7, "1.6"), (17, 8, "1.12"), (19, 9, "1.15"), (21, 10, "1.18")],
)
def test_min_onnxruntime_follows_opset_and_ir_version(opset, ir, expected):
    assert min_onnxruntime(opset, ir) == expected


def test_min_onnxruntime_takes_the_stricter_of_opset_and_ir():
    assert min_onnxruntime(13, 10) == "1.18"


def test_opset_newer_than_the_table_asks_for_the_host_onnxruntime():
    import onnxruntime

    assert min_onnxruntime(99, 8) == onnxruntime.__version__


def tampered_copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy, symlinks=True)
    config = copy / "config.yaml"
    config.write_text(config.read_text().replace("8123", "8124"))  # same size, other content
    return copy


@pytest.fixture
def small_bundle(tmp_path, models, daemon_config) -> Path:
    return build_bundle(
        [BundleModel("fp32", models["fp32"])],
        tmp_path / "small",
        config=daemon_config,
        include_runtime=False,
    )


def test_device_refuses_a_bundle_whose_file_changed(tmp_path, small_bundle):
    tampered = tampered_copy(small_bundle, tmp_path)

    outcome = CliRunner().invoke(device_app, ["verify-bundle", str(tampered)])

    assert outcome.exit_code == 1
    assert isinstance(outcome.exception, ToolkitError)
    message = str(outcome.exception)
    assert (
        "config.yaml: " in message and "sha256" in message and "build or copy it again" in message
    )


def test_device_refuses_a_bundle_with_a_missing_file_and_names_it(tmp_path, small_bundle):
    (small_bundle / "model-fp32.onnx").unlink()

    with pytest.raises(ToolkitError, match=r"model-fp32.onnx: missing"):
        verify_bundle(small_bundle)


def test_model_link_pointing_outside_the_manifest_is_refused(small_bundle):
    (small_bundle / "model.onnx").unlink()
    (small_bundle / "model.onnx").symlink_to("/etc/passwd")

    with pytest.raises(ToolkitError, match=r"model.onnx: points at /etc/passwd"):
        verify_bundle(small_bundle)


def test_verify_bundle_cli_passes_an_intact_bundle(small_bundle):
    outcome = CliRunner().invoke(device_app, ["verify-bundle", str(small_bundle)])

    assert outcome.exit_code == 0, outcome.output
    assert "files match the manifest" in outcome.stdout


def test_daemon_refuses_to_start_from_a_tampered_bundle(tmp_path, small_bundle):
    tampered = tampered_copy(small_bundle, tmp_path)

    done = subprocess.run(
        [sys.executable, "-m", "device.cli", "run", str(tampered / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 1
    assert "Refusing the bundle" in done.stderr and "config.yaml" in done.stderr


def test_unloadable_model_is_refused_at_bundle_time(tmp_path, daemon_config):
    broken = write_unloadable_model(tmp_path / "broken.onnx")

    with pytest.raises(ToolkitError, match=r"cannot load .*broken.onnx"):
        build_bundle(
            [BundleModel("fp32", broken)],
            tmp_path / "b",
            config=daemon_config,
            include_runtime=False,
        )
    assert not (tmp_path / "b").exists()


def test_not_an_onnx_file_is_refused(tmp_path, daemon_config):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 10)

    with pytest.raises(ToolkitError, match=r"Could not read .*junk.onnx as an ONNX model"):
        build_bundle([BundleModel("fp32", junk)], tmp_path / "b", include_runtime=False)


def test_config_the_daemon_would_reject_is_refused_with_its_key(tmp_path, models, daemon_config):
    config = yaml.safe_load(daemon_config.read_text())
    config["detect"] = {"conff": 0.3}
    daemon_config.write_text(yaml.safe_dump(config))

    with pytest.raises(ToolkitError, match=r"detect.conff: unknown key"):
        build_bundle(
            [BundleModel("fp32", models["fp32"])],
            tmp_path / "b",
            config=daemon_config,
            include_runtime=False,
        )


def test_config_without_the_health_endpoint_is_refused(tmp_path, models, daemon_config):
    config = yaml.safe_load(daemon_config.read_text())
    config["outputs"]["http"]["enabled"] = False
    daemon_config.write_text(yaml.safe_dump(config))

    with pytest.raises(ToolkitError, match=r"set outputs.http.enabled: true"):
        build_bundle(
            [BundleModel("fp32", models["fp32"])],
            tmp_path / "b",
            config=daemon_config,
            include_runtime=False,
        )


def test_int8_model_given_as_fp32_is_refused(tmp_path, models):
    with pytest.raises(ToolkitError, match="its metadata says INT8: pass it with --int8"):
        build_bundle([BundleModel("fp32", models["int8"])], tmp_path / "b", include_runtime=False)


def test_existing_output_is_kept_without_force(tmp_path, models, small_bundle):
    before = (small_bundle / "manifest.json").read_text()

    with pytest.raises(ToolkitError, match="already exists"):
        build_bundle([BundleModel("fp32", models["fp32"])], small_bundle, include_runtime=False)
    assert (small_bundle / "manifest.json").read_text() == before


def test_cli_bundle_with_both_models_and_int8_default(tmp_path, models, daemon_config):
    out = tmp_path / "cli-bundle"

    outcome = CliRunner().invoke(
        toolkit_app,
        [
            "bundle",
            str(out),
            "--fp32",
            str(models["fp32"]),
            "--int8",
            str(models["int8"]),
            "--config",
            str(daemon_config),
            "--default-precision",
            "int8",
            "--arch",
            "aarch64",
            "--no-runtime",
        ],
    )

    assert outcome.exit_code == 0, outcome.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["default_model"] == "model-int8.onnx"
    assert manifest["runtime_wheel"] is None
    assert (out / "model.onnx").readlink() == Path("model-int8.onnx")


def test_cli_bundle_without_a_model_says_what_is_expected(tmp_path):
    outcome = CliRunner().invoke(toolkit_app, ["bundle", str(tmp_path / "x"), "--no-runtime"])

    assert outcome.exit_code != 0
    assert "Expected at least one model (--fp32 and/or --int8)" in str(outcome.exception)


def test_fp16_model_is_refused_with_advice_that_exists(tmp_path):
    fp16 = write_tiny_model(tmp_path / "tiny-fp16.onnx", precision="fp16")

    with pytest.raises(ToolkitError, match="FP16 model") as error:
        build_bundle([BundleModel("fp32", fp16)], tmp_path / "b", include_runtime=False)
    assert "--fp16" not in str(error.value)  # no such option
    assert "without --half" in str(error.value)


@pytest.mark.parametrize("release", ["../../etc", "a/b", "two words", ".hidden", "x" * 101, ""])
def test_release_id_that_is_no_safe_directory_name_is_refused(tmp_path, models, release):
    with pytest.raises(ToolkitError, match="not usable as a directory name"):
        build_bundle(
            [BundleModel("fp32", models["fp32"])],
            tmp_path / "b",
            release=release,
            include_runtime=False,
        )
    assert not (tmp_path / "b").exists()


def test_manifest_with_a_path_as_release_is_refused_on_the_device(small_bundle):
    # The release id becomes <root>/releases/<id>, which a failed deploy removes again.
    manifest_path = small_bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["release"] = "../../etc"
    manifest_path.write_text(json.dumps(manifest))

    outcome = CliRunner().invoke(device_app, ["verify-bundle", str(small_bundle)])

    assert outcome.exit_code == 1
    assert "'../../etc' is not usable as a directory name" in str(outcome.exception)


def test_config_error_names_the_users_file_not_the_staging_copy(tmp_path, models, daemon_config):
    daemon_config.write_text(daemon_config.read_text() + "foo: 1\n")

    with pytest.raises(ToolkitError) as error:
        build_bundle(
            [BundleModel("fp32", models["fp32"])],
            tmp_path / "b",
            config=daemon_config,
            include_runtime=False,
        )
    assert f"{daemon_config} (as bundled)" in str(error.value)
    assert ".bundle-" not in str(error.value)


def test_verify_bundle_on_an_archive_says_to_unpack_it(tmp_path, models):
    archive = build_bundle(
        [BundleModel("fp32", models["fp32"])], tmp_path / "b.tar.gz", include_runtime=False
    )

    outcome = CliRunner().invoke(device_app, ["verify-bundle", str(archive)])

    assert outcome.exit_code == 1
    assert "tar -xzf" in str(outcome.exception)


def test_runtime_wheel_that_is_not_this_projects_wheel_is_refused(tmp_path, models):
    not_a_zip = tmp_path / "edge_yolo_toolkit-1.0-py3-none-any.whl"
    not_a_zip.write_text("hello")
    other = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("other-1.0.dist-info/METADATA", "Name: other\n")

    with pytest.raises(ToolkitError, match="is not a wheel"):
        build_bundle([BundleModel("fp32", models["fp32"])], tmp_path / "a", runtime_wheel=not_a_zip)
    with pytest.raises(ToolkitError, match="not a wheel of this project"):
        build_bundle([BundleModel("fp32", models["fp32"])], tmp_path / "b", runtime_wheel=other)
    with pytest.raises(ToolkitError, match="contradict"):
        build_bundle(
            [BundleModel("fp32", models["fp32"])],
            tmp_path / "c",
            runtime_wheel=other,
            include_runtime=False,
        )
    assert not any((tmp_path / name).exists() for name in "abc")
