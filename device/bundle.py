"""A bundle on the device: read its manifest and refuse it unless every checksum matches.

A bundle is a directory (or a .tar.gz of one) holding the model(s), the daemon config and
``manifest.json``, which lists the sha256 and size of every other file.  ``toolkit bundle``
writes it; this module checks it, as ``toolkit-device verify-bundle DIR``, from ``toolkit
deploy`` and from the daemon before it loads a bundled config.

Standard library only, and nothing imported from the rest of the package unless present:
``toolkit deploy`` sends this file to ``python3 -`` on devices without the runtime.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

try:
    from device.errors import ToolkitError
except ImportError:  # sent alone to a device without the runtime

    class ToolkitError(Exception):  # type: ignore[no-redef]
        exit_code = 1


MANIFEST_NAME = "manifest.json"
BUNDLE_FORMAT = "edge-yolo-bundle"
BUNDLE_FORMAT_VERSION = 1
_CHUNK = 1 << 20
# Release ids become <root>/releases/<id> on the device: no '/', no '..', no spaces.
RELEASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose files all match its manifest."""

    root: Path
    manifest: dict
    manifest_sha256: str

    @property
    def config_path(self) -> Path:
        return self.root / self.manifest["config"]

    @property
    def release_id(self) -> str:
        return self.manifest["release"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(root: Path) -> dict:
    """The parsed manifest of the bundle at ``root``, checked for format and shape."""
    path = Path(root) / MANIFEST_NAME
    if Path(root).is_file():
        raise ToolkitError(
            f"Expected a bundle directory, found the file {root}. An archive bundle is checked "
            f"unpacked: mkdir b && tar -xzf {root} -C b, then check b."
        )
    if not path.is_file():
        raise ToolkitError(
            f"Expected a bundle directory with {MANIFEST_NAME}, found none in {root}. "
            "Make one with 'toolkit bundle'."
        )
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ToolkitError(f"{path} is not valid JSON ({exc}): rebuild the bundle.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ToolkitError(
            f"{path} is not an edge-yolo bundle manifest (expected format "
            f"'{BUNDLE_FORMAT}'): rebuild the bundle with 'toolkit bundle'."
        )
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise ToolkitError(
            f"{path} has bundle format version {version}, this runtime reads version "
            f"{BUNDLE_FORMAT_VERSION}: update the device runtime or rebuild the bundle."
        )
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise ToolkitError(f"{path} lists no files: rebuild the bundle.")
    check_release_id(manifest.get("release"), f"{path}: the release id")
    return manifest


def check_release_id(release: object, what: str = "The release id") -> str:
    """A release id names a directory on the device: one safe path component, nothing else."""
    if not isinstance(release, str) or not RELEASE_ID.fullmatch(release):
        raise ToolkitError(
            f"{what} {release!r} is not usable as a directory name on the device: expected "
            "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. "
            "2026-05-01-cam). Rebuild the bundle with another --release."
        )
    return release


def verify_bundle(root: Path) -> VerifiedBundle:
    """Check every file the manifest lists; raise one ToolkitError naming each problem."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    for name, expected in sorted(manifest["files"].items()):
        problem = _check_file(root, name, expected)
        if problem:
            problems.append(problem)
    link_problem = _check_model_link(root, manifest)
    if link_problem:
        problems.append(link_problem)
    if problems:
        raise ToolkitError(
            f"Refusing the bundle in {root}: {len(problems)} file(s) do not match its "
            f"manifest: {'; '.join(problems)}. The bundle was changed after 'toolkit bundle' "
            "or damaged in transfer: build or copy it again."
        )
    return VerifiedBundle(root, manifest, file_sha256(root / MANIFEST_NAME))


def find_bundle_root(config_path: Path) -> Path | None:
    """The bundle a config file belongs to, if it sits next to a manifest that lists it."""
    folder = Path(config_path).resolve().parent
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        listed = json.loads(manifest_path.read_text()).get("files", {})
    except (ValueError, AttributeError):
        return folder  # a damaged manifest: verify_bundle will say so
    return folder if Path(config_path).name in listed else None


def verify_if_bundled(config_path: Path) -> VerifiedBundle | None:
    """Before a daemon loads a config that belongs to a bundle, refuse a damaged bundle."""
    root = find_bundle_root(config_path)
    return verify_bundle(root) if root is not None else None


def _check_file(root: Path, name: str, expected: dict) -> str:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        return f"{name}: a path outside the bundle"
    path = root / relative
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != expected.get("size", size):
        return f"{name}: {size} bytes, expected {expected['size']}"
    actual = file_sha256(path)
    if actual != expected.get("sha256"):
        return f"{name}: sha256 {actual[:12]}…, expected {str(expected.get('sha256'))[:12]}…"
    return ""


def _check_model_link(root: Path, manifest: dict) -> str:
    """The model link must name one of the bundle's own, checked models."""
    link = manifest.get("model_link")
    if not link or not (root / link).is_symlink():
        return ""
    target = PurePosixPath(str((root / link).readlink()))
    if target.is_absolute() or ".." in target.parts or target.as_posix() not in manifest["files"]:
        return f"{link}: points at {target}, which is not a model listed in the manifest"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="device.bundle", description="Verify a bundle's checksums against its manifest."
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--manifest-sha256", help="also require this sha256 of manifest.json")
    args = parser.parse_args(argv)
    try:
        verified = verify_bundle(args.directory)
        if args.manifest_sha256 and verified.manifest_sha256 != args.manifest_sha256:
            raise ToolkitError(
                f"manifest.json in {args.directory} has sha256 {verified.manifest_sha256[:12]}…, "
                f"expected {args.manifest_sha256[:12]}…: it is not the bundle that was sent."
            )
    except ToolkitError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        else:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    summary = {
        "ok": True,
        "release": verified.manifest.get("release"),
        "files": len(verified.manifest["files"]),
        "manifest_sha256": verified.manifest_sha256,
    }
    print(json.dumps(summary) if args.json else f"ok: {summary['files']} files match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
