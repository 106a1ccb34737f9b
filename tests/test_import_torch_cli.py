"""`python -m jaxseg.launch import-torch`: a PyTorch DynUNet / nnU-Net checkpoint becomes a run directory that
`predict --run` uses, predicting what the torch model predicts; bad inputs fail on one line and write nothing."""

import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")

from jaxseg.config import load_config  # noqa: E402
from jaxseg.launch import main  # noqa: E402
from jaxseg.models import build_model  # noqa: E402

torch.set_num_threads(1)
SIZE = (16, 16, 16)

# residual encoder (plain decoder in DynUNet), a (3,3,1) first kernel (decoder_0 uses kernels[1] = 3),
# no conv bias, deep supervision: every adaptation the config needs
DYNUNET = dict(spatial_dims=3, in_channels=1, out_channels=3, kernel_size=[[3, 3, 1], 3, 3], strides=[1, 2, 2],
               upsample_kernel_size=[2, 2], filters=[4, 8, 16], norm_name=["INSTANCE", {"affine": True}],
               res_block=True, deep_supervision=True, deep_supr_num=1, trans_bias=True)
PLAIN = dict(n_stages=3, features_per_stage=[4, 8, 16], conv_op="torch.nn.modules.conv.Conv3d",
             kernel_sizes=[[1, 3, 3], [3, 3, 3], [3, 3, 3]], strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]],
             n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2], conv_bias=True,
             norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", norm_op_kwargs={"eps": 1e-5, "affine": True},
             dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})


