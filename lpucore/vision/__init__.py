"""ResNet image classifiers (torchvision's ResNet-18/34/50/101, v1.5) compiled onto the simulated chip::

    resnet50, resnet18, resnet   a model from torchvision-named weights or seeded random ones, int8 or fp16
    ResNet.run(images)           logits and VisionStats (cycles, latency, MXM utilisation, SRAM, cycles by
                                 part and operation, schedule bounds; ``stream=True``: back-to-back images)
    ResNet.reference(images)     the NumPy reference over the same quantised weights (int8: bit for bit)
    ResNetSpec, ARCHS            the architectures as data (arch.py)

The guide is docs/guide/vision.md.
"""

from ..errors import ModelError
from .arch import ARCHS, ResNetSpec
from .model import CALIBRATION, ResNet, VisionStats, check_weights, random_weights, resnet, resnet18, resnet50

__all__ = ["ARCHS", "CALIBRATION", "ModelError", "ResNet", "ResNetSpec", "VisionStats", "check_weights",
           "random_weights", "resnet", "resnet18", "resnet50"]
