"""The smooth ramp both engines blend and shape with."""

from __future__ import annotations

import numpy as np


def smoothstep(edge0, edge1, x):
    """0 below ``edge0``, 1 above ``edge1``, the cubic 3t^2 - 2t^3 between (continuous slope, so
    a mask built from it shows no edge). Works elementwise on arrays; edges may be arrays too."""
    t = np.clip((x - edge0) / np.maximum(edge1 - edge0, 1e-9), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)
