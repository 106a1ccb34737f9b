"""Interoperability with other frameworks: import trained PyTorch U-Nets (MONAI DynUNet, nnU-Net v2
PlainConvUNet) into jaxseg's UNet3D."""

from jaxseg.interop.torch_import import (
    StateDictError,
    ImportedUNet,
    import_dynunet,
    import_nnunet_plans,
    import_plain_conv_unet,
    load_torch_checkpoint,
    nnunet_arch_kwargs,
)

__all__ = ["ImportedUNet", "StateDictError", "import_dynunet", "import_nnunet_plans", "import_plain_conv_unet",
           "load_torch_checkpoint", "nnunet_arch_kwargs"]
