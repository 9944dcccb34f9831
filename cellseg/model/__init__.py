"""cellseg.model: the pixel-shuffle U-Net (fastai DynamicUnet topology) on a timm encoder."""

from cellseg.model.unet import UNet, build_model

__all__ = ["UNet", "build_model"]
