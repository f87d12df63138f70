"""Tiny random insightface model packs for tests: real ONNX graphs that insightface's model zoo routes to
its real SCRFD detector and ArcFace recognition classes, small enough to run in milliseconds.

- `tiny_scrfd(path)`: an SCRFD-format detector with 9 outputs (scores, box distances and 5 keypoint
  offsets at strides 8 / 16 / 32, two anchors per cell, as SCRFD-10G-with-keypoints exports them), on
  a dynamic [1, 3, H, W] input. Each stride's cells are the input average-pooled over the stride, then
  a random 1 x 1 convolution. Only stride 32 can fire: its first anchor scores sigmoid(gain * (channel
  mean - 0.3)) (bright cells are "faces"); the others are biased far below the 0.5 threshold. Boxes
  are about 4 strides wide around the cell centre (neighbours overlap enough for NMS to drop them)
  and the keypoints sit where eyes, nose and mouth corners would, each moved a little by the pixels,
  so every image gives its own detections.
- `tiny_arcface(path)`: input [N, 3, 112, 112] -> average pool 8 -> flatten -> random linear -> [N, 512].
- `tiny_pack(root, name)`: both in root/models/<name>/, the layout `FaceAnalysis(root=..., name=...)` reads.
- `decode_tiny_scrfd`: the detector's boxes and keypoints decoded independently of insightface
  (letterbox, onnxruntime, anchors, threshold, NMS), for tests that check the real path against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STRIDES = (8, 16, 32)
ANCHORS = 2
# Keypoint offsets from the cell centre in strides: left eye, right eye, nose, left and right mouth corner.
KPS_PATTERN = np.array([[-0.35, -0.25], [0.35, -0.25], [0.0, 0.05], [-0.3, 0.35], [0.3, 0.35]], np.float32)
SCORE_GAIN = 12.0
SCORE_MEAN = 0.3  # a cell whose mean normalised value (pixels (x - 127.5) / 128) exceeds this scores over 0.5


def _conv(inputs, weight_name, bias_name, output):
    from onnx import helper

    return helper.make_node("Conv", [inputs, weight_name, bias_name], [output], kernel_shape=[1, 1])


def _flatten_head(helper, nodes, inputs, tag, shape_name):
    """[1, A*C, h, w] -> [h*w*A, C]: cells first, then anchors, as SCRFD's exported heads lay them out."""
    nodes.append(helper.make_node("Transpose", [inputs], [f"{tag}_t"], perm=[0, 2, 3, 1]))
    nodes.append(helper.make_node("Reshape", [f"{tag}_t", shape_name], [tag]))


