"""The harness: what runs the paper's experiments around the numerics.

* :mod:`shine.harness.runtime` - the run contract: run directories, metrics, checkpoints,
  locks, provenance, seeding, devices, distributed launch, the wandb mirror, config schemas;
* :mod:`shine.harness.training` - the shared trainer (timing, logging, checkpoints, divergence)
  and the classification stepper;
* :mod:`shine.harness.tasks` - one class per kind of experiment (image classification with a
  DEQ, bi-level hyper-parameter optimisation, timing, contractivity, inversion studies), built
  by ``train.py`` from ``configs/task/``.

The numerics (:mod:`shine.solvers`, :mod:`shine.backward`, :mod:`shine.deq`,
:mod:`shine.bilevel`, :mod:`shine.models`) import nothing from here (``tests/test_layout.py``).
Plain PyTorch and Python, no Hydra import: ``train.py`` is the Hydra edge.
"""
