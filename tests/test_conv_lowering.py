"""The CPU convolution path: strided convolutions through space-to-depth equal XLA's native strided
convolution; no training-step gradient holds a convolution with lhs dilation (XLA:CPU's slow case); and
the oneDNN convolutions that jaxseg turns on give XLA's default numbers for every model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxseg import runtime
from jaxseg.models import UNet3D, plan_topology
from jaxseg.models.layers import STRIDED_CONV, conv3d

HERE = Path(__file__).parent


def native(x, w, strides, padding="same"):
    pad = [(k // 2, k // 2) if padding == "same" else (0, 0) for k in w.shape[:3]]
    return jax.lax.conv_general_dilated(x, w, strides, pad, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


# every per-axis (kernel, stride) pair the topology planner produces (kernel 1 or 3, stride 1 or 2, mixed
# across axes), plus pairs it does not (kernel 2 and 5, stride 3, kernel < stride) to show the rule is general
PAIRS = [((3, 3, 3), (2, 2, 2)), ((1, 3, 3), (1, 2, 2)), ((3, 3, 1), (2, 2, 1)), ((3, 1, 1), (2, 1, 1)),
         ((3, 3, 3), (2, 2, 1)), ((1, 1, 1), (2, 2, 2)), ((2, 2, 2), (2, 2, 2)), ((5, 3, 2), (3, 2, 2)),
         ((3, 3, 3), (1, 1, 1))]


@pytest.mark.parametrize("kernel,strides", PAIRS)
@pytest.mark.parametrize("size", [(8, 10, 6), (9, 7, 11)])  # even and odd sizes
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_space_to_depth_equals_native_values_and_gradients(kernel, strides, size, padding):
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, *size, 3))
    w = jax.random.normal(kw, (*kernel, 3, 4))
    ref_y, ref_vjp = jax.vjp(lambda x, w: native(x, w, strides, padding), x, w)
    cot = jax.random.normal(kc, ref_y.shape)
    ref = (ref_y, *ref_vjp(cot))
    for impl in ("space_to_depth", "space_to_depth_grad", "native"):
        y, vjp = jax.vjp(lambda x, w, impl=impl: conv3d(x, w, strides, padding, strided=impl), x, w)
        for a, b in zip((y, *vjp(cot)), ref):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=impl)


LHS_DILATED = re.compile(r"lhs_dilat\w*\s*=\s*(?:array<i64:\s*)?\[?([\d,\s]+)")


def lhs_dilated_convs(lowered_text: str) -> list[str]:
    """Lines of a lowered StableHLO module whose convolution dilates its input."""
    out = []
    for line in lowered_text.splitlines():
        if "convolution" in line:
            m = LHS_DILATED.search(line)
            if m and any(int(v) != 1 for v in re.findall(r"\d+", m.group(1))):
                out.append(line.strip())
    return out


def count_convs(text: str) -> int:
    return sum("stablehlo.convolution" in line for line in text.splitlines())


def test_native_strided_gradient_is_detected():
    """The detector's negative control: XLA differentiates a native strided conv with lhs dilation."""
    x, w = jnp.ones((1, 8, 8, 8, 2)), jnp.ones((3, 3, 3, 2, 4))
    grad = jax.grad(lambda x: jnp.sum(conv3d(x, w, (2, 2, 2), strided="native")))
    assert lhs_dilated_convs(jax.jit(grad).lower(x).as_text())
    for impl in ("space_to_depth", "space_to_depth_grad"):
        grad = jax.grad(lambda x, impl=impl: jnp.sum(conv3d(x, w, (2, 2, 2), strided=impl)))
        assert not lhs_dilated_convs(jax.jit(grad).lower(x).as_text()), impl


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_unet_training_step_has_no_lhs_dilated_convolution(block):
    topo = plan_topology((8, 32, 32), (3.0, 1.0, 1.0), features_base=4, features_max=16)
    model = UNet3D(num_classes=3, topology=topo, block=block)
    x = jnp.zeros((2, 8, 32, 32, 1))
    y = jnp.zeros((2, 8, 32, 32), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    opt = optax.sgd(1e-2, momentum=0.99, nesterov=True)

    def step(p, s, x, y):
        def loss(p):
            return sum(optax.softmax_cross_entropy_with_integer_labels(
                jax.image.resize(o, (*y.shape, o.shape[-1]), "nearest"), y).mean()
                for o in model.apply({"params": p}, x).seg)
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    assert jax.default_backend() == "cpu" and STRIDED_CONV["cpu"] == "space_to_depth_grad"
    text = jax.jit(step).lower(params, jax.eval_shape(opt.init, params), x, y).as_text()
    assert count_convs(text) > 3 * topo.n_stages  # forward and both gradients are in there
    assert lhs_dilated_convs(text) == []


@pytest.mark.slow
def test_onednn_convolutions_equal_default_lowering(tmp_path):
    """Outputs and gradients of every model, this process (oneDNN, set by jaxseg) against a process with
    XLA's default CPU convolutions."""
    assert runtime.onednn_requested() and runtime.record()["onednn_convolutions"]
    x, w = jnp.ones((1, 8, 8, 8, 2)), jnp.ones((3, 3, 3, 2, 4))
    assert "__onednn$convolution" in jax.jit(conv3d).lower(x, w).compile().as_text()

    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "onednn" not in f)
    env = dict(os.environ, XLA_FLAGS=flags, JAXSEG_ONEDNN="0", PYTHONPATH=os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]))
    code = ("import sys, jax, jax.numpy as jnp; from jaxseg.models.layers import conv3d; "
            "t = jax.jit(conv3d).lower(jnp.ones((1, 8, 8, 8, 2)), jnp.ones((3, 3, 3, 2, 4))).compile().as_text(); "
            "assert 'onednn' not in t, 'oneDNN still on'; "
            "import _conv_models; _conv_models.np.savez(sys.argv[1], **_conv_models.compute())")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ref.npz")], env=env, check=True, timeout=600)
    ref = dict(np.load(tmp_path / "ref.npz"))

    sys.path.insert(0, str(HERE))
    import _conv_models

    got = _conv_models.compute()
    assert set(got) == set(ref) and len(got) > 50
    for k in sorted(got):
        scale = max(1e-3, float(np.abs(ref[k]).max()))
        err = float(np.abs(got[k] - ref[k]).max())
        assert err <= 1e-4 * scale + 1e-6, (k, err, scale)