def tiny_scrfd(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny SCRFD-format detector to `path` (see the module doc)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    outputs = {"score": [], "bbox": [], "kps": []}
    for c, name in [(1, "score"), (4, "bbox"), (10, "kps")]:
        inits.append(numpy_helper.from_array(np.array([-1, c], np.int64), f"shape_{name}"))
    for stride in STRIDES:
        pooled = f"pool{stride}"
        nodes.append(helper.make_node("AveragePool", ["input.1"], [pooled], kernel_shape=[stride, stride],
                                      strides=[stride, stride]))
        # Scores: anchor 0 of stride 32 follows the cell's brightness; every other anchor stays near 0.
        w = rng.normal(0, 0.05, (ANCHORS, 3, 1, 1)).astype(np.float32)
        b = np.full(ANCHORS, -20.0, np.float32)
        if stride == 32:
            w[0] = SCORE_GAIN / 3
            b[0] = -SCORE_GAIN * SCORE_MEAN
        inits += [numpy_helper.from_array(w, f"ws{stride}"), numpy_helper.from_array(b, f"bs{stride}")]
        nodes.append(_conv(pooled, f"ws{stride}", f"bs{stride}", f"logit{stride}"))
        nodes.append(helper.make_node("Sigmoid", [f"logit{stride}"], [f"sig{stride}"]))
        _flatten_head(helper, nodes, f"sig{stride}", f"score_{stride}", "shape_score")
        # Box distances (left, top, right, bottom) in strides: about 2 each, moved a little by the pixels.
        w = rng.normal(0, 0.1, (ANCHORS * 4, 3, 1, 1)).astype(np.float32)
        b = (2.0 + rng.uniform(-0.1, 0.1, ANCHORS * 4)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"wb{stride}"), numpy_helper.from_array(b, f"bb{stride}")]
        nodes.append(_conv(pooled, f"wb{stride}", f"bb{stride}", f"box{stride}"))
        _flatten_head(helper, nodes, f"box{stride}", f"bbox_{stride}", "shape_bbox")
        # Keypoint offsets: the face pattern, moved a little by the pixels.
        w = rng.normal(0, 0.03, (ANCHORS * 10, 3, 1, 1)).astype(np.float32)
        b = np.tile(KPS_PATTERN.reshape(-1), ANCHORS).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"wk{stride}"), numpy_helper.from_array(b, f"bk{stride}")]
        nodes.append(_conv(pooled, f"wk{stride}", f"bk{stride}", f"kp{stride}"))
        _flatten_head(helper, nodes, f"kp{stride}", f"kps_{stride}", "shape_kps")
        for name in outputs:
            outputs[name].append(f"{name}_{stride}")
    widths = {"score": 1, "bbox": 4, "kps": 10}
    graph_outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [f"n_{o}", widths[name]])
                     for name in ("score", "bbox", "kps") for o in outputs[name]]
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
                              graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def tiny_arcface(path: str | Path, seed: int = 1, dim: int = 512) -> Path:
    """Write the tiny ArcFace-format recognition model to `path` (see the module doc)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 1.0, (3 * 14 * 14, dim)).astype(np.float32)
    bias = rng.normal(0, 0.1, dim).astype(np.float32)
    # Node names avoid "Sub" / "Mul" prefixes: insightface then normalises with mean 127.5 and std 127.5,
    # as for the buffalo_l / antelopev2 recognition models.
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8],
                              name="pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["embedding"], name="fc")]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
                              [numpy_helper.from_array(weight, "fc_w"), numpy_helper.from_array(bias, "fc_b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def tiny_pack(root: str | Path, name: str = "buffalo_l") -> Path:
    """root/models/<name>/{det_tiny.onnx, w_tiny.onnx} -> the pack folder."""
    folder = Path(root) / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    tiny_scrfd(folder / "det_tiny.onnx")
    tiny_arcface(folder / "w_tiny.onnx")
    return folder


def _nms(dets: np.ndarray, thresh: float = 0.4) -> list[int]:
    """Greedy NMS over [N, 5] (x0, y0, x1, y1, score), rows already sorted by score; areas with +1 pixel."""
    keep: list[int] = []
    remaining = list(range(len(dets)))
    area = lambda d: (d[2] - d[0] + 1) * (d[3] - d[1] + 1)  # noqa: E731
    while remaining:
        i = remaining.pop(0)
        keep.append(i)
        survivors = []
        for j in remaining:
            w = max(0.0, min(dets[i, 2], dets[j, 2]) - max(dets[i, 0], dets[j, 0]) + 1)
            h = max(0.0, min(dets[i, 3], dets[j, 3]) - max(dets[i, 1], dets[j, 1]) + 1)
            inter = w * h
            if inter / (area(dets[i]) + area(dets[j]) - inter) <= thresh:
                survivors.append(j)
        remaining = survivors
    return keep


def decode_tiny_scrfd(det_path: str | Path, image_bgr: np.ndarray, det_size: int = 320, thresh: float = 0.5):
    """The detector's faces in a BGR image, computed without insightface: the image resized into the top
    left of a det_size square keeping its aspect, RGB scaled by (x - 127.5) / 128, the ONNX outputs
    decoded around the anchor centres (distance x stride), thresholded, sorted, NMS at IoU 0.4.

    Returns (boxes [N, 5] with scores, kps [N, 5, 2]) in image pixels.
    """
    import cv2
    import onnxruntime

    h, w = image_bgr.shape[:2]
    if h / w > 1.0:
        new_h, new_w = det_size, int(det_size / (h / w))
    else:
        new_w, new_h = det_size, int(det_size * (h / w))
    scale = new_h / h
    canvas = np.zeros((det_size, det_size, 3), np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image_bgr, (new_w, new_h))
    blob = ((canvas[..., ::-1].astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
    session = onnxruntime.InferenceSession(str(det_path), providers=["CPUExecutionProvider"])
    outs = session.run(None, {"input.1": np.ascontiguousarray(blob)})
    rows, points = [], []
    for k, stride in enumerate(STRIDES):
        cells = det_size // stride
        ys, xs = np.mgrid[:cells, :cells]
        centres = np.repeat(np.stack([xs, ys], -1).reshape(-1, 2) * stride, ANCHORS, axis=0).astype(np.float32)
        scores, dist, offs = outs[k][:, 0], outs[3 + k] * stride, outs[6 + k] * stride
        for i in np.nonzero(scores >= thresh)[0]:
            cx, cy = centres[i]
            rows.append([cx - dist[i, 0], cy - dist[i, 1], cx + dist[i, 2], cy + dist[i, 3], scores[i]])
            points.append(centres[i] + offs[i].reshape(5, 2))
    if not rows:
        return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
    dets = np.array(rows, np.float32)
    dets[:, :4] /= scale
    kps = np.array(points, np.float32) / scale
    order = np.argsort(-dets[:, 4], kind="stable")
    dets, kps = dets[order], kps[order]
    keep = _nms(dets)
    return dets[keep], kps[keep]
