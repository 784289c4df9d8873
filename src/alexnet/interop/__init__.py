"""Weights in and out: torchvision, Caffe and the project's checkpoints read as a preset's state
(weights.py, caffe.py), and `alexnet export` to TorchScript, ONNX and safetensors (export.py)."""
