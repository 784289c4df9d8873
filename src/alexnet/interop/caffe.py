"""Caffe's files, read without Caffe: a `.caffemodel` (a binary protobuf NetParameter), a `.binaryproto`
mean image (a BlobProto) and the NumPy port of bvlc_alexnet (`bvlc_alexnet.npy`).

The protobuf message classes are built at run time from the few fields of caffe.proto read here
(`protobuf` package only: no Caffe, no protoc). Field numbers are caffe.proto's; fields not declared
here are kept as unknown fields and ignored.

Both weight readers return {layer name: [weights, biases]} in Caffe's own layout: convolutions
(out, in / groups, kH, kW), inner products (out, in), input channels of conv1 in BGR order.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

# V1LayerParameter.LayerType values (caffe.proto), the ones a classification net uses. Layers are
# matched by name, so a type missing here only means it is not listed when writing a file.
V1_LAYER_TYPES = {
    "NONE": 0,
    "ACCURACY": 1,
    "CONVOLUTION": 4,
    "DATA": 5,
    "DROPOUT": 6,
    "INNER_PRODUCT": 14,
    "LRN": 15,
    "POOLING": 17,
    "RELU": 18,
    "SOFTMAX": 20,
    "SOFTMAX_LOSS": 21,
}

# (message, [(field, number, type, label)]): the subset of caffe.proto this module needs.
# A type starting with "." names a message or enum; "packed" is a packed repeated scalar.
_SCHEMA = (
    ("BlobShape", [("dim", 1, "int64", "packed")]),
    (
        "BlobProto",
        [
            ("num", 1, "int32", "optional"),  # num, channels, height, width: the legacy 4-D shape
            ("channels", 2, "int32", "optional"),
            ("height", 3, "int32", "optional"),
            ("width", 4, "int32", "optional"),
            ("data", 5, "float", "packed"),
            ("shape", 7, ".caffe.BlobShape", "optional"),
            ("double_data", 8, "double", "packed"),
        ],
    ),
    (
        "LayerParameter",
        [
            ("name", 1, "string", "optional"),
            ("type", 2, "string", "optional"),
            ("blobs", 7, ".caffe.BlobProto", "repeated"),
        ],
    ),
    (
        "V1LayerParameter",
        [
            ("name", 4, "string", "optional"),
            ("type", 5, ".caffe.V1LayerParameter.LayerType", "optional"),
            ("blobs", 6, ".caffe.BlobProto", "repeated"),
        ],
    ),
    (
        "NetParameter",
        [
            ("name", 1, "string", "optional"),
            ("layers", 2, ".caffe.V1LayerParameter", "repeated"),  # the old (V1) form, as in bvlc_alexnet
            ("layer", 100, ".caffe.LayerParameter", "repeated"),
        ],
    ),
)


@functools.cache
def messages() -> dict[str, Any]:
    """The message classes by name: BlobShape, BlobProto, LayerParameter, V1LayerParameter, NetParameter."""
    try:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    except ImportError as e:
        raise UserError("reading Caffe files needs protobuf: pip install 'alexnet[caffe]'") from e
    fd = descriptor_pb2.FieldDescriptorProto
    scalar = {"int32": fd.TYPE_INT32, "int64": fd.TYPE_INT64, "float": fd.TYPE_FLOAT, "double": fd.TYPE_DOUBLE}
    scalar["string"] = fd.TYPE_STRING
    f = descriptor_pb2.FileDescriptorProto(name="alexnet_caffe_subset.proto", package="caffe", syntax="proto2")
    for name, fields in _SCHEMA:
        m = f.message_type.add(name=name)
        for field, number, kind, label in fields:
            spec = m.field.add(name=field, number=number)
            spec.label = fd.LABEL_OPTIONAL if label == "optional" else fd.LABEL_REPEATED
            if kind in scalar:
                spec.type = scalar[kind]
            else:
                spec.type_name = kind
                spec.type = fd.TYPE_ENUM if kind.endswith("LayerType") else fd.TYPE_MESSAGE
            if label == "packed":
                spec.options.packed = True
        if name == "V1LayerParameter":
            enum = m.enum_type.add(name="LayerType")
            for value_name, number in V1_LAYER_TYPES.items():
                enum.value.add(name=value_name, number=number)
    pool = descriptor_pool.DescriptorPool()  # our own pool: no clash with a real caffe_pb2
    pool.Add(f)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}")) for name, _ in _SCHEMA}


def blob_array(blob: Any, where: str) -> np.ndarray:
    """A BlobProto's values shaped by its `shape`, or by the legacy num/channels/height/width."""
    dims = list(blob.shape.dim) if blob.HasField("shape") else [blob.num, blob.channels, blob.height, blob.width]
    values = np.asarray(blob.data, dtype=np.float32) if len(blob.data) else np.asarray(blob.double_data)
    if values.size != math.prod(dims):
        raise UserError(f"{where}: a blob of shape {dims} holds {values.size} values")
    return values.astype(np.float32).reshape(dims)


