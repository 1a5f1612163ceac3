"""Pack what a device needs into one bundle: model(s), daemon config, runtime wheel, manifest.

Layout of a bundle (a directory, or the same as a .tar.gz)::

    manifest.json            sha256 and size of every other file, model metadata, versions
    config.yaml              the daemon config; its model path is ``model.onnx``
    model-fp32.onnx          and/or model-int8.onnx
    model.onnx -> model-…    symlink to the default model; deploy may point it elsewhere
    runtime/<wheel>          this project's wheel, installed on the device by deploy

The manifest is data, not prose: ``device.bundle`` verifies it on the device.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from device.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    MANIFEST_NAME,
    check_release_id,
    file_sha256,
    verify_bundle,
)
from device.contract import model_info_from_metadata
from device.errors import ToolkitError

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
MODEL_LINK = "model.onnx"
RUNTIME_DIR = "runtime"
DEFAULT_HEALTH_PORT = 8080
PRECISIONS = ("fp32", "int8")
# The oldest onnxruntime release that implements each ONNX opset / IR version (onnxruntime's
# version matrix). A model needs both: the larger of the two answers.
ORT_FOR_OPSET = [
    (13, "1.6"),
    (14, "1.8"),
    (15, "1.9"),
    (16, "1.11"),
    (17, "1.12"),
    (18, "1.14"),
    (19, "1.15"),
    (20, "1.17"),
    (21, "1.18"),
    (22, "1.20"),
    (23, "1.22"),
]
ORT_FOR_IR = [(7, "1.6"), (8, "1.9"), (9, "1.15"), (10, "1.18"), (11, "1.22")]
VERSIONED_PACKAGES = ("edge-yolo-toolkit", "onnx", "onnxruntime", "onnxslim", "numpy", "torch")


@dataclass
class BundleModel:
    """One model going into a bundle."""

    precision: str
    path: Path


def build_bundle(
    models: list[BundleModel],
    out: Path,
    *,
    config: Path | None = None,
    default_precision: str | None = None,
    arch: str = "aarch64",
    release: str | None = None,
    runtime_wheel: Path | None = None,
    include_runtime: bool = True,
    health_url: str | None = None,
    check_models: bool = True,
    check_config: bool = True,
    force: bool = False,
) -> Path:
    """Write a bundle to ``out`` (a directory, or an archive when it ends in .tar.gz)."""
    validate_bundle_arguments(models, out, default_precision, force)
    if release is not None:
        check_release_id(release, "--release")
    if runtime_wheel is not None and not include_runtime:
        raise ToolkitError("--runtime-wheel and --no-runtime contradict each other: give one.")
    entries = [describe_model(model, check_load=check_models) for model in models]
    default = _default_model(entries, default_precision)
    config_text = bundle_config_text(config)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=out.parent) as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        _copy_models(models, entries, staging)
        (staging / MODEL_LINK).symlink_to(default["file"])
        (staging / CONFIG_NAME).write_text(config_text)
        if check_config:
            check_daemon_config(staging / CONFIG_NAME, config)
        wheel = _add_runtime(staging, runtime_wheel, include_runtime)

        manifest = make_manifest(
            staging,
            entries,
            default,
            arch=arch,
            release=release,
            wheel=wheel,
            health_url=health_url or health_url_from_config(config_text),
        )
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        verify_bundle(staging)
        _publish(staging, out, force)

    log.info("wrote bundle %s (release %s)", out, manifest["release"])
    return out


def validate_bundle_arguments(
    models: list[BundleModel], out: Path, default_precision: str | None, force: bool
) -> None:
    """Reject impossible argument combinations before any work starts."""
    if not models:
        raise ToolkitError("Expected at least one model (--fp32 and/or --int8), got none.")
    precisions = [model.precision for model in models]
    if len(set(precisions)) != len(precisions):
        raise ToolkitError(f"Expected one model per precision, got {precisions}.")
    for model in models:
        if model.precision not in PRECISIONS:
            raise ToolkitError(f"Expected precision fp32 or int8, got {model.precision!r}.")
        if not Path(model.path).is_file():
            raise ToolkitError(f"The {model.precision.upper()} model {model.path} does not exist.")
    if default_precision and default_precision not in precisions:
        raise ToolkitError(
            f"--default-precision {default_precision} names no bundled model "
            f"(bundled: {', '.join(precisions)})."
        )
    if Path(out).exists() and not force:
        raise ToolkitError(f"{out} already exists: choose another path or pass --force.")


def describe_model(model: BundleModel, *, check_load: bool = True) -> dict:
    """The manifest entry of one model: metadata, opset, IR version, minimum onnxruntime."""
    import onnx

    try:
        proto = onnx.load(str(model.path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError, OSError…
        raise ToolkitError(
            f"Could not read {model.path} as an ONNX model ({exc.__class__.__name__}: {exc}). "
            "Export it again with 'toolkit export'."
        ) from exc
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    info = model_info_from_metadata(metadata, model_path=str(model.path))
    opset = _default_domain_opset(proto)
    if info.precision == "fp16":
        raise ToolkitError(
            f"{model.path} is an FP16 model ('toolkit export --half'); bundles carry FP32 and "
            "INT8 models, as Pi-class CPUs run FP16 no faster than FP32. Export it again "
            "without --half and bundle that with --fp32."
        )
    if info.precision != model.precision and info.source.kind != "ultralytics-onnx":
        raise ToolkitError(
            f"{model.path} was given as {model.precision.upper()} but its metadata says "
            f"{info.precision.upper()}: pass it with --{info.precision}."
        )
    if check_load:
        _check_loads(model.path)
    return {
        "file": f"model-{model.precision}.onnx",
        "precision": model.precision,
        "opset": opset,
        "ir_version": proto.ir_version,
        "domains": sorted({entry.domain or "ai.onnx" for entry in proto.opset_import}),
        "min_onnxruntime": min_onnxruntime(opset, proto.ir_version),
        "info": json.loads(info.model_dump_json()),
    }


def min_onnxruntime(opset: int, ir_version: int) -> str:
    """The oldest onnxruntime that runs a model of this opset and IR version."""
    by_opset = _lookup(ORT_FOR_OPSET, opset)
    by_ir = _lookup(ORT_FOR_IR, ir_version)
    if by_opset is None or by_ir is None:
        # Newer than the table: the onnxruntime that just loaded it is the safe answer.
        return _package_version("onnxruntime") or ORT_FOR_OPSET[-1][1]
    return max(by_opset, by_ir, key=_version_tuple)


def bundle_config_text(config: Path | None) -> str:
    """The daemon config with its model path pointed at the bundled model link."""
    if config is None:
        document: dict = {"source": {"type": "picamera"}}
    else:
        try:
            document = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ToolkitError(f"Could not read the daemon config {config}: {exc}") from exc
        if not isinstance(document, dict):
            raise ToolkitError(
                f"Expected the daemon config {config} to be a YAML mapping, found "
                f"{type(document).__name__}."
            )
    model = document.get("model")
    if isinstance(model, dict):
        document["model"] = {**model, "path": MODEL_LINK}
    else:
        document["model"] = {"path": MODEL_LINK}
    return yaml.safe_dump(document, sort_keys=False)


def check_daemon_config(path: Path, original: Path | None) -> None:
    """The daemon must accept the config: keys, values, and the bundled model's classes."""
    from device.cli import check_model_reference
    from device.config import load_config

    try:
        # Relative model paths resolve in the release directory, where the daemon starts.
        model = path.parent / load_config(path).model.path
        check_model_reference(load_config(path, {"model.path": str(model)}))
    except ToolkitError as exc:
        source = original or "the default config"
        # The daemon read the staged copy; name the user's file (line numbers are the copy's,
        # which has model.path rewritten).
        detail = str(exc).replace(str(path), f"{source} (as bundled)")
        raise ToolkitError(
            f"The daemon config ({source}) is not valid for the daemon: {detail}"
        ) from exc


