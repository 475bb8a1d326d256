"""ResNet-50 counted by hand from its architecture table, independently of torch, torchvision and tasks/.

He et al. 2016, Table 1, in torchvision's "v1.5" form (the stride of a downsampling block sits on its 3x3 conv):
a 7x7/2 stem conv with 64 outputs, a 3x3/2 max-pool, then four stages of bottleneck blocks
(width, blocks, stride) = (64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2). A bottleneck is 1x1 in->w, 3x3 w->w
(stride s), 1x1 w->4w, with a 1x1/s in->4w projection on the skip path of each stage's first block; every conv is
followed by BatchNorm. Global average pool, then fc 2048 -> classes.

A convolution costs 2 x C_in x C_out x k x k x H_out x W_out FLOPs per image (2 per multiply-add); its input
gradient and its weight gradient cost the same again each. The tests compare the product's counts to these.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))
FEATURES = 2048


@dataclass(frozen=True)
class Conv:
    """One convolution at one input size: channels in/out, kernel side, output side, skip-path projection or not."""

    c_in: int
    c_out: int
    k: int
    h_out: int
    projection: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.c_in * self.c_out * self.k * self.k * self.h_out * self.h_out

    @property
    def weights(self) -> int:
        return self.c_in * self.c_out * self.k * self.k


def out_side(h: int, stride: int) -> int:
    """floor((h + 2p - k) / s) + 1 with the padding ResNet uses (p = k // 2: 7x7 p3, 3x3 p1, 1x1 p0) = ceil(h / s)."""
    return (h - 1) // stride + 1


def stem(size: int, channels: int) -> Conv:
    """conv1: 7x7, stride 2, padding 3."""
    return Conv(channels, 64, 7, out_side(size, 2))


def convs(size: int, channels: int) -> list[Conv]:
    """Every convolution of ResNet-50 at `size` px (stem first)."""
    first = stem(size, channels)
    out, h, c = [first], out_side(first.h_out, 2), 64  # 3x3/2 max-pool with padding 1
    for width, blocks, stride in STAGES:
        for block in range(blocks):
            s = stride if block == 0 else 1
            h_out = out_side(h, s)
            out += [Conv(c, width, 1, h), Conv(width, width, 3, h_out), Conv(width, 4 * width, 1, h_out)]
            if block == 0:
                out.append(Conv(c, 4 * width, 1, h_out, projection=True))
            c, h = 4 * width, h_out
    return out


def fc_flops(classes: int) -> int:
    return 2 * FEATURES * classes


def forward_flops(size: int, channels: int, classes: int) -> int:
    """Every conv forward + fc."""
    return sum(conv.flops for conv in convs(size, channels)) + fc_flops(classes)


def full_training_flops(size: int, channels: int, classes: int) -> int:
    """Forward + input gradients (all but the stem's: the image needs none) + weight gradients: 3F - stem."""
    return 3 * forward_flops(size, channels, classes) - stem(size, channels).flops


def head_only_training_flops(size: int, channels: int, classes: int) -> int:
    """Forward of the whole net + fc's weight gradient only (nothing below fc is trainable)."""
    return forward_flops(size, channels, classes) + fc_flops(classes)


def batchnorm_channels() -> int:
    """Channels of all 53 BatchNorms (each conv has one)."""
    return sum(conv.c_out for conv in convs(64, 1))


def parameters(channels: int, classes: int) -> int:
    """conv weights + BatchNorm scale and shift + fc weights and bias."""
    return sum(conv.weights for conv in convs(64, channels)) + 2 * batchnorm_channels() + FEATURES * classes + classes


def buffers() -> int:
    """BatchNorm running mean and variance per channel + one batch counter per BatchNorm."""
    return 2 * batchnorm_channels() + len(convs(64, 1))


def fp32_saved_bytes_per_image(size: int, channels: int) -> int:
    """Bytes autograd keeps per image for backward in fp32 (torchvision's in-place ReLUs):

    the input image (saved by conv1), every conv output (BatchNorm saves its input), every ReLU output (ReLU saves
    its output: after bn1, bn2 and, following the residual add, bn3 of each block, and after the stem's BN), the
    max-pool output (saved by the next convs) with its int64 indices, and the 2048 pooled features (saved by fc).
    The projection's BatchNorm output is only added to, so nothing saves it.
    """
    all_convs = convs(size, channels)
    conv_outputs = sum(conv.c_out * conv.h_out**2 for conv in all_convs)
    relu_outputs = sum(conv.c_out * conv.h_out**2 for conv in all_convs if not conv.projection)
    pool_side = out_side(all_convs[0].h_out, 2)
    pooled = 64 * pool_side**2
    floats = channels * size * size + conv_outputs + relu_outputs + pooled + FEATURES
    return 4 * floats + 8 * pooled
