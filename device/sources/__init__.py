"""Frame sources: Pi camera, USB/V4L2, network streams, video files and image folders.

The daemon needs only ``open_source(config)``; each kind's module is imported when used.
"""

from device.sources.base import FrameSource, SourceState
from device.sources.config import SOURCE_CONFIG, SourceConfig
from device.sources.factory import (
    create_source,
    open_source,
    parse_source_config,
    source_config_from_string,
)

__all__ = [
    "SOURCE_CONFIG",
    "FrameSource",
    "SourceConfig",
    "SourceState",
    "create_source",
    "open_source",
    "parse_source_config",
    "source_config_from_string",
]
