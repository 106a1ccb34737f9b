"""PyTorch U-Net weights (MONAI DynUNet, nnU-Net v2 PlainConvUNet) imported into UNet3D give the same
logits, for every deep-supervision output too."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxseg.interop import (  # noqa: E402
    import_dynunet,
    import_nnunet_plans,
    import_plain_conv_unet,
    load_torch_checkpoint,
    nnunet_arch_kwargs,
)
from jaxseg.interop.torch_import import StateDictError  # noqa: E402
from jaxseg.models.layers import STRIDED_CONV, Upsample  # noqa: E402

TOL = 1e-4
torch.set_num_threads(1)


def perturb(model, seed=0):
    """Move every bias and 1-D (norm) weight away from torch's 0/1 init so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def to_jax(x):
    return jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 4, 1))


def max_diffs(model, params, x, torch_outputs):
    # a fresh function: the strided-conv formulation is read at trace time, so no cached trace may be reused
    seg = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, to_jax(x)).seg
    assert len(seg) == len(torch_outputs)
    diffs = []
    for a, b in zip(seg, torch_outputs):
        b = b.detach().numpy().transpose(0, 2, 3, 4, 1)
        assert a.shape == b.shape
        diffs.append(float(np.abs(np.asarray(a) - b).max()))
    return diffs


# ------------------------------------------------------------------------------ MONAI DynUNet

DYNUNET_CASES = {
    # 3 stages, plain, 1 channel, no deep supervision
    "plain3": dict(in_channels=1, out_channels=3, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                   upsample_kernel_size=[2, 2], filters=[4, 8, 16]),
    # 4 stages, residual, 2 channels, (1,3,3) first kernel, (1,2,2) stride, 2 extra heads, transposed bias
    "res4_ds": dict(in_channels=2, out_channels=3, kernel_size=[(1, 3, 3), 3, 3, 3], strides=[1, (1, 2, 2), 2, 2],
                    upsample_kernel_size=[(1, 2, 2), 2, 2], filters=[4, 8, 16, 32], res_block=True,
                    deep_supervision=True, deep_supr_num=2, trans_bias=True),
    # 4 stages, plain, deep supervision, group norm + ReLU, anisotropic (3,3,1) kernel and (2,2,1) stride
    "plain4_group": dict(in_channels=2, out_channels=2, kernel_size=[(3, 3, 1), 3, 3, 3],
                         strides=[1, (2, 2, 1), 2, 2], upsample_kernel_size=[(2, 2, 1), 2, 2], filters=[4, 8, 8, 16],
                         norm_name=("group", {"num_groups": 2}), act_name="relu", deep_supervision=True,
                         deep_supr_num=1),
    # 3 stages, residual, non-affine instance norm (MONAI's "instance" string)
    "res3_noaffine": dict(in_channels=1, out_channels=2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                          upsample_kernel_size=[2, 2], filters=[4, 8, 16], res_block=True, norm_name="instance"),
}
DYNUNET_INPUT = {"plain3": (16, 16, 16), "res4_ds": (8, 16, 16), "plain4_group": (16, 16, 8),
                 "res3_noaffine": (16, 16, 16)}


def dynunet(kw, seed=0):
    from monai.networks.nets import DynUNet

    torch.manual_seed(seed)
    return perturb(DynUNet(3, **kw), seed).train()


def dynunet_outputs(m, x):
    with torch.no_grad():
        out = m(x)
        if not m.deep_supervision:
            return [out]
        # training mode stacks [output, heads interpolated to full size]; m.heads keeps them at their own size
        return [out[:, 0]] + [h.clone() for h in m.heads]


@pytest.mark.parametrize("case,strided", [("plain3", "space_to_depth_grad"), ("res4_ds", "space_to_depth"),
                                          ("plain4_group", "native"), ("res3_noaffine", "space_to_depth_grad"),
                                          ("res4_ds", "native")])
def test_dynunet_matches_torch(case, strided, monkeypatch):
    pytest.importorskip("monai")
    kw = DYNUNET_CASES[case]
    m = dynunet(kw)
    x = torch.randn(1, kw["in_channels"], *DYNUNET_INPUT[case], generator=torch.Generator().manual_seed(1))
    expected = dynunet_outputs(m, x)
    monkeypatch.setitem(STRIDED_CONV, "cpu", strided)
    model, params = import_dynunet(m.state_dict(), **kw)
    assert len(expected) == (1 + kw.get("deep_supr_num", 1) if kw.get("deep_supervision") else 1)
    diffs = max_diffs(model, params, x, expected)
    print(case, strided, diffs)
    assert max(diffs) < TOL, diffs


