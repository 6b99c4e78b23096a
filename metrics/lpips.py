"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", version 0.1): the distance behind the DreamBooth paper's DIV.

The network, as in the reference ``lpips`` package (which this module does not need at run
time):

1. input images in ``[-1, 1]`` (RGB, ``[N, 3, H, W]``), shifted and scaled per channel by the
   constants of lpips' ``ScalingLayer`` (:data:`SHIFT`, :data:`SCALE`);
2. a torchvision backbone's ``features`` (AlexNet, as the paper and DreamBooth use, or
   VGG-16), tapped after five ReLUs;
3. each tapped map unit-normalised along its channels (``x / (||x||_2 + 1e-10)``);
4. per layer, the squared difference of the two images' maps through a learned 1x1 "lin"
   convolution (one output channel, no bias), averaged over space;
5. the sum over the five layers.

The distance only ever compares the two images' step-3 features, so :class:`LpipsEncoder`
computes them once per image and then every pairwise distance from them (exact, not an
approximation).

Weights: ONE safetensors file with the state dict of :class:`LpipsNetwork`:
``features.<i>.weight`` / ``features.<i>.bias`` (the torchvision ``features`` convolutions, by
their index in ``torchvision.models.alexnet().features``; VGG-16 likewise) and
``lin.<k>.weight`` (``[1, C_k, 1, 1]``, k = 0..4), with the metadata ``format``
(:data:`FILE_FORMAT`), ``net`` (``alex`` | ``vgg``) and ``version`` (``0.1``).
``python -m metrics lpips-convert --out lpips_alex.safetensors`` builds it (:func:`convert`)
from the ``lpips`` package's ``weights/v0.1/alex.pth`` and torchvision's ImageNet AlexNet,
both read with ``torch.load(weights_only=True)``. ``"tiny"`` instead of a file is a seeded
random AlexNet with non-negative random lin weights, for tests and the tiny preset.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

from metrics.encoders import _file_sha256, _first_line, _safetensors_file, _seeded, resolve_device
from metrics.errors import MetricsInputError, WeightsUnavailableError
from metrics.images import ImageInput, load_image

__all__ = [
    "FILE_FORMAT",
    "NETS",
    "SCALE",
    "SHIFT",
    "TINY_LPIPS",
    "LpipsEncoder",
    "LpipsNetwork",
    "convert",
    "convert_state_dict",
    "load_lpips",
    "lpips_lin_state",
    "torchvision_backbone_state",
]

TINY_LPIPS = "tiny"
FILE_FORMAT = "metrics-lpips"
LPIPS_VERSION = "0.1"
# lpips.ScalingLayer: maps [-1, 1] inputs to the ImageNet statistics the backbone expects.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10  # lpips.normalize_tensor


def _alexnet_features() -> list[nn.Module]:
    """``torchvision.models.alexnet().features`` without the final max-pool (built here: the
    torchvision constructor would also initialise the 57M-parameter classifier)."""
    return [
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    ]


def _vgg16_features() -> list[nn.Module]:
    """``torchvision.models.vgg16().features`` without the final max-pool."""
    from torchvision.models.vgg import cfgs, make_layers

    return list(make_layers(cfgs["D"], batch_norm=False).children())[:-1]


@dataclass(frozen=True)
class _Net:
    """A backbone: its ``features`` layers (torchvision's indices), the indices tapped (each a
    ReLU) and their channels, and the URL of torchvision's ImageNet weights
    (``IMAGENET1K_V1``, what lpips loads)."""

    layers: Callable[[], list[nn.Module]]
    taps: tuple[int, ...]
    channels: tuple[int, ...]
    url: str


NETS: dict[str, _Net] = {
    "alex": _Net(
        _alexnet_features,
        (1, 4, 7, 9, 11),
        (64, 192, 384, 256, 256),
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    ),
    "vgg": _Net(
        _vgg16_features,
        (3, 8, 15, 22, 29),
        (64, 128, 256, 512, 512),
        "https://download.pytorch.org/models/vgg16-397923af.pth",
    ),
}


