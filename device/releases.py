"""The release layout on a device, and its health probe, as ``toolkit deploy`` sees them.

::

    <root>/releases/<id>/      one verified bundle each, plus ``start`` and ``deploy.json``
    <root>/current -> releases/<id>     what the service runs
    <root>/previous -> releases/<id>    what ``toolkit deploy --rollback`` returns to
    <root>/venvs/<key>/        runtime virtualenvs, shared by releases with the same wheel
    <root>/state/              the only directory the service may write

Standard library only: ``toolkit deploy`` and ``toolkit status`` send this file to ``python3 -``
on the device.  ``python3 -m device.releases state ROOT`` prints the layout as JSON;
``python3 -m device.releases health URL --wait SECONDS`` waits for the daemon's /health.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

FAILED_MARKER = "FAILED"
DEPLOY_RECORD = "deploy.json"
MANIFEST_NAME = "manifest.json"


def link_target(link: Path) -> str | None:
    """The release id a ``current``/``previous`` link names, or None."""
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def release_state(root: Path) -> dict:
    """What is deployed under ``root``: links, releases (oldest first), runtime venvs."""
    root = Path(root)
    releases = []
    folder = root / "releases"
    candidates = folder.iterdir() if folder.is_dir() else []
    # Oldest first by the time the release directory was moved into place.
    for path in sorted(candidates, key=lambda p: (p.lstat().st_mtime_ns, p.name)):
        if not path.is_dir() or path.name.startswith("."):
            continue
        releases.append(_describe_release(path))
    venvs = sorted(p.name for p in (root / "venvs").iterdir()) if (root / "venvs").is_dir() else []
    return {
        "root": str(root),
        "exists": root.is_dir(),
        "current": link_target(root / "current"),
        "previous": link_target(root / "previous"),
        "releases": releases,
        "venvs": venvs,
    }


def _describe_release(path: Path) -> dict:
    entry: dict = {"id": path.name, "failed": None, "deploy": {}, "manifest": {}}
    marker = path / FAILED_MARKER
    if marker.is_file():
        entry["failed"] = marker.read_text(errors="replace").strip() or "failed"
    for key, name in (("deploy", DEPLOY_RECORD), ("manifest", MANIFEST_NAME)):
        try:
            document = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if key == "manifest":
            document = {
                "release": document.get("release"),
                "created": document.get("created"),
                "default_model": document.get("default_model"),
                "models": [m.get("file") for m in document.get("models", [])],
            }
        entry[key] = document
    model_link = path / "model.onnx"
    entry["model"] = os.readlink(model_link) if model_link.is_symlink() else None
    return entry


def probe_health(url: str, wait: float = 0.0, interval: float = 0.5) -> dict:
    """GET ``url`` until it answers 200 or ``wait`` seconds pass; the last answer as a dict."""
    deadline = time.monotonic() + wait
    while True:
        answer = _get(url)
        if answer["ok"] or time.monotonic() >= deadline:
            return answer
        time.sleep(interval)


def _get(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            body = response.read(4096).decode(errors="replace")
            return {"ok": response.status == 200, "status": response.status, "body": body}
    except urllib.error.HTTPError as exc:
        body = exc.read(4096).decode(errors="replace")
        return {"ok": False, "status": exc.code, "body": body, "error": f"HTTP {exc.code}"}
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"ok": False, "status": None, "body": "", "error": str(reason)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="device.releases", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    state = commands.add_parser("state", help="print the release layout under ROOT as JSON")
    state.add_argument("root", type=Path)
    health = commands.add_parser("health", help="GET the daemon's /health, optionally waiting")
    health.add_argument("url")
    health.add_argument("--wait", type=float, default=0.0, help="seconds to keep trying")
    args = parser.parse_args(argv)

    if args.command == "state":
        print(json.dumps(release_state(args.root)))
        return 0
    answer = probe_health(args.url, args.wait)
    print(json.dumps(answer))
    return 0 if answer["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
