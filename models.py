"""The Omniglot classifier of the Reptile paper, and the meta-update helpers it inherits."""
import copy

import torch
from torch import nn

import reptile


class ReptileModel(nn.Module):
    """A module that can be cloned and pulled towards another copy of itself."""

    def point_grad_to(self, target: nn.Module) -> None:
        """Set each parameter's .grad to (self - target), so an SGD step of size s moves self s of the way to target."""
        reptile.point_grad_to(self, target.parameters())

    def clone(self) -> "ReptileModel":
        """An independent copy on the same device."""
        return copy.deepcopy(self)


def conv_block(in_channels: int, scale: bool = True) -> nn.Sequential:
    """Conv 3x3 stride 2 (halves the image), BatchNorm on the batch's own statistics with a learned offset and, unless
    `scale` is False, a learned scale, ReLU."""
    # The papers' code always normalises with the current batch (training=True) and uses TensorFlow's epsilon; no
    # running statistics exist, at meta-training or meta-test time.
    batch_norm = nn.BatchNorm2d(64, eps=1e-3, track_running_stats=False)
    if not scale:
        batch_norm.register_parameter("weight", None)
    return nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1), batch_norm, nn.ReLU())


class MeanOverPositions(nn.Module):
    """(B, C, H, W) -> (B, C): the mean of each channel's map (as AdaptiveAvgPool2d(1), which vmap handles slowly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class OmniglotModel(ReptileModel):
    """4 x [conv, BatchNorm, ReLU] on 1x28x28 images (28 -> 14 -> 7 -> 4 -> 2), then a linear classifier of the
    2 x 2 x 64 map flattened (the Reptile paper's); `maml=True`: the MAML paper's code's, which classifies the map's
    mean over its positions, from N(0, 1) weights, with BatchNorm offsets (no scales) only the meta-update learns."""

    def __init__(self, num_classes: int, maml: bool = False):
        super().__init__()
        self.num_classes = num_classes
        pooling = [MeanOverPositions()] if maml else []
        self.features = nn.Sequential(*(conv_block(channels, scale=not maml) for channels in (1, 64, 64, 64)),
                                      *pooling, nn.Flatten())
        self.classifier = nn.Linear(64 if maml else 64 * 2 * 2, num_classes)
        # Initialise as TensorFlow's layers do in the papers' code: Glorot-uniform weights, zero biases.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if maml:
            nn.init.normal_(self.classifier.weight)  # tf.random_normal, mean 0 and standard deviation 1
        self.meta_only = frozenset(f"features.{block}.1.bias" for block in range(4)) if maml else frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images given as (B, 784) or (B, 1, 28, 28)."""
        return self.classifier(self.features(x.view(-1, 1, 28, 28)))
