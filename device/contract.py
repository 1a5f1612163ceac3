"""The contract between host and device: what a model file says about itself.

The exporter writes a ``ModelInfo`` as JSON under the ONNX metadata key ``METADATA_KEY``; the
runtime reads it back and needs nothing else to run the model.  For compatibility with other
tools the exporter also writes Ultralytics' plain ``stride`` and ``names`` keys, and
``model_info_from_metadata`` can read a model that carries only those.
"""

from __future__ import annotations

import ast
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device.errors import ToolkitError

METADATA_KEY = "edge_yolo"
SCHEMA_VERSION = 1


class Preprocess(BaseModel):
    """How a BGR uint8 frame becomes the model's input tensor."""

    model_config = ConfigDict(extra="forbid")

    resize: Literal["letterbox"] = "letterbox"
    pad_value: int = Field(114, ge=0, le=255, description="grey level of the letterbox border")
    channel_order: Literal["RGB", "BGR"] = "RGB"
    scale: float = Field(1 / 255, description="multiplier from uint8 to the input range")
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    scaleup: bool = Field(True, description="whether frames smaller than the input are enlarged")


class Quantization(BaseModel):
    """The recipe that produced an INT8 model."""

    model_config = ConfigDict(extra="allow")

    mode: Literal["static", "dynamic"]
    preset: str = ""
    format: str = "QDQ"
    activation_type: str = ""
    weight_type: str = ""
    per_channel: bool = False
    reduce_range: bool = False
    calibrate_method: str = ""
    calibration_samples: int = 0
    seed: int = 0
    float_nodes: list[str] = Field(default_factory=list)
    op_types: list[str] = Field(default_factory=list, description="quantized op types; all")
    float_first_conv: bool = False
    float_head_convs: bool = False
    silu_inputs_trimmed: bool = Field(
        default=False, description="SiLU inputs' ranges start where SiLU goes flat"
    )
    weight_rounding: str = Field(
        default="nearest", description="nearest, or error-feedback (GPTQ) on the same scales"
    )
    float_layers: list[str] = Field(
        default_factory=list, description="layers the fidelity-budget search kept in float"
    )


class Source(BaseModel):
    """Where the weights came from."""

    model_config = ConfigDict(extra="allow")

    file: str = ""
    sha256: str = ""
    kind: str = "yolov5"


class ModelInfo(BaseModel):
    """Everything the runtime needs to know about a YOLOv5 ONNX model."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    task: Literal["detect"] = "detect"
    names: list[str]
    input_name: str = "images"
    output_name: str = "output0"
    input_size: tuple[int, int] = Field(description="(height, width) the model was exported at")
    batch_size: int = 1
    dynamic_batch: bool = False
    dynamic_size: bool = False
    stride: int = Field(32, description="the largest stride; dynamic sizes are multiples of it")
    strides: list[int] = Field(default_factory=lambda: [8, 16, 32])
    output_layout: Literal["xywh_obj_cls"] = Field(
        "xywh_obj_cls",
        description="(batch, anchors, 5 + classes): cx, cy, w, h in input pixels, "
        "objectness and class probabilities after sigmoid",
    )
    preprocess: Preprocess = Field(default_factory=Preprocess)
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    quantization: Quantization | None = None
    opset: int = 0
    source: Source = Field(default_factory=Source)
    tools: dict[str, str] = Field(default_factory=dict)
    created: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_metadata(self) -> dict[str, str]:
        """The ONNX ``metadata_props`` entries for this model, ours and Ultralytics'."""
        return {
            METADATA_KEY: self.model_dump_json(),
            "stride": str(self.stride),
            "names": repr(dict(enumerate(self.names))),
            "imgsz": repr(list(self.input_size)),
            "batch": str(self.batch_size),
            "task": self.task,
        }


def model_info_from_metadata(metadata: dict[str, str], *, model_path: str = "") -> ModelInfo:
    """Read a ModelInfo from ONNX metadata, ours or an Ultralytics export's."""
    where = f" in {model_path}" if model_path else ""
    if METADATA_KEY in metadata:
        try:
            return ModelInfo.model_validate(json.loads(metadata[METADATA_KEY]))
        except (ValueError, ValidationError) as exc:
            raise ToolkitError(
                f"The model metadata{where} under '{METADATA_KEY}' is not valid: {exc}. "
                "Export the model again with 'toolkit export'."
            ) from exc
    if "names" in metadata and "stride" in metadata:
        return _from_ultralytics_metadata(metadata, where)
    raise ToolkitError(
        f"Expected a YOLOv5 ONNX model with metadata (key '{METADATA_KEY}', or Ultralytics' "
        f"'names' and 'stride'), found keys {sorted(metadata) or 'none'}{where}. "
        "Export it with 'toolkit export', which writes the metadata the runtime needs."
    )


def _from_ultralytics_metadata(metadata: dict[str, str], where: str) -> ModelInfo:
    try:
        names_by_index = ast.literal_eval(metadata["names"])
        names = [str(names_by_index[i]) for i in sorted(names_by_index)]
        stride = int(float(metadata["stride"]))
        imgsz = ast.literal_eval(metadata.get("imgsz", "[640, 640]"))
        if isinstance(imgsz, int):
            imgsz = [imgsz, imgsz]
        batch = int(metadata.get("batch", "1"))
    except (ValueError, SyntaxError, KeyError, TypeError) as exc:
        raise ToolkitError(
            f"Could not read Ultralytics metadata{where}: {exc}. Expected 'names' as a dict of "
            "class index to name and 'stride' as a number."
        ) from exc
    return ModelInfo(
        names=names,
        input_size=(int(imgsz[0]), int(imgsz[1])),
        batch_size=batch,
        stride=stride,
        source={"kind": "ultralytics-onnx"},
    )
