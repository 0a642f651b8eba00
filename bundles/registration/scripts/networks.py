"""Symmetric gradient-field registration network (Estienne et al., Learn2Reg 2020), from MONAI blocks.

The decoder predicts, per axis, the *spatial gradient* of the sampling grid through a sigmoid;
the grid is the cumulative sum of those gradients along each axis, so every axis mapping is
strictly increasing (no folding along an axis by construction). A zero-initialised head gives
sigmoid(0) = 0.5 everywhere, which this module scales to a step of exactly one voxel: the
identity transform at the start of training. With ``head_type="displacement"`` (the CPU recipe) the same
heads predict the displacement itself, which short trainings learn several times faster.

A network records its settings in its state dict (``scripts.settings``), so a checkpoint says which
network it belongs to: ``scripts.weights.network_from_checkpoint`` builds it, and loading it into a
network with other settings fails with the settings that differ.

Conventions (shared with every network of the bundle, so warping, losses and metrics are shared):
input is one tensor (B, 2*C, D, H, W) with the moving channels first, then the fixed channels;
output is a dense displacement field (B, 3, D, H, W) in voxel units of the fixed grid,
``warped(x) = moving(x + ddf(x))`` as ``monai.networks.blocks.Warp`` applies it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from scripts.settings import records_settings

__all__ = ["GradientRegNet", "gradient_to_ddf", "IDENTITY_GRADIENT", "HEAD_TYPES", "input_windows_of"]

# sigmoid(0): the gradient value of the identity transform (scaled to one voxel per voxel).
IDENTITY_GRADIENT = 0.5

# What the heads predict (GradientRegNet ``head_type``): the paper's sigmoid gradient, integrated by a cumulative
# sum, or the displacement itself (VoxelMorph's plain field).
HEAD_TYPES = ("gradient", "displacement")


def gradient_to_ddf(gradient: torch.Tensor, step_range: float = 1.0) -> torch.Tensor:
    """Integrate a gradient field (B, 3, *spatial) in (0, 1) to a voxel displacement field.

    Channel ``i`` is the step of the sampling position along spatial axis ``i`` between consecutive
    voxels, in units of half a voxel (so 0.5 is a one-voxel step). The sampling position of voxel
    ``k`` along axis ``i`` is ``p_i(k) = sum_{j<=k} 2 g_i(j) - 1``, so a constant 0.5 gives
    ``p_i(k) = k`` exactly (the identity; the paper's grid rescaled to [-1, 1] is this ``p``
    under ``align_corners=True``), and ``ddf_i(k) = p_i(k) - k``.

    ``step_range`` r < 1 narrows the step to ``1 + r (2 g - 1)``, in (1 - r, 1 + r) voxels, so a
    small change of the sigmoid moves far voxels less (the cumulative sum adds it up along the axis);
    1 is the paper's (0, 2). The identity stays at g = 0.5 and every step stays positive.
    """
    spatial = gradient.shape[2:]
    if gradient.shape[1] != len(spatial):
        raise ValueError(f"gradient needs one channel per spatial axis, got shape {tuple(gradient.shape)}")
    out = []
    for axis, size in enumerate(spatial):
        g = gradient[:, axis]
        step = 2.0 * g if step_range == 1.0 else 1.0 + step_range * (2.0 * g - 1.0)
        pos = torch.cumsum(step, dim=axis + 1) - 1.0
        shape = [1] * len(spatial)
        shape[axis] = size
        idx = torch.arange(size, device=gradient.device, dtype=pos.dtype).view(1, *shape)
        out.append(pos - idx)
    return torch.stack(out, dim=1)


class _ConvStack(nn.Module):
    """``n`` 3x3x3 conv + norm + act blocks with a residual add around them (a V-Net stage)."""

    def __init__(self, channels: int, n: int, norm, act, first_in: int | None = None) -> None:
        super().__init__()
        first_in = channels if first_in is None else first_in
        self.proj = (
            nn.Identity()
            if first_in == channels
            else Convolution(3, first_in, channels, kernel_size=1, conv_only=True)
        )
        layers = [
            Convolution(3, first_in if i == 0 else channels, channels, kernel_size=3, norm=norm, act=act)
            for i in range(max(n, 1))
        ]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x) + self.proj(x)


class _Down(nn.Module):
    """2x2x2 stride-2 conv, then ``n`` 3x3x3 convs with a residual add."""

    def __init__(self, cin: int, cout: int, n: int, norm, act) -> None:
        super().__init__()
        self.down = Convolution(3, cin, cout, strides=2, kernel_size=2, padding=0, norm=norm, act=act)
        self.stack = _ConvStack(cout, n, norm, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(self.down(x))


class _Up(nn.Module):
    """2x2x2 stride-2 transposed conv, concatenation with the merged skip, ``n`` 3x3x3 convs."""

    def __init__(self, cin: int, cout: int, n: int, norm, act) -> None:
        super().__init__()
        self.up = Convolution(
            3,
            cin,
            cout,
            strides=2,
            kernel_size=2,
            padding=0,
            output_padding=0,
            norm=norm,
            act=act,
            is_transposed=True,
        )
        self.stack = _ConvStack(cout, n, norm, act, first_in=2 * cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.stack(torch.cat([self.up(x), skip], dim=1))


@records_settings
class GradientRegNet(nn.Module):
    """Shared-weight encoder, subtraction merge (moving - fixed) at every scale, sigmoid gradient heads.

    The defaults are the recommended network (``train.json``'s): width 4 with the field predicted at half
    resolution; the paper's is ``channel_multiplier=8, downsample=1`` (``configs/paper_train.json``). The
    constructor's arguments are recorded in the state dict (``scripts.settings``).

    Args:
        in_channels: channels of ONE image (3 with the three CT windows, 1 without).
        channel_multiplier: widths are ``base_channels`` times this (4; 8 in the paper).
        base_channels: widths of the input block and the 4 down levels.
        blocks_per_level: 3x3x3 convs after each stride-2 conv (encoder; decoder mirrors them).
        deep_supervision: in training mode also return the fields of the coarser decoder levels.
        symmetric: in training mode also return the fixed->moving field (merge order swapped).
        downsample: predict the field on a grid this many times coarser (input average-pooled) and
            upsample it trilinearly: 2 (the default) costs about 1/8 of the time and memory of 1 (the paper's).
        step_range: the integrated step is ``1 + step_range (2 g - 1)`` voxels (1, the paper: (0, 2));
            see ``gradient_to_ddf``. It changes the field, so inference must use the training value.
        head_type: what the heads predict: "gradient" (the paper: the sigmoid step of the sampling grid along
            each axis, integrated by a cumulative sum; no folding along an axis) or "displacement" (the
            field itself, in voxels of the prediction grid, as VoxelMorph's; zero-initialised heads still
            start at the identity). With "gradient" a head's change at one voxel moves every later voxel
            of the axis, which made short CPU trainings learn slowly (the repository's
            docs/experiments/registration.md, "Training recipe for CPU budgets"); "displacement" changes only its
            neighbourhood. The regulariser then falls back to ``RegistrationLoss``'s field loss (bending energy).
            It changes the field: inference must use the training value.
        supervised_levels: with deep supervision, how many decoder levels (finest first) return a field;
            ``None`` = all (the paper). Unused heads stay in the state dict, so checkpoints load either way.
        norm, act: MONAI layer factory names.
        input_windows: the CT windows (width, level) of the ``in_channels`` input channels, recorded with the
            settings so that inference windows its inputs as training did (None: not recorded).
        input_pixdim, input_spatial_size: the voxel spacing (mm) and grid of the training scans, recorded so
            that inference puts raw scans on the grid the network learned on (None: not recorded).
        pseudo_channels: organ channels read after each image's windows: the one-hot predicted labels of the
            segmentation bundle (organs 1..pseudo_channels), so the network sees anatomy it cannot find in the
            intensities; 0 (the default and the paper): images only.

    ``forward`` returns the ddf tensor in eval mode. In training mode it returns a dict:
    ``ddf`` (finest level), ``ddfs`` (one per supervised level, finest first, at the input's
    resolution) and ``gradients`` (the same levels on the prediction grid, i.e. 1/``downsample``),
    and with ``symmetric`` the same three under ``*_sym`` for fixed->moving
    (``warped_fixed(x) = fixed(x + ddf_sym(x))`` on the moving grid).
    """

    # recorded as normalised below (``scripts.settings.records_settings``)
    settings_as_attributes = (
        "downsample", "step_range", "input_windows", "input_pixdim", "input_spatial_size", "pseudo_channels",
    )  # fmt: skip

    def __init__(
        self,
        in_channels: int = 3,
        channel_multiplier: int = 4,
        base_channels: Sequence[int] = (4, 8, 16, 32, 64),
        blocks_per_level: Sequence[int] = (1, 2, 3, 2),
        deep_supervision: bool = True,
        symmetric: bool = False,
        downsample: int = 2,
        step_range: float = 1.0,
        supervised_levels: int | None = None,
        head_type: str = "gradient",
        norm: str | tuple = "INSTANCE",
        act: str | tuple = "RELU",
        input_windows: Sequence[Sequence[float]] | None = None,
        input_pixdim: Sequence[float] | None = None,
        input_spatial_size: Sequence[int] | None = None,
        pseudo_channels: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < step_range <= 1.0:
            raise ValueError(f"step_range must be in (0, 1] (steps stay positive), got {step_range}")
        if len(base_channels) != len(blocks_per_level) + 1:
            raise ValueError("base_channels needs one more entry than blocks_per_level (the input block)")
        if int(downsample) < 1:
            raise ValueError(f"downsample must be a positive integer, got {downsample}")
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
        if input_windows is not None and len(input_windows) != in_channels:
            raise ValueError(f"{len(input_windows)} input_windows for in_channels {in_channels}")
        self.head_type = head_type
        self.input_windows = [[float(v) for v in w] for w in input_windows] if input_windows else None
        self.input_pixdim = [float(v) for v in input_pixdim] if input_pixdim else None
        self.input_spatial_size = [int(v) for v in input_spatial_size] if input_spatial_size else None
        ch = [int(c * channel_multiplier) for c in base_channels]
        self.in_channels = in_channels
        self.pseudo_channels = int(pseudo_channels)
        self.deep_supervision = deep_supervision
        self.symmetric = symmetric
        self.downsample = int(downsample)
        self.step_range = float(step_range)
        self.supervised_levels = (
            len(blocks_per_level) if supervised_levels is None else int(supervised_levels)
        )
        self.factor = 2 ** len(blocks_per_level)
        # encoder (shared by moving and fixed)
        self.input_block = _ConvStack(ch[0], 2, norm, act, first_in=in_channels + self.pseudo_channels)
        self.down = nn.ModuleList(
            _Down(ch[i], ch[i + 1], n, norm, act) for i, n in enumerate(blocks_per_level)
        )
        # decoder: from the deepest level up, mirroring the encoder's conv counts
        levels = len(blocks_per_level)
        self.up = nn.ModuleList(
            _Up(ch[i + 1], ch[i], blocks_per_level[i], norm, act) for i in reversed(range(levels))
        )
        # one gradient head per decoder output (coarsest first); only the last one without deep supervision
        head_ch = [ch[i] for i in reversed(range(levels))]
        self.heads = nn.ModuleList(Convolution(3, c, 3, kernel_size=3, conv_only=True) for c in head_ch)
        for head in self.heads:  # zero init: every level starts at the identity
            nn.init.zeros_(head.conv.weight)
            nn.init.zeros_(head.conv.bias)

    def encode_merged(self, pair: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features of (moving; fixed) stacked on the batch axis, merged (moving - fixed) per
        level as soon as the level is computed, so the unmerged features of one level at a time are
        held (not all of them: the full-resolution level is the largest tensor of the network)."""
        b = pair.shape[0] // 2
        x = self.input_block(pair)
        merged = [x[:b] - x[b:]]
        for block in self.down:
            x = block(x)
            merged.append(x[:b] - x[b:])
        return merged

    def decode(self, merged: list[torch.Tensor], size: Sequence[int], all_levels: bool) -> list[torch.Tensor]:
        """Head outputs (gradient fields, or displacements with ``head_type`` "displacement") on the prediction
        grid (finest first), cropped to ``size`` (its unpadded part)."""
        x = merged[-1]
        grads = []
        n = len(self.up)
        for k, (up, head) in enumerate(zip(self.up, self.heads, strict=True)):
            x = up(x, merged[n - 1 - k])
            if k == n - 1 or (all_levels and k >= n - self.supervised_levels):
                g = torch.sigmoid(head(x)) if self.head_type == "gradient" else head(x)
                if g.shape[2:] != merged[0].shape[2:]:
                    g = F.interpolate(g, size=merged[0].shape[2:], mode="trilinear", align_corners=False)
                grads.append(g[(..., *[slice(0, s) for s in size])])
        return grads[::-1]

    def _displacement(self, head_field: torch.Tensor) -> torch.Tensor:
        """A head's output on the prediction grid -> displacement in voxels of that grid (the cumulative sum
        of gradient heads; displacement heads as they are)."""
        return gradient_to_ddf(head_field, self.step_range) if self.head_type == "gradient" else head_field

    def _padding(self, size: Sequence[int]) -> list[int]:
        """Padding at the end of each axis so the prediction grid is a multiple of 2**levels, and at least
        2 voxels at the deepest level (instance norm needs them)."""
        pad = []
        for s in size:
            coarse = -(-int(s) // self.downsample)
            coarse = max(coarse + (-coarse) % self.factor, 2 * self.factor)
            pad.append(coarse * self.downsample - int(s))
        return pad

    def _to_input_grid(self, ddf: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """A field of the prediction grid in voxels of the input grid, cropped to ``size``.

        With ``downsample`` k, coarse voxel j is the mean of fine voxels kj..kj+k-1 (centre kj + (k-1)/2),
        which is where trilinear upsampling with ``align_corners=False`` puts it; one coarse voxel is k
        fine ones.
        """
        if self.downsample > 1:
            ddf = F.interpolate(
                ddf * float(self.downsample),
                scale_factor=self.downsample,
                mode="trilinear",
                align_corners=False,
            )
        return ddf[(..., *[slice(0, s) for s in size])]

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[int], Sequence[int]]:
        """Merged encoder features of a (moving, fixed) input, the unpadded prediction grid and the input size."""
        c = self.in_channels + self.pseudo_channels
        if x.shape[1] != 2 * c:
            what = (
                f" ({self.in_channels} windows + {self.pseudo_channels} organs each)"
                if self.pseudo_channels
                else ""
            )
            raise ValueError(f"expected {2 * c} channels (moving then fixed{what}), got {x.shape[1]}")
        size = x.shape[2:]
        coarse = [-(-int(s) // self.downsample) for s in size]  # prediction grid before padding
        pad = self._padding(size)
        if any(pad):  # pad at the end of each axis; fields are cropped back
            x = F.pad(x, [p for s in reversed(pad) for p in (0, s)], mode="replicate")
        if self.downsample > 1:
            x = F.avg_pool3d(x, self.downsample)
        return self.encode_merged(torch.cat([x[:, :c], x[:, c:]], dim=0)), coarse, size  # shared weights

    def forward_and_inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both directions from one encoder pass (eval): the moving -> fixed field (``forward``'s) and the fixed ->
        moving one, decoded from the swapped merge as symmetric training trains it (``warped_fixed(x) =
        fixed(x + inverse(x))`` on the moving scan's grid)."""
        merged, coarse, size = self._encode(x)
        out = []
        for features in (merged, [-d for d in merged]):
            head = self.decode(features, coarse, False)[0]
            out.append(self._to_input_grid(self._displacement(head), size))
        return out[0], out[1]

    def forward(self, x: torch.Tensor):
        merged, coarse, size = self._encode(x)
        all_levels = self.training and self.deep_supervision
        grads = self.decode(merged, coarse, all_levels)
        if not self.training:
            del merged
            return self._to_input_grid(self._displacement(grads[0]), size)
        out = {"ddfs": [self._to_input_grid(self._displacement(g), size) for g in grads]}
        if self.head_type == "gradient":
            out["gradients"] = grads
        out["ddf"] = out["ddfs"][0]
        if self.symmetric:
            grads_sym = self.decode([-d for d in merged], coarse, all_levels)  # fixed - moving
            if self.head_type == "gradient":
                out["gradients_sym"] = grads_sym
            out["ddfs_sym"] = [self._to_input_grid(self._displacement(g), size) for g in grads_sym]
            out["ddf_sym"] = out["ddfs_sym"][0]
        return out


def input_windows_of(network: torch.nn.Module, default: Sequence[Sequence[float]]) -> list:
    """The CT windows a network reads: a ``GradientRegNet``'s recorded windows, else the first ``in_channels``
    of ``default``; ``default`` for any other network (a stand-in, a baseline)."""
    net = getattr(network, "module", network)
    windows = [list(w) for w in default]
    if not hasattr(net, "input_windows"):  # not a GradientRegNet
        return windows
    if net.input_windows:
        return [list(w) for w in net.input_windows]
    if net.in_channels > len(windows):
        raise ValueError(
            f"the network reads {net.in_channels} CT windows per scan, {len(windows)} given (ct_windows)"
        )
    return windows[: net.in_channels]