def perturb(model, seed=0):
    """Biases and norm weights away from torch's 0/1 init, so that each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from monai.networks.nets import DynUNet

    root = tmp_path_factory.mktemp("import_torch")
    torch.manual_seed(0)
    dyn = perturb(DynUNet(**{k: tuple(v) if k == "norm_name" else v for k, v in DYNUNET.items()}))
    torch.save(dyn.state_dict(), root / "dynunet.pt")
    (root / "arch.json").write_text(json.dumps(DYNUNET))

    # one 16^3 image, all voxels nonzero (predict's crop keeps everything), RAS identity affine
    rng = np.random.default_rng(0)
    img = (100 + 20 * rng.standard_normal(SIZE)).astype(np.float32)
    (root / "images").mkdir()
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / "images" / "case_0000.nii.gz"))
    return {"root": root, "dyn": dyn, "img": img}


def torch_labels(model, img):
    """torch's argmax on the image z-scored as predict's preprocessing does, channels-first; and the margin
    between the two largest logits (float32 rounding can only flip near-ties)."""
    v = img.astype(np.float64)
    x = ((v - v.mean()) / v.std()).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(x)[None, None])
    out = (out[0] if isinstance(out, (list, tuple)) else out)[0].numpy()
    top2 = np.sort(out, axis=0)[-2:]
    return out.argmax(0), top2[1] - top2[0]


def predict(run, root, name):
    out = root / name
    assert main(["predict", "--run", str(run), "--input", str(root / "images"), "--output", str(out)]) == 0
    return np.asanyarray(nib.load(str(out / "case.nii.gz")).dataobj)


def assert_same_labels(pred, expected, margin):
    assert pred.shape == expected.shape == SIZE
    assert len(np.unique(expected)) >= 2  # not a trivial constant map
    differ = pred != expected
    assert not differ[margin > 1e-3].any(), int(differ.sum())


def test_dynunet_import_then_predict_matches_torch(work, capsys):
    root = work["root"]
    run = root / "dyn_run"
    assert main(["import-torch", str(root / "dynunet.pt"), "--kind", "dynunet", "--arch", str(root / "arch.json"),
                 "--out", str(run), "--patch-size", "16,16,16"]) == 0
    assert "imported dynunet" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["best", "config.yaml", "import.json", "preprocessing.json", "run.json"]
    assert not list(root.glob(".dyn_run.import-*"))

    rec = json.loads((run / "import.json").read_text())
    assert rec["kind"] == "dynunet" and rec["source"] == str((root / "dynunet.pt").absolute())
    assert rec["sha256"] == hashlib.sha256((root / "dynunet.pt").read_bytes()).hexdigest()
    assert rec["verification"]["max_abs_logit_diff"] < 1e-4
    assert rec["adaptations"] == []  # the config says conv_bias, decoder_block and decoder_kernels
    assert rec["patch_size"] == list(SIZE) and rec["patch_size_from"] == "--patch-size"

    cfg = load_config(run / "config.yaml")
    m = cfg.model
    assert (m.block, m.norm, m.activation, m.upsample) == ("residual", "instance", "leaky_relu", "transpose")
    assert m.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2))
    assert m.kernels == ((3, 3, 1), (3, 3, 3), (3, 3, 3))  # the torch kernels, not padded
    # DynUNet: plain decoder blocks under the residual encoder, decoder_i convolved with kernel_size[i + 1],
    # no conv biases
    assert (m.decoder_block, m.decoder_kernels, m.conv_bias) == ("plain", ((3, 3, 3), (3, 3, 3)), False)
    assert (m.deep_supervision, m.num_ds_heads) == (True, 2)
    assert (cfg.data.num_channels, cfg.data.num_classes, cfg.data.patch_size) == (1, 3, SIZE)
    model = build_model(cfg)
    assert model.topology.features == (4, 8, 16)

    # the config-built model's parameter tree is the torch model's: a bias exactly where torch has one
    # (the output/deep-supervision heads and, trans_bias=True, the transposed convs; DynUNet's convs
    # have none), plain decoder blocks, decoder_0 convolved with 3x3x3; the saved parameters fill it
    import jax
    from flax import traverse_util

    from jaxseg.train.checkpoint import load_params

    x = jax.ShapeDtypeStruct((1, *SIZE, 1), np.float32)
    tree = traverse_util.flatten_dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x)["params"], x))
    biases = sorted("/".join(p) for p in tree if p[-1] == "bias" and not p[-2].startswith("norm"))
    assert biases == ["decoder_0/up/bias", "decoder_1/up/bias", "head_0/bias", "head_1/bias"]
    torch_biases = [k for k in work["dyn"].state_dict() if k.endswith(".bias") and not k.startswith("skip_layers.")
                    and ".norm" not in k]
    assert len(torch_biases) == len(biases), torch_biases
    assert not any(p[0].startswith("decoder_") and "res" in p for p in tree)  # plain decoder blocks
    assert ("encoder_0", "res", "conv3", "kernel") in tree  # residual encoder
    assert tree[("encoder_0", "res", "conv1", "kernel")].shape[:3] == (3, 3, 1)
    assert tree[("decoder_0", "stage", "block_0", "conv", "kernel")].shape[:3] == (3, 3, 3)
    saved, _ = load_params(run)
    saved = traverse_util.flatten_dict(saved)
    assert {p: tuple(v.shape) for p, v in saved.items()} == {p: tuple(v.shape) for p, v in tree.items()}

    labels, margin = torch_labels(work["dyn"], work["img"])
    assert_same_labels(predict(run, root, "pred_dyn"), labels, margin)


def test_nnunet_import_then_predict_matches_torch(work):
    arch = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    from jaxseg.interop.torch_run import _torch_model

    root = work["root"]
    torch.manual_seed(1)
    net = perturb(_torch_model("nnunet", PLAIN, 1, 2), seed=1)  # PlainConvUNet, ops located from the strings
    assert isinstance(net, arch.PlainConvUNet)
    torch.save({"network_weights": net.state_dict(), "current_epoch": 3}, root / "checkpoint_final.pth")
    plans = {"configurations": {"3d_fullres": {"patch_size": [8, 16, 16], "spacing": [1.0, 1.0, 1.0],
                                               "architecture": {"network_class_name": "dynamic_network_architectures."
                                                                "architectures.unet.PlainConvUNet",
                                                                "arch_kwargs": PLAIN}}}}
    (root / "plans.json").write_text(json.dumps(plans))
    run = root / "nn_run"
    assert main(["import-torch", str(root / "checkpoint_final.pth"), "--kind", "nnunet", "--plans",
                 str(root / "plans.json"), "--out", str(run), "--patch-size", "16,16,16"]) == 0
    rec = json.loads((run / "import.json").read_text())
    assert rec["verification"]["max_abs_logit_diff"] < 1e-4 and rec["adaptations"] == []
    cfg = load_config(run / "config.yaml")
    assert cfg.model.kernels == ((1, 3, 3), (3, 3, 3), (3, 3, 3)) and cfg.data.num_classes == 2

    labels, margin = torch_labels(net, work["img"])
    assert_same_labels(predict(run, root, "pred_nn"), labels, margin)


def _fails(argv, capsys, *needles):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert str(n) in err, err
    return err


def test_bad_inputs_fail_on_one_line_and_write_nothing(work, tmp_path, capsys):
    root = work["root"]
    out = tmp_path / "run"
    ckpt, arch = root / "dynunet.pt", root / "arch.json"
    base = ["import-torch", str(ckpt), "--out", str(out)]

    _fails(["import-torch", str(tmp_path / "nope.pt"), "--kind", "dynunet", "--arch", str(arch), "--out", str(out)],
           capsys, tmp_path / "nope.pt", "no such file")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    _fails(["import-torch", str(tmp_path / "garbage.pt"), "--kind", "dynunet", "--arch", str(arch), "--out",
            str(out)], capsys, tmp_path / "garbage.pt", "not a readable PyTorch checkpoint")
    # wrong kind: DynUNet weights read as nnU-Net
    (tmp_path / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {
        "patch_size": [16, 16, 16], "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": PLAIN}}}}))
    _fails(base + ["--kind", "nnunet", "--plans", str(tmp_path / "plans.json")], capsys, ckpt, "--kind dynunet")
    _fails(base + ["--kind", "dynunet"], capsys, ckpt, "--arch")
    # mismatching architecture: other filters
    (tmp_path / "arch.json").write_text(json.dumps(dict(DYNUNET, filters=[4, 8, 32])))
    _fails(base + ["--kind", "dynunet", "--arch", str(tmp_path / "arch.json")], capsys, ckpt,
           tmp_path / "arch.json", "shape")
    (tmp_path / "bad.json").write_text("{not json")
    _fails(base + ["--kind", "dynunet", "--arch", str(tmp_path / "bad.json")], capsys, tmp_path / "bad.json",
           "not valid JSON")
    _fails(base + ["--kind", "dynunet", "--arch", str(arch), "--patch-size", "15,16,16"], capsys, "--patch-size",
           "divisible")
    assert not out.exists() and list(tmp_path.glob(".run.import-*")) == []

    out.mkdir()
    _fails(base + ["--kind", "dynunet", "--arch", str(arch)], capsys, out, "already exists")
    with pytest.raises(SystemExit) as e:
        main(base + ["--kind", "unet", "--arch", str(arch)])
    assert e.value.code == 2


def test_without_monai_the_torch_check_is_skipped_with_a_note(work, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "monai.networks.nets", None)  # `from monai... import` fails
    root = work["root"]
    run = tmp_path / "run"
    assert main(["import-torch", str(root / "dynunet.pt"), "--kind", "dynunet", "--arch", str(root / "arch.json"),
                 "--out", str(run)]) == 0
    assert "skipped" in capsys.readouterr().out
    rec = json.loads((run / "import.json").read_text())
    assert rec["verification"]["max_abs_logit_diff"] is None and "monai" in rec["verification"]["note"]
    assert rec["verification"]["jaxseg_rebuild_max_abs_diff"] < 1e-4
    assert rec["patch_size"] == [4, 4, 4] and rec["patch_size_from"].startswith("default")
    assert (run / "best").is_dir()