def test_dynunet_residual_decoder_is_plain_and_uses_the_kernel_below():
    pytest.importorskip("monai")
    kw = DYNUNET_CASES["res4_ds"]
    model, params = import_dynunet(dynunet(kw).state_dict(), **kw)
    assert "res" in params["encoder_0"] and "block_0" in params["decoder_0"]["stage"]
    assert model.decoder_block == "plain"
    assert params["encoder_0"]["res"]["conv1"]["kernel"].shape[:3] == (1, 3, 3)
    assert params["decoder_0"]["stage"]["block_0"]["conv"]["kernel"].shape[:3] == (3, 3, 3)  # DynUNet: kernels[1]
    assert params["decoder_0"]["up"]["kernel"].shape == (1, 2, 2, 8, 4)


# ------------------------------------------------------------------------------ nnU-Net PlainConvUNet


def plain_kwargs(**over):
    kw = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=torch.nn.Conv3d,
              kernel_sizes=[(1, 3, 3), 3, 3], strides=[1, (1, 2, 2), 2], n_conv_per_stage=2, num_classes=3,
              n_conv_per_stage_decoder=2, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
              norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
              nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    kw.update(over)
    return kw


def plain_conv_unet(kw, seed=0):
    arch = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    torch.manual_seed(seed)
    return perturb(arch.PlainConvUNet(**kw), seed).eval()


def plain_outputs(m, x):
    with torch.no_grad():
        out = m(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


PLAIN_CASES = {
    "bias_ds3": (plain_kwargs(), (8, 16, 16)),
    "nobias4": (plain_kwargs(input_channels=2, n_stages=4, features_per_stage=[4, 8, 16, 16], kernel_sizes=3,
                             strides=[1, 2, 2, (2, 2, 1)], conv_bias=False, deep_supervision=False),
                (16, 16, 8)),
    "relu_ds4_noaffine": (plain_kwargs(n_stages=4, features_per_stage=[4, 8, 8, 16], kernel_sizes=[(3, 3, 1), 3, 3, 3],
                                       strides=[1, (2, 2, 1), 2, 2], nonlin=torch.nn.ReLU, nonlin_kwargs=None,
                                       norm_op_kwargs={"eps": 1e-5}), (16, 16, 8)),
}


@pytest.mark.parametrize("case,strided", [("bias_ds3", "space_to_depth_grad"), ("nobias4", "space_to_depth"),
                                          ("relu_ds4_noaffine", "native")])
def test_plain_conv_unet_matches_torch(case, strided, monkeypatch):
    kw, size = PLAIN_CASES[case]
    m = plain_conv_unet(kw)
    x = torch.randn(1, kw["input_channels"], *size, generator=torch.Generator().manual_seed(1))
    expected = plain_outputs(m, x)
    monkeypatch.setitem(STRIDED_CONV, "cpu", strided)
    model, params = import_plain_conv_unet(m.state_dict(), **kw)
    assert len(expected) == (kw["n_stages"] - 1 if kw["deep_supervision"] else 1)
    diffs = max_diffs(model, params, x, expected)
    print(case, strided, diffs)
    assert max(diffs) < TOL, diffs


def test_nnunet_checkpoint_and_plans_roundtrip(tmp_path):
    """nnU-Net's checkpoint_final.pth layout (weights under "network_weights", numpy scalars in the log)
    and a plans.json in the current format, with a deep-supervision-trained checkpoint read without DS."""
    kw = plain_kwargs(input_channels=2, num_classes=4)
    m = plain_conv_unet(kw)
    torch.save({"network_weights": m.state_dict(), "optimizer_state": {}, "logging": {"ema_fg_dice": [np.float64(0.5)],
                "dice_per_class_or_region": [np.zeros(3)]}, "current_epoch": 3, "_best_ema": np.float64(0.5),
                "init_args": {"configuration": "3d_fullres", "fold": 0, "device": torch.device("cpu")},
                "trainer_name": "nnUNetTrainer"}, tmp_path / "checkpoint_final.pth")
    arch_kwargs = {k: v for k, v in kw.items() if k not in ("input_channels", "num_classes", "deep_supervision")}
    arch_kwargs.update(conv_op="torch.nn.modules.conv.Conv3d", norm_op="torch.nn.modules.instancenorm.InstanceNorm3d",
                       nonlin="torch.nn.LeakyReLU")
    plans = {"configurations": {
        "3d_fullres": {"patch_size": [8, 16, 16], "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": arch_kwargs, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}},
        "3d_lowres": {"inherits_from": "3d_fullres", "patch_size": [8, 32, 32]}}}
    (tmp_path / "plans.json").write_text(json.dumps(plans))

    sd = load_torch_checkpoint(tmp_path / "checkpoint_final.pth")
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    model, params = import_nnunet_plans(sd, tmp_path / "plans.json", "3d_lowres")
    assert model.topology.patch_size == (8, 32, 32)
    assert model.num_classes == 4 and not model.deep_supervision
    m.decoder.deep_supervision = False
    x = torch.randn(1, 2, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    diffs = max_diffs(model, params, x, plain_outputs(m, x))
    print("nnunet plans", diffs)
    assert max(diffs) < TOL


def test_nnunet_arch_kwargs_old_plans_format():
    plans = {"configurations": {"3d_fullres": {
        "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 32, "unet_max_num_features": 320,
        "conv_kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "pool_op_kernel_sizes": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_conv_per_stage_encoder": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2], "patch_size": [16, 64, 64]}}}
    kw = nnunet_arch_kwargs(plans)
    assert kw["n_stages"] == 3 and kw["features_per_stage"] == [32, 64, 128] and kw["conv_bias"] is True
    assert kw["norm_op_kwargs"] == {"eps": 1e-5, "affine": True} and kw["patch_size"] == (16, 64, 64)


