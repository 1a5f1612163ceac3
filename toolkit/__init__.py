"""Host side: load YOLOv5 checkpoints, export, quantize, prove, bundle and deploy."""

__version__ = "0.1.0"
