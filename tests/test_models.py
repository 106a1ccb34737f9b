import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxseg.config import load_config
from jaxseg.dlb.model import CompactUNet
from jaxseg.dlb.model import build_model as build_dlb_model
from jaxseg.models import UNet3D, build_model, explicit_topology, plan_topology
from jaxseg.models.layers import Conv3D, Norm, Upsample, conv3d, pixel_shuffle


def n_params(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- topology


def test_topology_128_isotropic_is_nnunet_default():
    t = plan_topology((128, 128, 128), (1.0, 1.0, 1.0))
    assert t.n_stages == 6
    assert t.features == (32, 64, 128, 256, 320, 320)
    assert t.strides == ((1, 1, 1),) + ((2, 2, 2),) * 5
    assert t.kernels == ((3, 3, 3),) * 6
    assert t.bottleneck_size() == (4, 4, 4)
    assert t.patch_size == (128, 128, 128)


def test_topology_anisotropic_by_hand():
    # Derived by hand from nnU-Net v2's get_pool_and_conv_props (min feature map 4):
    # z (spacing 3) is not pooled nor convolved with 3 until x, y reach spacing 2; a lone poolable
    # axis rule is not hit; 20 is padded to the multiple of 2^2 on z, 60 to 2^4 on x and y.
    t = plan_topology((60, 60, 20), (1.0, 1.0, 3.0))
    assert t.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1))
    assert t.kernels == ((3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    assert t.features == (32, 64, 128, 256, 320)
    assert t.patch_size == (64, 64, 20)


def test_topology_lone_axis_needs_three_times_min_size():
    # After two pools x is 8 (>= 8) but y, z are 2x coarser in spacing, so x is the lone poolable axis
    # and 8 < 3 * 4 stops the planning.
    t = plan_topology((32, 16, 16), (1.0, 2.0, 2.0))
    assert t.strides == ((1, 1, 1), (2, 1, 1), (2, 2, 2), (2, 2, 2))
    assert t.kernels == ((3, 1, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3))


def test_explicit_topology_checks_divisibility():
    with pytest.raises(ValueError, match="not divisible"):
        explicit_topology(((1, 1, 1), (2, 2, 2)), ((3, 3, 3),) * 2, (15, 16, 16))


# ------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("strided", ["space_to_depth", "native"])
def test_conv_matches_torch_padding_convention(strided):
    # Symmetric k//2 padding: a stride-2 3x3x3 conv on size 8 reads x[2o-1 .. 2o+1].
    x = jnp.arange(8.0).reshape(1, 8, 1, 1, 1)
    w = jnp.zeros((3, 1, 1, 1, 1)).at[0, 0, 0, 0, 0].set(1.0)  # picks x[2o - 1]
    y = conv3d(x, w, (2, 1, 1), strided=strided)
    np.testing.assert_array_equal(y[0, :, 0, 0, 0], [0.0, 1.0, 3.0, 5.0])


def test_kaiming_init_std():
    conv = Conv3D(64, (3, 3, 3))
    v = conv.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4, 32)))
    std = float(jnp.std(v["params"]["kernel"]))
    expected = np.sqrt(2.0 / (1 + 0.01**2) / (27 * 32))
    assert abs(std - expected) / expected < 0.03
    assert float(jnp.abs(v["params"]["bias"]).max()) == 0.0


