"""jaxseg: 3D brain MRI segmentation in JAX/Flax."""

from jaxseg import runtime as _runtime

__version__ = "0.1.0"

_runtime.configure()
