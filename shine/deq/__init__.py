"""Deep equilibrium layers: ``z* = f(z*, x)`` with implicit, pluggable backward passes."""

from shine.deq.flatten import State, StatePacker, zeros_like_state
from shine.deq.layer import DEQLayer

__all__ = ["DEQLayer", "State", "StatePacker", "zeros_like_state"]
