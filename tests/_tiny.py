"""The tiny training config the loop tests share (with conftest.py's `tiny_store`): 16^3 patches, a
3-stage U-Net of 4-8 features, no augmentation, 2 x 2 steps."""

from jaxseg.config import load_config


def tiny_cfg(store, *overrides):
    return load_config(None, [
        f"data.store={store}", "data.patch_size=[16,16,16]", "data.batch_size=8", "data.fold=all",
        "data.threads=1", "model.features_base=4", "model.features_max=8",
        "train.epochs=2", "train.steps_per_epoch=2", "train.checkpoint_every=1", "train.log_every=1",
        "data.augment=none", *overrides])
