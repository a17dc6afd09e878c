"""Implicit models trained with the DEQ layer: the Multiscale DEQ image classifier.

* :class:`MDEQConfig` - architecture hyper-parameters, with the paper's presets
  (``cifar_large``, ``imagenet_small``) and a ``tiny`` one for tests and CPU runs.
* :class:`MDEQFunction` - the multiscale equilibrium function ``f(z, x)``.
* :class:`MDEQClassifier` - stem, DEQ core (any solver / backward strategy), head.
"""

from shine.models.mdeq import MDEQClassifier, MDEQConfig, MDEQFunction, init_weights

__all__ = ["MDEQClassifier", "MDEQConfig", "MDEQFunction", "init_weights"]
