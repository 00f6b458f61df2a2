"""The two networks of the engine: small 3-D U-Nets, the second with a classification head.

Tensors are ``(N, C, z, y, x)`` float32. Spatial sizes must be multiples of ``2 ** (depth - 1)``
(the tiling pads to the patch size, which is such a multiple).

* Stage 1 (localiser): ``UNet3d(out_channels=2)`` on a coarse grid (e.g. 4 mm isotropic);
  output ``seg`` logits for background / pancreas.
* Stage 2 (detector): ``UNet3d(out_channels=3, cls_head=True)`` on a pancreas-centred crop at fine
  spacing; outputs ``seg`` logits for background / pancreas / lesion and ``cls``, a ``(N, 1)``
  logit that the window holds a PDAC.  The head pools the bottleneck features (max and mean) and
  the peak lesion logit, as the PANDA stage 2 and the PANORAMA baseline's "case score = max
  candidate" do.

Nothing here touches a GPU or compiles at import time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pdacscreen.engine.errors import EngineInputError

__all__ = ["NetworkSpec", "UNet3d", "build_network"]


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of one stage (stored in model.json under ``stages.<name>.network``)."""

    arch: str = "unet3d"
    in_channels: int = 1
    out_channels: int = 2
    base: int = 8
    depth: int = 3
    max_channels: int = 64
    cls_head: bool = False

    def __post_init__(self) -> None:
        if self.arch != "unet3d":
            raise EngineInputError(f"network.arch must be 'unet3d', got {self.arch!r}")
        for name in ("in_channels", "out_channels", "base", "depth", "max_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EngineInputError(f"network.{name} must be a positive integer, got {value!r}")
        if self.cls_head and self.out_channels < 2:
            raise EngineInputError("network.cls_head needs out_channels >= 2 (a lesion channel)")

    @property
    def divisor(self) -> int:
        """Every spatial size fed to the network must be a multiple of this."""
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NetworkSpec:
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise EngineInputError(
                f"network has unknown fields {unknown}; allowed {sorted(allowed)}"
            )
        return cls(**data)


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel_size=3, stride=stride, padding=1),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class UNet3d(nn.Module):
    """A compact 3-D U-Net (strided-conv down, transposed-conv up, instance norm, leaky ReLU).

    ``forward(x)`` takes ``(N, in_channels, z, y, x)`` and returns ``seg`` logits
    ``(N, out_channels, z, y, x)``, or ``(seg, cls)`` with ``cls`` of shape ``(N, 1)`` when the
    spec has a classification head.
    """

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        chans = [min(spec.base * 2**level, spec.max_channels) for level in range(spec.depth)]
        self.encoders = nn.ModuleList()
        for level, c in enumerate(chans):
            cin = spec.in_channels if level == 0 else chans[level - 1]
            stride = 1 if level == 0 else 2
            self.encoders.append(nn.Sequential(_block(cin, c, stride), _block(c, c)))
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(spec.depth - 1, 0, -1):
            self.ups.append(nn.ConvTranspose3d(chans[level], chans[level - 1], 2, stride=2))
            self.decoders.append(
                nn.Sequential(
                    _block(2 * chans[level - 1], chans[level - 1]),
                    _block(chans[level - 1], chans[level - 1]),
                )
            )
        self.seg_head = nn.Conv3d(chans[0], spec.out_channels, kernel_size=1)
        if spec.cls_head:
            self.cls_head = nn.Sequential(
                nn.Linear(2 * chans[-1] + 1, 16), nn.LeakyReLU(0.01), nn.Linear(16, 1)
            )
        else:
            self.cls_head = None

    def forward(self, x: torch.Tensor):  # noqa: D401 - see class docstring
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        bottleneck = x
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips[:-1]), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        seg = self.seg_head(x)
        if self.cls_head is None:
            return seg
        flat = bottleneck.flatten(2)
        lesion_peak = (seg[:, -1] - seg[:, 0]).flatten(1).amax(dim=1, keepdim=True)
        pooled = torch.cat([flat.amax(dim=2), flat.mean(dim=2), lesion_peak], dim=1)
        return seg, self.cls_head(pooled)


def build_network(spec: NetworkSpec | dict) -> UNet3d:
    """Build an (untrained) network from a spec or its model.json dict."""
    if isinstance(spec, dict):
        spec = NetworkSpec.from_dict(spec)
    return UNet3d(spec)
