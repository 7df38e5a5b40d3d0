"""The frozen pretrained model M of GALI-PT's ``M(...)`` slots (docs/method.md §2.4), loaded from a path.

Nothing is ever downloaded: ``method.feature_model`` names a local file, a TorchScript file (``torch.jit.save``, which
carries its own code) or a state dict read with ``torch.load(weights_only=True)`` for an architecture of
:data:`FEATURE_ARCHS` named by ``method.feature_arch``. ``svhn-multidigit`` is the public multi-digit SVHN recogniser
(docs/method.md [SVHNM], potterhsu/SVHNClassifier-PyTorch) cut at its 3072-d shared features (what GALI-PT's code feeds
D), input (B, 3, 54, 54) in [-1, 1]; its ``model-<step>.pth`` checkpoints load as they are, the digit heads dropped. The
loaded model is in eval mode (BatchNorm running statistics, Dropout off) with every parameter frozen; gradients still
flow to its input, as GALI-PT needs. The authors kept the SVHN net's Dropout active in training (docs/method.md §5 item
15): to do that, call ``.train()`` and put the BatchNorm layers back in eval.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gali.engine.errors import ConfigError, GaliError

# (out channels, max-pool stride) of the recogniser's eight conv blocks.
_SVHN_BLOCKS = ((48, 2), (64, 1), (128, 2), (160, 1), (192, 2), (192, 1), (192, 2), (192, 1))
_SVHN_HIDDEN = 3072


class SVHNMultiDigitFeatures(nn.Module):
    """The multi-digit SVHN recogniser up to its 3072-d shared features ('svhn-multidigit')."""

    input_size = 54
    # State-dict key prefixes of the recogniser that the feature model does not have.
    ignored_prefixes = ("_digit_length.", "_digit1.", "_digit2.", "_digit3.", "_digit4.", "_digit5.")

    def __init__(self) -> None:
        super().__init__()
        channels = 3
        for i, (out, pool_stride) in enumerate(_SVHN_BLOCKS, start=1):
            block = nn.Sequential(
                nn.Conv2d(channels, out, kernel_size=5, padding=2),
                nn.BatchNorm2d(out),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=2, stride=pool_stride, padding=1),
                nn.Dropout(0.2),
            )
            self.add_module(f"_hidden{i}", block)
            channels = out
        self._hidden9 = nn.Sequential(nn.Linear(channels * 7 * 7, _SVHN_HIDDEN), nn.ReLU())
        self._hidden10 = nn.Sequential(nn.Linear(_SVHN_HIDDEN, _SVHN_HIDDEN), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, 54, 54) images in [-1, 1] -> (B, 3072) features."""
        size = self.input_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(
                f"svhn-multidigit takes images of shape (B, 3, {size}, {size}), got {tuple(x.shape)}; "
                f"resize first (method.feature_input_size={size})"
            )
        for i in range(1, 9):
            x = getattr(self, f"_hidden{i}")(x)
        return self._hidden10(self._hidden9(x.flatten(1)))