def health_url_from_config(config_text: str) -> str:
    """Where the daemon's /health answers on the device itself."""
    document = yaml.safe_load(config_text) or {}
    http = (document.get("outputs") or {}).get("http") or {}
    if http.get("enabled") is False:
        raise ToolkitError(
            "The daemon config disables outputs.http, but deploy proves each release through "
            "its GET /health: set outputs.http.enabled: true (host 127.0.0.1 keeps it local)."
        )
    return f"http://127.0.0.1:{http.get('port', DEFAULT_HEALTH_PORT)}/health"


def make_manifest(
    root: Path,
    entries: list[dict],
    default: dict,
    *,
    arch: str,
    release: str | None,
    wheel: str | None,
    health_url: str,
) -> dict:
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            name = path.relative_to(root).as_posix()
            files[name] = {"sha256": file_sha256(path), "size": path.stat().st_size}
    content_hash = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    created = dt.datetime.now(dt.timezone.utc)
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "release": release or f"{created:%Y%m%dT%H%M%SZ}-{content_hash[:8]}",
        "created": created.isoformat(timespec="seconds"),
        "target": {
            "arch": arch,
            "min_onnxruntime": max(
                (entry["min_onnxruntime"] for entry in entries), key=_version_tuple
            ),
            "python": ">=3.10",
        },
        "config": CONFIG_NAME,
        "model_link": MODEL_LINK,
        "default_model": default["file"],
        "models": entries,
        "runtime_wheel": wheel,
        "health_url": health_url,
        "built_with": built_with(),
        "files": files,
    }


def built_with() -> dict[str, str]:
    versions = {"python": platform.python_version(), "host": f"{sys.platform}-{platform.machine()}"}
    for package in VERSIONED_PACKAGES:
        version = _package_version(package)
        if version:
            versions[package] = version
    return versions


