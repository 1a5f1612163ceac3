"""Shared fixtures: where the real data lives, and how tests skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REALDATA = Path(os.environ.get("EDGE_REALDATA", REPO_ROOT.parent / "shared" / "realdata"))


def realdata_file(relative: str) -> Path:
    """A file under ../shared/realdata, or a skip saying it is absent."""
    path = REALDATA / relative
    if not path.exists():
        pytest.skip(f"real data not present: {path} (see ../shared/realdata/SOURCES.md)")
    return path


@pytest.fixture
def yolov5n_pt() -> Path:
    return realdata_file("models/yolov5n.pt")


@pytest.fixture
def bus_jpg() -> Path:
    return realdata_file("images/bus.jpg")


@pytest.fixture
def zidane_jpg() -> Path:
    return realdata_file("images/zidane.jpg")


@pytest.fixture(scope="session")
def mqtt_broker(tmp_path_factory):
    """A real mosquitto on 127.0.0.1 and a free port, shared by the whole session.

    Tests sharing it must use their own topic prefix (see ``mqtt_prefix``) and must not stop it.
    """
    from tests.broker import MosquittoBroker, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def private_mqtt_broker(tmp_path):
    """A mosquitto of the test's own, which it may stop and start again on the same port."""
    from tests.broker import MosquittoBroker, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = MosquittoBroker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def mqtt_prefix(request) -> str:
    """A topic prefix no other test uses, so retained messages never leak between tests."""
    import uuid

    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in request.node.name[:40])
    return f"test/{name}-{uuid.uuid4().hex[:8]}"


TINY_CLASSES = ["circle", "square", "triangle"]


@pytest.fixture(scope="session")
def tiny_pt(tmp_path_factory) -> Path:
    """A small random-weight YOLOv5 (3 classes, width 0.125) saved as an Ultralytics-style
    fp16 checkpoint. Needs no real data."""
    import torch

    from toolkit.checkpoint import save_ultralytics_checkpoint
    from toolkit.yolo import build_model, load_config

    torch.manual_seed(0)
    cfg = load_config("yolov5n")
    cfg["width_multiple"] = 0.125
    model = build_model(cfg, nc=len(TINY_CLASSES), names=TINY_CLASSES)
    return save_ultralytics_checkpoint(model, tmp_path_factory.mktemp("tiny") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_pt, tmp_path_factory) -> Path:
    """``tiny_pt`` exported to a verified fp32 ONNX at 320x320, batch 1 (no real data)."""
    from toolkit.export import export_model

    return export_model(tiny_pt, tmp_path_factory.mktemp("tiny-onnx") / "tiny.onnx", imgsz=320)


@pytest.fixture(scope="session")
def yolov5n_onnx(tmp_path_factory) -> Path:
    """The real yolov5n.pt exported to a verified fp32 ONNX at 640x640 (checked on bus.jpg);
    skipped without ../shared/realdata."""
    from toolkit.export import export_model

    weights = realdata_file("models/yolov5n.pt")
    image = realdata_file("images/bus.jpg")
    output = tmp_path_factory.mktemp("yolov5n-onnx") / "yolov5n.onnx"
    return export_model(weights, output, imgsz=640, verify_image=image)
