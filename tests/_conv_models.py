"""Outputs and parameter/input gradients of the models' convolutions at tiny sizes, for comparing XLA's
CPU lowerings in two processes (tests/test_conv_lowering.py). Run as a script: writes an .npz."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxseg.dlb.model import CompactUNet
from jaxseg.models import UNet3D, plan_topology


def cases():
    """(name, model, input shape, output picker): the nnU-Net topologies (isotropic; anisotropic with
    (1,2,2) strides and (1,3,3) kernels), residual blocks, the AgeU-Net head, the DLB compact U-Net."""
    iso = plan_topology((16, 16, 16), (1.0, 1.0, 1.0), features_base=4, features_max=16)
    aniso = plan_topology((8, 32, 32), (3.0, 1.0, 1.0), features_base=4, features_max=16)
    assert (1, 2, 2) in aniso.strides and (1, 3, 3) in aniso.kernels, aniso
    seg = lambda out: out.seg  # noqa: E731
    return [
        ("unet_iso", UNet3D(num_classes=3, topology=iso), (1, 16, 16, 16, 2), seg),
        ("unet_aniso_res", UNet3D(num_classes=3, topology=aniso, block="residual"), (1, 8, 32, 32, 1), seg),
        ("age_unet", UNet3D(num_classes=3, topology=iso, age_head=True), (2, 16, 16, 16, 1),
         lambda out: [*out.seg, out.age]),
        ("dlb_compact", CompactUNet(num_classes=2, features=(4, 4, 8, 8, 16), groups=2), (1, 16, 16, 16, 2),
         lambda out: [out]),
    ]


def compute() -> dict[str, np.ndarray]:
    res = {}
    for name, model, shape, pick in cases():
        x = jax.random.normal(jax.random.key(0), shape)
        params = model.init(jax.random.key(1), x)["params"]

        def loss(p, x, model=model, pick=pick):
            outs = pick(model.apply({"params": p}, x))
            return sum(jnp.mean(jnp.sin(o)) for o in outs), outs

        (_, outs), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
        for i, o in enumerate(outs):
            res[f"{name}/out{i}"] = np.asarray(o)
        res[f"{name}/grad_x"] = np.asarray(gx)
        for path, g in jax.tree_util.tree_flatten_with_path(gp)[0]:
            res[f"{name}/grad/{jax.tree_util.keystr(path)}"] = np.asarray(g)
    return res


if __name__ == "__main__":
    np.savez(sys.argv[1], **compute())
