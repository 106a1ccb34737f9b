"""jaxseg: 3D brain MRI segmentation in JAX/Flax."""

__version__ = "0.1.0"
