"""Hand-written Triton kernels, one file per operator: lrn.py, pool.py, bias_relu.py, and augment.py (the
training crops). Each is imported on first use by the operator it speeds up (alexnet/model/, or
alexnet/data/augment.py), so that a machine without Triton never imports it."""
