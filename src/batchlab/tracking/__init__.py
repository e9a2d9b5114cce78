"""B_simple tracked during training: one gradient-norm collector, one DDP hook, the EMA.

Below the training loop, so that `train()` can track noise without importing `measure/`.
"""

from batchlab.tracking.tracker import GradientNoiseScaleTracker

__all__ = ["GradientNoiseScaleTracker"]
