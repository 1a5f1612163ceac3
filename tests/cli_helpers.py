"""Run the ``toolkit`` CLI in-process, as its console script does, and capture the result."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from toolkit.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_toolkit(args: list[str], monkeypatch, capsys) -> CliResult:
    """``toolkit ARGS`` through ``main()``: ToolkitError becomes a message and an exit code."""
    monkeypatch.setattr(sys, "argv", ["toolkit", *map(str, args)])
    with pytest.raises(SystemExit) as stop:
        main()
    captured = capsys.readouterr()
    code = stop.value.code
    return CliResult(code if isinstance(code, int) else 1, captured.out, captured.err)
