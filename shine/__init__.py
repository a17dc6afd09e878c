"""SHINE: sharing the inverse estimate of the forward pass with the backward pass.

Reference implementation of Ramzi et al., "SHINE: SHaring the INverse Estimate from the forward
pass for bi-level optimization and implicit models" (ICLR 2022).

* :mod:`shine.solvers` - quasi-Newton solvers that return their inverse-Jacobian estimate.
* :mod:`shine.backward` - backward strategies (IFT, Jacobian-Free, SHINE, refine, fallback).
* :mod:`shine.deq` - the deep equilibrium layer.
* :mod:`shine.bilevel` - inner problems of hyper-parameter optimization.
"""

__version__ = "0.1.0"