def test_instance_and_group_norm_against_numpy():
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 3, 6)).astype(np.float32) * 3 + 1
    for kind, groups in (("instance", 8), ("group", 3)):
        y = np.asarray(Norm(kind, groups).apply({"params": {"scale": jnp.ones(6), "bias": jnp.zeros(6)}}, x))
        g = 6 if kind == "instance" else 3
        xr = x.reshape(2, -1, g, 6 // g)
        ref = (xr - xr.mean(axis=(1, 3), keepdims=True)) / np.sqrt(xr.var(axis=(1, 3), keepdims=True) + 1e-5)
        np.testing.assert_allclose(y, ref.reshape(x.shape), atol=1e-4)


def test_transpose_upsample_equals_torch_semantics():
    # PyTorch ConvTranspose3d with kernel == stride: out[o*f + d] = x[o] @ W[d] + b.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 2, 3, 2, 4)).astype(np.float32)
    f = (2, 2, 1)
    kernel = rng.normal(size=(*f, 4, 3)).astype(np.float32)
    bias = rng.normal(size=(3,)).astype(np.float32)
    y = np.asarray(Upsample(3, f, "transpose").apply({"params": {"kernel": kernel, "bias": bias}}, x))
    ref = np.zeros((1, 4, 6, 2, 3), np.float32)
    for o in np.ndindex(2, 3, 2):
        for d in np.ndindex(*f):
            ref[0, o[0] * 2 + d[0], o[1] * 2 + d[1], o[2] + d[2]] = x[0, o[0], o[1], o[2]] @ kernel[d] + bias
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # and equal to a lax transposed convolution with the spatially flipped kernel
    lax_y = jax.lax.conv_transpose(x, kernel[::-1, ::-1, ::-1], f, "VALID",
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + bias
    np.testing.assert_allclose(y, lax_y, rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_places_channels():
    x = jnp.arange(8.0).reshape(1, 1, 1, 1, 8)
    y = pixel_shuffle(x, (2, 2, 2))
    assert y.shape == (1, 2, 2, 2, 1)
    np.testing.assert_array_equal(np.asarray(y).reshape(-1), np.arange(8.0))


# ------------------------------------------------------------------------------ UNet3D


def tiny_unet(patch=(16, 16, 16), spacing=(1.0, 1.0, 1.0), **kw):
    topo = plan_topology(patch, spacing, features_base=4, features_max=16)
    return UNet3D(num_classes=3, topology=topo, **kw), topo


@pytest.mark.parametrize("patch,spacing", [((16, 16, 16), (1, 1, 1)), ((16, 24, 8), (1, 1, 1)),
                                           ((32, 32, 8), (0.8, 0.8, 2.5))])
def test_unet_output_shapes_follow_strides(patch, spacing):
    model, topo = tiny_unet(patch, spacing)
    x = jax.ShapeDtypeStruct((2, *topo.patch_size, 1), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(model.apply, v, x)
    assert len(out.seg) == topo.n_stages - 1
    size = np.array(topo.patch_size)
    for i, logits in enumerate(out.seg):
        size = size // np.array(topo.strides[i])
        assert logits.shape == (2, *size, 3)
        assert logits.dtype == jnp.float32


def test_unet_param_names_expose_stages():
    model, topo = tiny_unet(age_head=False)
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 16, 1), jnp.float32))
    n = topo.n_stages
    expected = ({f"encoder_{i}" for i in range(n - 1)} | {"bottleneck"} | {f"decoder_{i}" for i in range(n - 1)}
                | {f"head_{i}" for i in range(n - 1)})
    assert set(v["params"]) == expected
    assert set(v["params"]["decoder_0"]) == {"up", "stage"}


@pytest.mark.parametrize("block,upsample", [("plain", "transpose"), ("residual", "resize_conv"),
                                            ("plain", "pixel_shuffle")])
@pytest.mark.slow
def test_unet_jit_and_finite_gradients(block, upsample):
    model, _ = tiny_unet(block=block, upsample=upsample, deep_supervision=False)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 16, 1))
    params = jax.jit(model.init)(jax.random.key(1), x)["params"]

    @jax.jit
    def loss(p):
        return jnp.mean(model.apply({"params": p}, x).seg[0] ** 2)

    g = jax.grad(loss)(params)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(g))
    assert float(sum(jnp.abs(a).sum() for a in jax.tree.leaves(g))) > 0


def test_residual_block_projects_skip_only_when_needed():
    model, _ = tiny_unet(block="residual")
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 16, 1), jnp.float32))
    p = v["params"]
    assert "conv3" in p["encoder_0"]["res"]  # 1 -> 4 channels
    assert "conv3" in p["encoder_1"]["res"]  # stride 2
    assert "conv3" in p["decoder_0"]["stage"]["res"]  # concat 8 -> 4 channels


