"""The project's own implementation of the Ultralytics YOLOv5 detection architecture.

Built from the architecture dict that every YOLOv5 checkpoint carries (its ``yaml``, also in
``models/yolov5{n,s,m,l,x}.yaml``), with parameter names identical to upstream's, so that
weights copy across by name.  Nothing here imports the YOLOv5 repository or ``ultralytics``.

Output contract of :class:`YoloV5` (and of its :class:`Detect` head):

- ``model.train()``: a list with one raw map per detection level, each
  ``(batch, anchors_per_level, ny, nx, 5 + nc)`` float, before the sigmoid, as the YOLOv5 loss
  expects it (levels ordered by stride: 8, 16, 32).
- ``model.eval()``: one decoded tensor ``(batch, sum(anchors_per_level * ny * nx), 5 + nc)``,
  rows ``cx, cy, w, h`` in input pixels then objectness and class probabilities (sigmoid
  applied). The score of a detection is ``obj * cls``. This is what the ONNX export carries.

``model.names`` is the list of class names, ``model.stride`` the tensor of level strides.
"""

from toolkit.yolo.blocks import (
    C3,
    SPP,
    SPPF,
    Bottleneck,
    BottleneckCSP,
    Concat,
    Conv,
    Focus,
)
from toolkit.yolo.head import Detect
from toolkit.yolo.model import (
    SUPPORTED_BLOCKS,
    YoloV5,
    build_model,
    config_path,
    load_config,
)

__all__ = [
    "C3",
    "SPP",
    "SPPF",
    "SUPPORTED_BLOCKS",
    "Bottleneck",
    "BottleneckCSP",
    "Concat",
    "Conv",
    "Detect",
    "Focus",
    "YoloV5",
    "build_model",
    "config_path",
    "load_config",
]