def test_one_voxel_input_is_the_centre_tap():
    kx, kw, kc = jax.random.split(jax.random.key(3), 3)
    x, w = jax.random.normal(kx, (2, 1, 1, 1, 3)), jax.random.normal(kw, (3, 3, 1, 3, 5))
    y, vjp = jax.vjp(lambda x, w: conv3d(x, w), x, w)
    ref_y, ref_vjp = jax.vjp(lambda x, w: native(x, w, (1, 1, 1)), x, w)
    cot = jax.random.normal(kc, y.shape)
    for a, b in zip((y, *vjp(cot)), (ref_y, *ref_vjp(cot))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_vmapped_gradient_through_a_one_voxel_bottleneck_compiles():
    """A 3-level compact U-Net on 8^3 tiles, batch 1, vmapped over networks: XLA:CPU's oneDNN rewrite
    aborted the process on its one-voxel bottleneck conv (so this runs in a child process)."""
    code = """
import jax, jax.numpy as jnp
from jaxseg.dlb.model import CompactUNet
m = CompactUNet(num_classes=2, features=(4, 4, 8, 8, 16), groups=2)
x = jnp.ones((2, 1, 8, 8, 8, 2))
p = jax.vmap(lambda k: m.init(k, x[0])["params"])(jax.random.split(jax.random.key(0), 2))
g = jax.jit(jax.vmap(jax.grad(lambda p, x: jnp.mean(m.apply({"params": p}, x) ** 2))))(p, x)
print("compiled", all(bool(jnp.isfinite(a).all()) for a in jax.tree.leaves(g)))
"""
    env = dict(os.environ, XLA_FLAGS=" ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                              if "device_count" not in f))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "compiled True" in p.stdout, p.stderr[-2000:]