# ------------------------------------------------------------------------------ pieces and errors


def test_transposed_conv_layout_no_flip():
    """torch ConvTranspose3d weight (in, out, D, H, W) transposed to (D, H, W, in, out), no spatial flip."""
    ct = torch.nn.ConvTranspose3d(3, 5, (1, 2, 2), (1, 2, 2), bias=True)
    with torch.no_grad():
        ct.bias.normal_()
    x = torch.randn(2, 3, 3, 4, 5)
    with torch.no_grad():
        expected = ct(x).numpy().transpose(0, 2, 3, 4, 1)
    p = {"kernel": jnp.asarray(ct.weight.detach().numpy().transpose(2, 3, 4, 0, 1)),
         "bias": jnp.asarray(ct.bias.detach().numpy())}
    got = Upsample(5, (1, 2, 2)).apply({"params": p}, to_jax(x))
    assert float(np.abs(np.asarray(got) - expected).max()) < 1e-5


def test_missing_and_misshapen_keys_are_named():
    kw = plain_kwargs(deep_supervision=False)
    sd = {k: v.numpy().copy() for k, v in plain_conv_unet(kw).state_dict().items()}
    bad = dict(sd)
    del bad["decoder.transpconvs.0.bias"]
    bad["encoder.stages.1.0.convs.0.conv.weight"] = np.zeros((8, 4, 3, 3, 1), np.float32)
    with pytest.raises(StateDictError) as err:
        import_plain_conv_unet(bad, **kw)
    msg = str(err.value)
    assert "'decoder.transpconvs.0.bias'" in msg and "missing" in msg
    assert "'encoder.stages.1.0.convs.0.conv.weight' has shape (8, 4, 3, 3, 1), expected (8, 4, 3, 3, 3)" in msg

    # the hyperparameters say no bias, the weights have one: an unexpected key, unless strict=False
    with pytest.raises(StateDictError, match=r"unexpected torch keys.*'encoder\.stages\.0\.0\.convs\.0\.conv\.bias'"):
        import_plain_conv_unet(sd, **dict(kw, conv_bias=False))
    import_plain_conv_unet(sd, strict=False, **dict(kw, conv_bias=False))


def test_dynunet_wrong_channels_and_unsupported_options():
    pytest.importorskip("monai")
    kw = DYNUNET_CASES["plain3"]
    sd = dynunet(kw).state_dict()
    with pytest.raises(StateDictError, match=r"'input_block.conv1.conv.weight' has shape \(4, 1, 3, 3, 3\), "
                                             r"expected \(4, 2, 3, 3, 3\)"):
        import_dynunet(sd, **dict(kw, in_channels=2))
    with pytest.raises(ValueError, match="eps"):
        import_dynunet(sd, **dict(kw, norm_name=("instance", {"affine": True, "eps": 1e-3})))
    with pytest.raises(ValueError, match="negative_slope"):
        import_dynunet(sd, **dict(kw, act_name=("leakyrelu", {"negative_slope": 0.2})))
    with pytest.raises(ValueError, match="upsample_kernel_size"):
        import_dynunet(sd, **dict(kw, upsample_kernel_size=[3, 3]))


def test_load_torch_checkpoint_bare_and_wrapped(tmp_path):
    sd = {"a.weight": torch.randn(2, 3), "b.bias": torch.zeros(2, dtype=torch.bfloat16)}
    torch.save(sd, tmp_path / "bare.pt")
    out = load_torch_checkpoint(tmp_path / "bare.pt")
    assert set(out) == {"a.weight", "b.bias"} and out["b.bias"].dtype == np.float32
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "wrapped.pth")
    assert set(load_torch_checkpoint(tmp_path / "wrapped.pth")) == {"a.weight", "b.bias"}
    torch.save({"epoch": 3, "weights": sd}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="top-level keys"):
        load_torch_checkpoint(tmp_path / "other.pth")
    assert set(load_torch_checkpoint(tmp_path / "other.pth", key="weights")) == {"a.weight", "b.bias"}
    torch.save({"state_dict": sd, "obj": Unsafe()}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="weights_only=False"):
        load_torch_checkpoint(tmp_path / "unsafe.pth")


class Unsafe:
    pass