FEATURE_ARCHS: dict[str, Callable[[], nn.Module]] = {"svhn-multidigit": SVHNMultiDigitFeatures}


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold a ``code/`` folder; ``torch.save`` archives do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _load_state_dict(path: Path, arch: str | None) -> nn.Module:
    if arch is None:
        raise ConfigError(
            "method.feature_arch",
            f"{path} is a state dict, not a TorchScript file, so its architecture must be named: "
            f"set method.feature_arch to one of {', '.join(FEATURE_ARCHS)}",
        )
    if arch not in FEATURE_ARCHS:
        raise ConfigError("method.feature_arch", f"got {arch!r}; accepted: {', '.join(FEATURE_ARCHS)}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or unsafe pickle: say which file
        raise ConfigError("method.feature_model", f"cannot read {path} as a state dict: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(
            "method.feature_model",
            f"{path} holds a {type(state).__name__}, not a state dict (a mapping of names to tensors)",
        )
    model = FEATURE_ARCHS[arch]()
    ignored = getattr(model, "ignored_prefixes", ())
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ConfigError(
            "method.feature_model",
            f"{path} does not match method.feature_arch={arch!r}: missing keys {missing}, unexpected keys {unexpected}",
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # right names, wrong shapes
        raise ConfigError("method.feature_model", f"{path} does not match {arch!r}: {exc}") from exc
    return model


def load_feature_model(path: str | Path, arch: str | None = None) -> nn.Module:
    """The frozen model M at ``path``: eval mode, no trainable parameters, on the CPU.

    ``path`` is a TorchScript file (``arch`` is then not needed and not used) or a state dict for
    the architecture ``arch`` (a key of :data:`FEATURE_ARCHS`). Raises :class:`ConfigError` naming
    ``method.feature_model`` or ``method.feature_arch`` when the file is missing or unreadable,
    the architecture is missing or unknown, or the keys do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            "method.feature_model",
            f"file {path} does not exist; give method.feature_model=/path/to/file "
            "(a TorchScript file, or a state dict with method.feature_arch); nothing is downloaded",
        )
    if _is_torchscript(path):
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise ConfigError("method.feature_model", f"cannot load TorchScript file {path}: {exc}") from exc
    else:
        model = _load_state_dict(path, arch)
    model.eval()
    for p in model.parameters():  # ScriptModules have no requires_grad_()
        p.requires_grad_(False)
    return model


@torch.no_grad()
def feature_dim(model: nn.Module, input_size: int) -> int:
    """Width of ``model``'s output per image, from one zero batch of (2, 3, s, s) images.

    The output must be one tensor whose first dimension is the batch; its remaining dimensions
    are counted together (the engine flattens them).
    """
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    reference = floats[0] if floats else torch.zeros(())
    x = torch.zeros(2, 3, input_size, input_size, device=reference.device, dtype=reference.dtype)
    out = model(x)
    if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the feature model must return one (B, ...) tensor per batch; for a (2, 3, {input_size}, "
            f"{input_size}) input it returned {shape}"
        )
    return out[0].numel()


def resize_images(x: Tensor, size: int, mode: str) -> Tensor:
    """``x`` resized to ``size``×``size`` (``F.interpolate``, 'nearest' or 'bilinear'); unchanged if 0 or equal.

    The one resize of images in front of a feature network: GALI-PT's M, feature-MSE's network and the
    FID/KID Inception.
    """
    if size == 0 or tuple(x.shape[2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False if mode == "bilinear" else None)


def resize_to(x: Tensor, size: int) -> Tensor:
    """The one rule for images moving between the networks' resolutions: bilinear, antialiased when shrinking.

    Real images are shrunk for a discriminator (or a generator's resolution, in reconstructions) that
    works below the data's resolution; G's outputs are enlarged for an encoder that sees a higher one
    (BigBiGAN's E at 256², G and D at 128²). Unchanged when already ``size``×``size``.
    """
    if tuple(x.shape[2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)


class FeatureModel(nn.Module):
    """A frozen feature network behind its input resize: images in [-1, 1] -> (B, D) features.

    ``input_size`` (0 = keep the images' size) and ``resize`` ('nearest' or 'bilinear') say how
    images reach ``network``; its output must be one tensor with the batch as its first dimension,
    whose other dimensions are flattened. ``name`` is how errors refer to it.
    """

    def __init__(
        self, network: nn.Module, *, input_size: int = 0, resize: str = "nearest", name: str = "the feature network"
    ) -> None:
        super().__init__()
        self.network = network
        self.input_size = input_size
        self.resize = resize
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        out = self.network(resize_images(x, self.input_size, self.resize))
        if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise GaliError(
                f"{self.name} must return one (B, D) or (B, ...) tensor per batch; for input {tuple(x.shape)} "
                f"(resized to {self.input_size or x.shape[-1]}) it returned {shape}"
            )
        return out.flatten(1)