def test_bf16_compute_keeps_fp32_params_and_is_close():
    model32, _ = tiny_unet(deep_supervision=False)
    model16, _ = tiny_unet(deep_supervision=False, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 16, 1))
    v = model16.init(jax.random.key(1), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
    y16 = model16.apply(v, x).seg[0]
    y32 = model32.apply(v, x).seg[0]
    assert y16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
    assert rel < 0.05


def test_num_ds_heads_and_age_head():
    topo = plan_topology((32, 32, 32), features_base=4, features_max=16)  # bottleneck 4^3
    model = UNet3D(num_classes=2, topology=topo, num_ds_heads=2, age_head=True)
    x = jnp.ones((3, 32, 32, 32, 2))
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(model.apply, v, x)
    assert [o.shape[1] for o in out.seg] == [32, 16]
    assert out.age.shape == (3,)
    head = v["params"]["age_head"]
    assert head["conv"]["kernel"].shape == (3, 3, 3, 16, 512)
    assert head["dense"]["kernel"].shape == (2 * 2 * 2 * 512, 1)


def test_age_head_refuses_too_small_bottleneck():
    topo = explicit_topology(((1, 1, 1),) + ((2, 2, 2),) * 3, ((3, 3, 3),) * 4, (16, 16, 16), features_base=4)
    model = UNet3D(num_classes=2, topology=topo, age_head=True)
    with pytest.raises(ValueError, match="age head needs a bottleneck of at least 3"):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 16, 1), jnp.float32))


def test_build_model_from_config():
    cfg = load_config(None, ["data.patch_size=[16,16,16]", "model.features_base=4", "model.block=residual",
                             "data.num_classes=5"])
    model = build_model(cfg)
    assert model.topology.features == (4, 8, 16)
    assert model.block == "residual" and model.num_classes == 5
    cfg = load_config(None, ["data.num_classes=2", "model.features_base=4"])
    dlb = build_dlb_model(cfg)
    assert isinstance(dlb, CompactUNet) and dlb.features == (4, 8, 16, 32, 64) and dlb.num_classes == 2


# -------------------------------------------------------------------------- compact U-Net


# The authors' Keras network (DeepLesionBrain's modelos.py, load_UNET3D_SLANT27_v2_groupNorm with
# ch=2, nc=2, nf=24): (parameter path, kernel shape) of each conv, and the channels each GroupNorm sees.
DLB_REFERENCE_CONVS = [
    ("encoder_0/block_0", (3, 3, 3, 2, 24)), ("encoder_0/block_1", (3, 3, 3, 24, 48)),
    ("encoder_1/block_0", (3, 3, 3, 48, 48)), ("encoder_1/block_1", (3, 3, 3, 48, 96)),
    ("encoder_2/block_0", (3, 3, 3, 96, 96)), ("encoder_2/block_1", (3, 3, 3, 96, 192)),
    ("bottleneck", (3, 3, 3, 192, 384)),
    ("decoder_2", (3, 3, 3, 384 + 192, 192)), ("decoder_1", (3, 3, 3, 192 + 96, 96)),
    ("decoder_0", (3, 3, 3, 96 + 48, 96)),
    ("head", (3, 3, 3, 96, 2)),
]
DLB_REFERENCE_NORMS = {"encoder_0/block_1": 24, "encoder_1/block_0": 48, "encoder_1/block_1": 48,
                       "encoder_2/block_0": 96, "encoder_2/block_1": 96, "bottleneck": 192,
                       "decoder_2": 576, "decoder_1": 288, "decoder_0": 144}


def test_compact_unet_matches_reference_layers():
    model = CompactUNet(num_classes=2)
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 96, 96, 96, 2), jnp.float32))
    flat = {"/".join(str(k.key) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(v["params"])}
    expected = {}
    for name, shape in DLB_REFERENCE_CONVS:
        conv = name if name == "head" else f"{name}/conv"
        expected[f"{conv}/kernel"], expected[f"{conv}/bias"] = shape, shape[-1:]
    for name, c in DLB_REFERENCE_NORMS.items():
        expected[f"{name}/norm/scale"] = expected[f"{name}/norm/bias"] = (c,)
    assert flat == expected
    assert n_params(v) == 7_071_386  # the reference model's count


def test_compact_unet_parameter_count():
    model = CompactUNet(num_classes=2)
    v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 96, 96, 96, 2), jnp.float32))

    def conv(i, o, k=27):
        return k * i * o + o

    convs = [shape[3:] for _, shape in DLB_REFERENCE_CONVS]
    expected = sum(conv(i, o) for i, o in convs) + sum(2 * c for c in DLB_REFERENCE_NORMS.values())
    assert n_params(v) == expected == 7_071_386


def test_compact_unet_forward_and_dropout():
    model = CompactUNet(num_classes=2, features=(4, 8, 8, 16, 16))
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 16, 2))
    v = model.init(jax.random.key(1), x)
    y_eval = model.apply(v, x)
    assert y_eval.shape == (1, 16, 16, 16, 2)
    np.testing.assert_array_equal(y_eval, model.apply(v, x))
    y_train = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(y_train, y_eval)
