"""Each preset's default recipe learns on real photographs: the test that fails on the collapse.

The paper's initialisation (N(0, 0.01), biases of 1) blew up in its first steps and then stayed at
ln(10), the fully connected ReLUs dead (docs/learning.md); every GPU run on record ended there. Here each
preset trains with its own defaults (initialisation, input scale, learning rate, schedule, augmentation:
nothing but the budget is set) on imagenette-ci's 400 training images, and must end clearly below chance.
The full comparison with a reference recipe is benchmarks/converge.py, not a test.
"""

import json
import math

import pytest

from alexnet.train import train
from alexnet.train.config import TrainConfig

# (epochs, batch size) per preset: 65 steps. The seed preset is not here: no initialisation is known to
# train it yet (its own stays at chance, He-normal's loss is NaN by step 10; docs/learning.md).
BUDGET = {"paper": (5, 32), "torchvision": (5, 32)}


@pytest.mark.long
@pytest.mark.parametrize("preset", list(BUDGET))
def test_each_presets_default_recipe_learns_on_real_images(preset, imagenette_ci, tmp_path):
    """Training loss clearly below ln 10 (a collapsed run stays within 1% of it; 3% is the flat-loss line),
    and on the 100 validation photographs a top-1 error below chance's 0.9 (a collapsed run predicts one
    class: exactly 0.9; a guessing one scores within 0.03 of it, one standard error)."""
    epochs, batch = BUDGET[preset]
    cfg = TrainConfig(
        data=str(imagenette_ci),
        run_dir=str(tmp_path / "run"),
        preset=preset,
        epochs=epochs,
        batch_size=batch,
        workers=1,
    )
    assert cfg.resolved().init == TrainConfig(preset=preset).resolved().init  # the preset's own initialisation
    run = train(cfg, progress=False)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((run / "eval.json").read_text())
    print(preset, json.dumps(metrics, indent=1), final)
    assert metrics[-1]["train_loss"] < 0.95 * math.log(10), metrics
    assert final["center"]["top1_err"] < 0.85 and final["ten_crop"]["top1_err"] < 0.85, final
