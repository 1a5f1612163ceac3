"""An INT8 (QDQ) model runs through the same Detector path as its FP32 source."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from device.contract import METADATA_KEY, ModelInfo
from device.infer import Detector, SessionConfig
from device.preprocess import preprocess


@pytest.fixture(scope="module")
def int8_model(tiny_onnx, tmp_path_factory):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp32 = Detector(tiny_onnx, session_config=SessionConfig(intra_op_threads=1))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(4)]

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({fp32.info.input_name: preprocess(f, fp32.info)[0]} for f in frames)

        def get_next(self):
            return next(self.feeds, None)

    output = tmp_path_factory.mktemp("int8") / "tiny-int8.onnx"
    # Only Conv is quantized: the Detect tail mixes pixels and probabilities and stays float.
    quantize_static(
        str(tiny_onnx),
        str(output),
        Frames(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv"],
    )
    model = onnx.load(str(output))
    info = ModelInfo.model_validate_json(
        {p.key: p.value for p in model.metadata_props}[METADATA_KEY]
    )
    del model.metadata_props[:]
    for key, value in info.model_copy(update={"precision": "int8"}).to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(output))
    return output


def test_int8_and_fp32_models_take_the_same_path(tiny_onnx, int8_model):
    config = SessionConfig(intra_op_threads=1)
    fp32 = Detector(tiny_onnx, session_config=config)
    int8 = Detector(int8_model, session_config=config)
    frame = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)

    assert int8.info.precision == "int8"
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8_model)).graph.node)
    tensor, transform = int8.preprocess(frame)
    rows_int8 = int8.infer(tensor)
    rows_fp32 = fp32.infer(fp32.preprocess(frame)[0])

    assert rows_int8.shape == rows_fp32.shape and rows_int8.dtype == np.float32
    # Same layout: box centres follow the anchor grid in both.
    assert np.corrcoef(rows_int8[:, 0], rows_fp32[:, 0])[0, 1] > 0.99
    assert np.corrcoef(rows_int8[:, 1], rows_fp32[:, 1])[0, 1] > 0.99
    assert isinstance(int8.postprocess(rows_int8, transform), list)
