"""Test stand-in for the parts of libcamera's Python bindings that picamera2 users touch:
``ColorSpace`` presets and ``Transform``.  Only for machines without a Pi camera."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ColorSpace:
    name: str

    @staticmethod
    def Sycc() -> ColorSpace:
        return ColorSpace("sYCC")

    @staticmethod
    def Smpte170m() -> ColorSpace:
        return ColorSpace("SMPTE170M")

    @staticmethod
    def Rec709() -> ColorSpace:
        return ColorSpace("Rec709")


@dataclass(frozen=True)
class Transform:
    hflip: int = 0
    vflip: int = 0