def _parse(path: str | Path, message: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    cls = messages()[message]
    try:
        return cls.FromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: not a file of that kind
        raise UserError(f"{path} is not a Caffe {message} file ({type(e).__name__})") from e


def read_caffemodel(path: str | Path) -> dict[str, list[np.ndarray]]:
    """{layer name: its blobs} for every layer with blobs, from the new `layer` or the old V1 `layers` form."""
    net = _parse(path, "NetParameter")
    layers = {}
    for layer in [*net.layers, *net.layer]:  # a file has one form or the other; the new one wins if both
        if len(layer.blobs):
            layers[layer.name] = [blob_array(b, f"{path}: layer {layer.name}") for b in layer.blobs]
    if not layers:
        raise UserError(f"{path} holds no layer with weights: not a trained .caffemodel")
    return layers


def read_caffe_mean(path: str | Path) -> np.ndarray:
    """Caffe's mean image, (3, H, W), BGR, 0-255: a .binaryproto (BlobProto) or a .npy array."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            mean = np.load(path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read mean file {path}: {e}") from e
    else:
        mean = blob_array(_parse(path, "BlobProto"), str(path))
    mean = np.asarray(mean, dtype=np.float32)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3 or mean.shape[0] != 3:
        raise UserError(f"mean file {path} holds shape {list(mean.shape)}, not a 3 x H x W image")
    return mean


def read_caffe_npy(path: str | Path) -> dict[str, list[np.ndarray]]:
    """The NumPy port of bvlc_alexnet (as in Guerzhoy's TensorFlow AlexNet, made by caffe-tensorflow):
    a pickled dict {layer: [weights, biases]} (or {layer: {"weights": w, "biases": b}}) in TensorFlow's
    layout, turned back into Caffe's layout here.

    TensorFlow's layout: convolutions (kH, kW, in / groups, out), inner products (in, out), and fc6's
    rows in the (H, W, C) order of TensorFlow's NHWC flatten of pool5, where Caffe flattens (C, H, W).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        data = np.load(path, allow_pickle=True, encoding="latin1").item()
    except Exception as e:  # noqa: BLE001 - not a pickled dict saved by numpy
        raise UserError(f"{path} is not a NumPy dictionary of layers ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a NumPy dictionary of layers")
    layers = {}
    for name, params in data.items():
        if isinstance(params, dict):
            params = [params.get("weights"), params.get("biases")]
        try:
            w, b = (np.asarray(p, dtype=np.float32) for p in params)
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: layer {name} is not [weights, biases]") from e
        if w.ndim == 4:
            w = w.transpose(3, 2, 0, 1)  # (kH, kW, in, out) -> (out, in, kH, kW)
        elif w.ndim == 2:
            w = w.T  # (in, out) -> (out, in)
        layers[name] = [np.ascontiguousarray(w), b]
    if "fc6" in layers and "conv5" in layers:
        layers["fc6"][0] = _hwc_rows_to_chw(layers["fc6"][0], channels=layers["conv5"][0].shape[0], where=str(path))
    return layers


def _hwc_rows_to_chw(w: np.ndarray, channels: int, where: str) -> np.ndarray:
    """fc6 weights (out, H*W*C) with inputs in (H, W, C) order -> (out, C*H*W), Caffe's (and PyTorch's) order."""
    side = math.isqrt(w.shape[1] // channels)
    if side * side * channels != w.shape[1]:
        raise UserError(f"{where}: fc6 has {w.shape[1]} inputs, not a square map of conv5's {channels} channels")
    return w.reshape(-1, side, side, channels).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)
