"""Models: the multi-view UNet, its attention processor, text encoders and codecs."""

from .attention import ATTENTION_MODES, MultiViewAttnProcessor
from .multiview_unet import CAMERA_MODES, MultiViewUNet

__all__ = ["ATTENTION_MODES", "CAMERA_MODES", "MultiViewAttnProcessor", "MultiViewUNet"]
