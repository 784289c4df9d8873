"""Images in: image folders and their loader (folders.py), `alexnet prepare` (prepare.py) and the loader
of a prepared dataset (prepared.py), the paper's augmentation and test crops (augment.py), and the
synthetic demo set (synthetic.py)."""
