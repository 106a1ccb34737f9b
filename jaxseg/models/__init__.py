"""Models: the nnU-Net / DynUNet 3D U-Net family (with the AgeU-Net head). Pure Flax linen modules;
parameters are plain pytrees. (DeepLesionBrain's compact U-Net is in jaxseg.dlb.model.)"""

from __future__ import annotations

import jax.numpy as jnp

from jaxseg.config import Config
from jaxseg.models.topology import Topology, explicit_topology, plan_topology
from jaxseg.models.unet import UNet3D, UNetOutput

__all__ = ["Topology", "UNet3D", "UNetOutput", "build_model", "explicit_topology",
           "model_topology", "plan_topology"]


def model_topology(cfg: Config, spacing=None) -> Topology:
    """The topology a config asks for: given strides/kernels, else nnU-Net's rule on the patch and spacing."""
    m, d = cfg.model, cfg.data
    if m.strides is not None:
        kernels = m.kernels if m.kernels is not None else ((3, 3, 3),) * len(m.strides)
        return explicit_topology(m.strides, kernels, d.patch_size, features_base=m.features_base,
                                 features_max=m.features_max)
    return plan_topology(d.patch_size, spacing or d.spacing or (1.0, 1.0, 1.0), features_base=m.features_base,
                         features_max=m.features_max, max_stages=m.n_stages)


def build_model(cfg: Config, spacing=None):
    """The Flax module for `cfg.model` (and the patch geometry in `cfg.data`)."""
    m, d = cfg.model, cfg.data
    dtype = jnp.bfloat16 if m.compute_dtype == "bfloat16" else jnp.float32
    return UNet3D(num_classes=d.num_classes, topology=model_topology(cfg, spacing), block=m.block, norm=m.norm,
                  norm_groups=m.norm_groups, act=m.activation, upsample=m.upsample,
                  deep_supervision=m.deep_supervision, num_ds_heads=m.num_ds_heads, age_head=m.age_head,
                  age_offset=m.age_offset, age_scale=m.age_scale,
                  conv_bias=m.conv_bias, dtype=dtype,
                  decoder_block=None if m.decoder_block == "same" else m.decoder_block,
                  decoder_kernels=None if m.decoder_kernels is None else tuple(tuple(k) for k in m.decoder_kernels))
