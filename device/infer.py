"""Inference: an onnxruntime session built from the model file and the metadata inside it.

``Detector`` is the whole per-frame path for callers that want it in one call
(``detect(frame)``); the daemon calls its three stages separately so that they can overlap in
different threads.  FP32 and INT8 (QDQ) models run the same way: both take float input.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from device.contract import ModelInfo, model_info_from_metadata
from device.errors import ToolkitError
from device.postprocess import PostprocessConfig, check_class_ids, postprocess
from device.preprocess import LetterboxTransform, preprocess
from device.types import Detection

log = logging.getLogger(__name__)

_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def default_threads() -> int:
    """The CPUs this process may run on (respects taskset and cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SessionConfig:
    """How onnxruntime may use the CPU."""

    intra_op_threads: int = 0  # 0 means one per usable CPU
    inter_op_threads: int = 1
    allow_spinning: bool = False  # spinning threads starve capture on a small board
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads or default_threads()
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spinning = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        return options


def read_model_info(model_path: str | Path) -> ModelInfo:
    """The ModelInfo stored in a model file's metadata, without building a full session."""
    session = open_session(model_path, SessionConfig(intra_op_threads=1))
    return model_info_from_session(session, model_path)


def model_info_from_session(session: ort.InferenceSession, model_path: str | Path) -> ModelInfo:
    metadata = session.get_modelmeta().custom_metadata_map
    return model_info_from_metadata(dict(metadata), model_path=str(model_path))


def open_session(model_path: str | Path, config: SessionConfig) -> ort.InferenceSession:
    path = Path(model_path)
    if not path.is_file():
        raise ToolkitError(
            f"Model file not found: {path}. Pass the .onnx file written by 'toolkit export' "
            "or 'toolkit quantize'."
        )
    try:
        return ort.InferenceSession(
            str(path), sess_options=config.session_options(), providers=list(config.providers)
        )
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise ToolkitError(
            f"onnxruntime {ort.__version__} could not load {path}: {exc}. Check that the file is "
            "a complete ONNX model and that its opset is supported by this onnxruntime."
        ) from exc


def _adopt_graph_names(info: ModelInfo, session: ort.InferenceSession) -> ModelInfo:
    """An Ultralytics export's metadata has no tensor names (older ones call the output
    'output', newer ones 'output0') and may lack imgsz: take them from its only input and
    output."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        return info
    update: dict = {"input_name": inputs[0].name, "output_name": outputs[0].name}
    height, width = inputs[0].shape[2:4]
    if isinstance(height, int) and isinstance(width, int):
        update["input_size"] = (height, width)
    return info.model_copy(update=update)


class Detector:
    """A YOLOv5 ONNX model ready to turn BGR frames into detections."""

    def __init__(
        self,
        model_path: str | Path,
        postprocess_config: PostprocessConfig | None = None,
        session_config: SessionConfig | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.session_config = session_config or SessionConfig()
        self.postprocess_config = postprocess_config or PostprocessConfig()
        self.session = open_session(self.model_path, self.session_config)
        self.info = model_info_from_session(self.session, self.model_path)
        if self.info.source.kind == "ultralytics-onnx":
            self.info = _adopt_graph_names(self.info, self.session)
        self._input_dtype = self._check_session()
        check_class_ids(self.postprocess_config, self.info.num_classes)

        options = self.session.get_session_options()
        log.info(
            "Loaded %s: %s, %d classes, input %s%s, %d intra-op threads, spinning %s",
            self.model_path.name,
            self.info.precision.upper(),
            self.info.num_classes,
            "x".join(map(str, self.info.input_size)),
            " (dynamic)" if self.info.dynamic_size else "",
            options.intra_op_num_threads,
            "on" if self.session_config.allow_spinning else "off",
        )

    @property
    def names(self) -> list[str]:
        return self.info.names

    def _check_session(self) -> type:
        """Check that the graph matches its metadata; return the input dtype it wants."""
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        where = f"{self.model_path}"
        if self.info.input_name not in inputs:
            raise ToolkitError(
                f"The metadata of {where} names input '{self.info.input_name}', but the graph "
                f"has {sorted(inputs)}. Export the model again with 'toolkit export'."
            )
        if self.info.output_name not in outputs:
            raise ToolkitError(
                f"The metadata of {where} names output '{self.info.output_name}', but the graph "
                f"has {sorted(outputs)}. Export the model again with 'toolkit export'."
            )
        model_input = inputs[self.info.input_name]
        if model_input.type not in _INPUT_DTYPES:
            raise ToolkitError(
                f"Expected a float or float16 input in {where}, found {model_input.type}."
            )

        width = outputs[self.info.output_name].shape[-1]
        expected = 5 + self.info.num_classes
        if isinstance(width, int) and width != expected:
            raise ToolkitError(
                f"The output of {where} has {width} columns per row, but its metadata lists "
                f"{self.info.num_classes} classes (expected 5 + classes = {expected}). "
                "The model and its metadata do not belong together; export it again."
            )
        height_dim, width_dim = model_input.shape[2:4]
        fixed = isinstance(height_dim, int) and isinstance(width_dim, int)
        if (
            fixed
            and not self.info.dynamic_size
            and (height_dim, width_dim) != tuple(self.info.input_size)
        ):
            raise ToolkitError(
                f"The input of {where} is {height_dim}x{width_dim}, but its metadata says "
                f"{self.info.input_size[0]}x{self.info.input_size[1]}. Export it again."
            )
        return _INPUT_DTYPES[model_input.type]

    def preprocess(self, frame: np.ndarray) -> tuple[np.ndarray, LetterboxTransform]:
        """A BGR uint8 frame to the input tensor and the letterbox applied."""
        tensor, transform = preprocess(frame, self.info)
        if self._input_dtype is not np.float32:
            tensor = tensor.astype(self._input_dtype)
        return tensor, transform

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        """Run the model on one (1, 3, H, W) tensor; return its (anchors, 5 + classes) rows."""
        batch = self.info.batch_size
        if not self.info.dynamic_batch and batch > 1:
            # A fixed-batch model needs a full batch: repeat the frame, read the first result.
            tensor = np.repeat(tensor, batch, axis=0)
        (output,) = self.session.run([self.info.output_name], {self.info.input_name: tensor})
        return np.asarray(output[0], dtype=np.float32)

    def postprocess(self, rows: np.ndarray, transform: LetterboxTransform) -> list[Detection]:
        return postprocess(rows, transform, self.info.names, self.postprocess_config)

    def detect(self, frame: np.ndarray) -> list[Detection]:
        """Detections in one BGR uint8 (H, W, 3) frame, in its pixels, best score first."""
        tensor, transform = self.preprocess(frame)
        return self.postprocess(self.infer(tensor), transform)

    def close(self) -> None:
        # onnxruntime frees the session with the object; drop our reference now.
        self.session = None

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
