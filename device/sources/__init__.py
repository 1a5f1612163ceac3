"""Frame sources: Pi camera, USB/V4L2, network streams, video files and image folders."""