def _net(net: str) -> _Net:
    if net not in NETS:
        raise WeightsUnavailableError(f"unknown LPIPS network {net!r}; use one of {sorted(NETS)}")
    return NETS[net]


class LpipsNetwork(nn.Module):
    """LPIPS v0.1 on a torchvision backbone (``net``: ``"alex"`` or ``"vgg"``).

    ``forward(x, y)`` takes two ``[N, 3, H, W]`` batches in ``[-1, 1]`` and returns the ``[N]``
    distances; :meth:`layer_features` and :meth:`feature_distance` are its two halves.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        spec = _net(net)
        self.net = net
        self.features = nn.Sequential(*spec.layers())
        for module in self.features:
            if isinstance(module, nn.ReLU):
                module.inplace = False  # a tapped output must not be changed afterwards
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in spec.channels)
        self.taps = spec.taps
        # Constants, not weights: left out of the state dict (and of the weights file).
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five channel-normalised feature maps of ``x`` (``[N, 3, H, W]`` in ``[-1, 1]``)."""
        h = (x - self.shift) / self.scale
        out = []
        for index, module in enumerate(self.features):
            h = module(h)
            if index in self.taps:
                norm = torch.sqrt(torch.sum(h**2, dim=1, keepdim=True))
                out.append(h / (norm + _EPS))
        return out

    def feature_distance(
        self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """``[N]`` distances between rows of two :meth:`layer_features` outputs."""
        total = torch.zeros(a[0].shape[0], device=a[0].device, dtype=a[0].dtype)
        for lin, fa, fb in zip(self.lin, a, b, strict=True):
            total = total + lin((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[N]`` LPIPS distances between ``x[i]`` and ``y[i]`` (both in ``[-1, 1]``)."""
        return self.feature_distance(self.layer_features(x), self.layer_features(y))


def _image_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> ``[3, H, W]`` float in ``[-1, 1]`` (LPIPS' convention)."""
    return pil_to_tensor(image).float().div(127.5).sub(1.0)


class LpipsEncoder:
    """LPIPS distances among images: features once per image, then every pair from them.

    Images (paths or PIL) are read as RGB at their own size; a set whose sizes differ is
    resized (bicubic) to the smallest width and the smallest height among them, since LPIPS
    compares maps of equal size. Attributes: ``id`` (which weights: ``"tiny:seed=<n>"`` or
    ``"<file name>@sha256:<12 hex>"``), ``device``, ``batch_size``.
    """

    def __init__(
        self, model: LpipsNetwork, *, weights_id: str, device: torch.device, batch_size: int = 16
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.to(device).eval()
        self.id = weights_id
        self.device = device
        self.batch_size = batch_size

    def _pixels(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        loaded = [load_image(image) for image in images]
        size = (min(i.width for i in loaded), min(i.height for i in loaded))
        resized = [
            i if i.size == size else i.resize(size, Image.Resampling.BICUBIC) for i in loaded
        ]
        return [_image_tensor(image) for image in resized]

    def features(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """Per layer, the ``[N, C, H, W]`` normalised features of ``images`` (on ``device``)."""
        if not images:
            raise ValueError("features needs at least one image")
        pixels = self._pixels(images)
        layers: list[list[torch.Tensor]] = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                batch = torch.stack(pixels[start : start + self.batch_size]).to(self.device)
                layers.append(self.model.layer_features(batch))
        return [torch.cat(parts) for parts in zip(*layers, strict=True)]

    def pair_distances(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Distances of all ``n (n - 1) / 2`` unordered pairs ``(i < j)``, float64 on the CPU,
        in ``itertools.combinations`` order. Needs at least two images."""
        if len(images) < 2:
            raise MetricsInputError(f"LPIPS pairs need at least 2 images, got {len(images)}")
        feats = self.features(images)
        pairs = list(itertools.combinations(range(len(images)), 2))
        out = []
        with torch.inference_mode():
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start : start + self.batch_size]
                left = torch.tensor([i for i, _ in chunk], device=self.device)
                right = torch.tensor([j for _, j in chunk], device=self.device)
                a, b = [f[left] for f in feats], [f[right] for f in feats]
                out.append(self.model.feature_distance(a, b).double().cpu())
        return torch.cat(out)

    def mean_pair_distance(self, images: Sequence[ImageInput]) -> float:
        """DIV of one prompt: the mean LPIPS distance over its images' unordered pairs."""
        return float(self.pair_distances(images).mean())

    def distance(self, a: ImageInput, b: ImageInput) -> float:
        """The LPIPS distance between two images."""
        return float(self.pair_distances([a, b])[0])


def load_lpips(
    ref: str, device: str | torch.device = "cpu", *, batch_size: int = 16, seed: int = 0
) -> LpipsEncoder:
    """The LPIPS encoder of ``ref``: a ``.safetensors`` file (see the module docstring) or
    ``"tiny"`` (a seeded random AlexNet, non-negative random lin weights).

    Raises:
        WeightsUnavailableError: the file is missing, not safetensors or does not fit.
    """
    torch_device = resolve_device(device)
    if ref == TINY_LPIPS:
        with _seeded(seed):
            model = LpipsNetwork("alex")
            for weight in model.lin.parameters():
                # Trained lin weights are >= 0 (lpips clamps them): so the distances are.
                nn.init.uniform_(weight, 0.0, 1.0)
        return LpipsEncoder(
            model, weights_id=f"tiny:seed={seed}", device=torch_device, batch_size=batch_size
        )
    path = _safetensors_file(ref, "LPIPS")
    model = _model_from_file(path)
    weights_id = f"{path.name}@sha256:{_file_sha256(path)[:12]}"
    return LpipsEncoder(model, weights_id=weights_id, device=torch_device, batch_size=batch_size)


def _model_from_file(path: Path) -> LpipsNetwork:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        net = metadata.get("net", "alex")
        model = LpipsNetwork(net)
        model.load_state_dict(load_file(str(path)), strict=True)
    except (RuntimeError, ValueError, KeyError, SafetensorError) as exc:
        raise WeightsUnavailableError(
            f"LPIPS weights {path} do not fit LPIPS ({_first_line(exc)}); build the file with "
            "`python -m metrics lpips-convert`"
        ) from None
    return model


# --- conversion (user side: the lpips package's lin weights + torchvision's backbone) ---


def convert_state_dict(state: Mapping[str, torch.Tensor], net: str = "alex") -> dict[str, Any]:
    """Our state dict (``features.<i>.*``, ``lin.<k>.weight``) from the reference's keys.

    Accepts, in one mapping or several merged: this module's own keys, torchvision's
    ``features.<i>.weight|bias``
    (``classifier.*`` is ignored), the ``lpips.LPIPS`` module's ``net.slice<s>.<i>.*`` (its
    slices keep torchvision's indices) and ``lin<k>.model.<m>.weight`` / ``lins.<k>...``
    (``m`` is 1 behind lpips' dropout, 0 without), and lpips' ``scaling_layer.*`` constants
    (checked, not kept).

    Raises:
        WeightsUnavailableError: an unknown key, a missing one or a wrong shape.
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        target = _target_key(key, value)
        if target is not None:
            out[target] = value.detach().to("cpu", torch.float32).contiguous()
    expected = LpipsNetwork(net).state_dict()
    missing = sorted(set(expected) - set(out))
    if missing:
        raise WeightsUnavailableError(f"LPIPS weights lack {missing[:4]} (net {net!r})")
    for key, tensor in expected.items():
        if tuple(out[key].shape) != tuple(tensor.shape):
            raise WeightsUnavailableError(
                f"LPIPS weight {key} has shape {tuple(out[key].shape)}, expected "
                f"{tuple(tensor.shape)} (net {net!r})"
            )
    return {key: out[key] for key in expected}


def _target_key(key: str, value: torch.Tensor) -> str | None:
    """Our key for one reference key (``None``: not a weight we keep)."""
    parts = key.split(".")
    if parts[0] == "classifier":
        return None
    if parts[0] == "scaling_layer":
        constants = SHIFT if parts[1] == "shift" else SCALE
        if not torch.allclose(value.flatten().float(), torch.tensor(constants)):
            raise WeightsUnavailableError(f"{key} differs from lpips v0.1's constants")
        return None
    if parts[0] in ("features", "lin") and len(parts) == 3:
        return key  # torchvision's backbone names, or this module's own
    if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
        return f"features.{parts[2]}.{parts[3]}"
    if parts[0].startswith("lin") and parts[-1] == "weight" and parts[-3] == "model":
        index = parts[1] if parts[0] == "lins" else parts[0].removeprefix("lin")
        if index.isdigit():
            return f"lin.{index}.weight"
    raise WeightsUnavailableError(f"unexpected key {key!r} in the LPIPS source weights")


def lpips_lin_state(net: str = "alex", path: str | Path | None = None) -> dict[str, Any]:
    """The lin weights of lpips v0.1: ``path``, or the installed ``lpips`` package's
    ``weights/v0.1/<net>.pth`` (read with ``torch.load(weights_only=True)``)."""
    if path is None:
        try:
            import lpips
        except ImportError:
            raise WeightsUnavailableError(
                "the lpips package is not installed (pip install lpips), or pass --lin PATH"
            ) from None
        path = Path(lpips.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / f"{net}.pth"
    return _torch_load(Path(path), "lpips lin")


def torchvision_backbone_state(net: str = "alex", path: str | Path | None = None) -> dict[str, Any]:
    """torchvision's ImageNet weights of the backbone (``IMAGENET1K_V1``, what lpips uses):
    ``path``, or torch hub's cache, downloading once (hash checked)."""
    if path is not None:
        return _torch_load(Path(path), "torchvision backbone")
    try:
        state: dict[str, Any] = torch.hub.load_state_dict_from_url(
            _net(net).url, map_location="cpu", check_hash=True, weights_only=True
        )
    except Exception as exc:  # offline and not cached, network errors, a bad download
        raise WeightsUnavailableError(
            f"torchvision's {net} weights are unavailable ({_first_line(exc)}); run once with "
            "network access or pass --backbone PATH (the .pth file)"
        ) from None
    return state


def _torch_load(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsUnavailableError(f"{what} weights file not found: {path}")
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a weights-only checkpoint, damaged file
        raise WeightsUnavailableError(
            f"cannot read {what} weights {path} ({_first_line(exc)})"
        ) from None
    return state


def convert(
    out: str | Path,
    net: str = "alex",
    *,
    lin: str | Path | None = None,
    backbone: str | Path | None = None,
    lin_source: Callable[..., dict[str, Any]] | None = None,
    backbone_source: Callable[..., dict[str, Any]] | None = None,
) -> Path:
    """Write the LPIPS weights file ``out`` (safetensors) from the reference's weights.

    ``lin`` / ``backbone``: local files instead of the lpips package's and torch hub's. The
    file's metadata records the sources' sha256. Returns ``out``.
    """
    from safetensors.torch import save_file

    lin_state = (lin_source or lpips_lin_state)(net, lin)
    backbone_state = (backbone_source or torchvision_backbone_state)(net, backbone)
    state = convert_state_dict({**backbone_state, **lin_state}, net)
    path = Path(out)
    if path.suffix.lower() != ".safetensors":
        raise WeightsUnavailableError(f"the LPIPS weights file must end in .safetensors: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FILE_FORMAT,
        "net": net,
        "version": LPIPS_VERSION,
        "lin_sha256": _state_sha256(lin_state),
        "backbone_sha256": _state_sha256(backbone_state),
    }
    save_file(state, str(path), metadata=metadata)
    return path


def _state_sha256(state: Mapping[str, Any]) -> str:
    """A content hash of a state dict (names, shapes and values), for the file's metadata."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