def build_runtime_wheel(out_dir: Path) -> Path:
    """This project's wheel, built from the source tree without touching the network."""
    project = _project_root()
    with tempfile.TemporaryDirectory(prefix="runtime-src-") as tmp:
        # Build from a copy: setuptools writes build/ and egg-info next to the sources.
        source = Path(tmp) / "src"
        source.mkdir()
        shutil.copy2(project / "pyproject.toml", source)
        readme = project / "README.md"
        if readme.exists():
            shutil.copy2(readme, source)
        else:
            (source / "README.md").write_text("edge-yolo-toolkit\n")
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for package in ("device", "toolkit"):
            shutil.copytree(project / package, source / package, ignore=ignore)
        command = [
            sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
            "--no-build-isolation", "--no-index", "--wheel-dir", str(out_dir), str(source),
        ]  # fmt: skip
        # Fixed zip timestamps: unchanged sources give the same wheel, so devices reuse its venv.
        env = {**os.environ, "SOURCE_DATE_EPOCH": os.environ.get("SOURCE_DATE_EPOCH", "315532800")}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise ToolkitError(
            f"Building the runtime wheel failed:\n{done.stderr.strip()[-2000:]}\n"
            "Pass a prebuilt one with --runtime-wheel, or --no-runtime."
        )
    wheels = sorted(Path(out_dir).glob("edge_yolo_toolkit-*.whl"))
    if not wheels:
        raise ToolkitError(f"pip reported success but left no wheel in {out_dir}.")
    log.info("built runtime wheel %s", wheels[-1].name)
    return wheels[-1]


def open_bundle(path: Path, workdir: Path) -> Path:
    """A verified bundle directory: ``path`` itself, or ``path`` unpacked into ``workdir``."""
    path = Path(path)
    if path.is_dir():
        verify_bundle(path)
        return path
    if not path.is_file():
        raise ToolkitError(f"Expected a bundle directory or .tar.gz at {path}, found nothing.")
    target = Path(workdir) / "bundle"
    try:
        with tarfile.open(path, "r:gz") as archive:
            archive.extractall(target, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ToolkitError(
            f"Could not unpack {path} as a .tar.gz bundle ({exc}): build it again."
        ) from exc
    verify_bundle(target)
    return target


def _default_model(entries: list[dict], precision: str | None) -> dict:
    by_precision = {entry["precision"]: entry for entry in entries}
    if precision:
        return by_precision[precision]
    # FP32 is never slower than an INT8 model on a board without dot-product instructions.
    return by_precision.get("fp32") or by_precision["int8"]


def _copy_models(models: list[BundleModel], entries: list[dict], staging: Path) -> None:
    for model, entry in zip(models, entries, strict=True):
        shutil.copyfile(model.path, staging / entry["file"])


def _add_runtime(staging: Path, wheel: Path | None, include: bool) -> str | None:
    if not include:
        return None
    folder = staging / RUNTIME_DIR
    folder.mkdir()
    if wheel is None:
        wheel = build_runtime_wheel(folder)
    else:
        if not Path(wheel).is_file() or not str(wheel).endswith(".whl"):
            raise ToolkitError(f"Expected a .whl file for --runtime-wheel, got {wheel}.")
        _check_runtime_wheel(Path(wheel))
        shutil.copyfile(wheel, folder / Path(wheel).name)
    return f"{RUNTIME_DIR}/{Path(wheel).name}"


def _check_runtime_wheel(wheel: Path) -> None:
    """The wheel must be this project's: the device pip-installs it only after the upload."""
    import zipfile

    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ToolkitError(
            f"--runtime-wheel {wheel} is not a wheel (a wheel is a zip archive: {exc}). Build "
            "one with 'pip wheel --no-deps .' in the project, or leave the option out."
        ) from exc
    project = "edge_yolo_toolkit-"
    if not any(name.startswith(project) and ".dist-info/" in name for name in names):
        raise ToolkitError(
            f"--runtime-wheel {wheel} holds no {project}*.dist-info: it is not a wheel of this "
            "project, which the device runs. Leave the option out to build the right one."
        )


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished bundle into place in one rename, so no half bundle is ever seen."""
    if out.name.endswith((".tar.gz", ".tgz")):
        partial = out.with_name(f".{out.name}.partial")
        with tarfile.open(partial, "w:gz") as archive:
            for path in sorted(staging.iterdir()):
                archive.add(path, arcname=path.name)
        os.replace(partial, out)
        return
    if out.exists() and force:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    staging.rename(out)


def _check_loads(path: Path) -> None:
    import onnxruntime

    try:
        onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ToolkitError(
            f"onnxruntime {onnxruntime.__version__} cannot load {path}: {exc}. "
            "Export the model again."
        ) from exc


def _default_domain_opset(proto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ToolkitError("The model imports no default ONNX opset: export it again.")


def _lookup(table: list[tuple[int, str]], value: int) -> str | None:
    for limit, version in table:
        if value <= limit:
            return version
    return None


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _project_root() -> Path:
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file() or not (root / "device").is_dir():
        raise ToolkitError(
            f"No project source tree next to {Path(__file__).parent} to build the runtime "
            "wheel from: pass --runtime-wheel PATH (pip wheel edge-yolo-toolkit) or --no-runtime."
        )
    return root


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())
