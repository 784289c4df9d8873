"""Looking at a trained network: the test protocol (evaluate.py), features of a layer (features.py),
figures (figures.py) and the speed of a training step (bench.py)."""
