"""The frozen model M of GALI-PT: TorchScript and state-dict loading, errors, frozen but differentiable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gali.engine.errors import ConfigError
from gali.engine.nets.feature_models import SVHNMultiDigitFeatures, feature_dim, load_feature_model

# TorchScript is deprecated in recent torch, but it is one of the formats M comes in.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning")


def _small_scripted(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 10)
    )
    model.eval()
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return model, path


def test_torchscript_round_trip(tmp_path: Path) -> None:
    model, path = _small_scripted(tmp_path)
    loaded = load_feature_model(path)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert not loaded.training
    assert feature_dim(loaded, 16) == 10


@pytest.fixture(scope="module")
def svhn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A recogniser-style checkpoint: the feature layers plus the digit heads, random weights."""
    torch.manual_seed(0)
    model = SVHNMultiDigitFeatures()
    state = model.state_dict()
    for name, classes in (("_digit_length", 7), *((f"_digit{i}", 11) for i in range(1, 6))):
        state[f"{name}.0.weight"] = torch.randn(classes, 3072)
        state[f"{name}.0.bias"] = torch.randn(classes)
    path = tmp_path_factory.mktemp("svhn") / "model-100.pth"
    torch.save(state, path)
    return model.eval(), path


def test_svhn_multidigit_state_dict_round_trip(svhn_checkpoint: tuple[nn.Module, Path]) -> None:
    model, path = svhn_checkpoint
    loaded = load_feature_model(path, "svhn-multidigit")
    x = torch.rand(2, 3, 54, 54) * 2 - 1
    assert torch.equal(loaded(x), model(x))
    assert feature_dim(loaded, 54) == 3072
    with pytest.raises(ValueError, match=r"\(B, 3, 54, 54\).*\(2, 3, 32, 32\)"):
        loaded(torch.zeros(2, 3, 32, 32))


def test_svhn_multidigit_module_names_match_the_recogniser() -> None:
    model = SVHNMultiDigitFeatures()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [48, 64, 128, 160, 192, 192, 192, 192]
    assert {(c.kernel_size, c.padding) for c in convs} == {((5, 5), (2, 2))}
    pools = [m.stride for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert pools == [2, 1, 2, 1, 2, 1, 2, 1]
    assert all(m.p == 0.2 for m in model.modules() if isinstance(m, nn.Dropout))
    keys = set(model.state_dict())
    assert {"_hidden1.0.weight", "_hidden1.1.running_mean", "_hidden8.1.num_batches_tracked"} <= keys
    assert {"_hidden9.0.weight", "_hidden10.0.bias"} <= keys
    assert model._hidden9[0].in_features == 192 * 7 * 7


def test_missing_file_says_how_to_give_one(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pt"
    with pytest.raises(ConfigError, match=r"method\.feature_model.*nowhere\.pt.*method\.feature_model=/path/to/file"):
        load_feature_model(path)


def test_state_dict_needs_a_named_architecture(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ConfigError, match=r"method\.feature_arch.*svhn-multidigit"):
        load_feature_model(path)
    with pytest.raises(ConfigError, match=r"method\.feature_arch.*'resnet'.*accepted: svhn-multidigit"):
        load_feature_model(path, "resnet")


def test_key_mismatch_lists_missing_and_unexpected_keys(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ConfigError, match=r"missing keys \['_hidden1\.0\.bias'.*unexpected keys \['bias', 'weight'\]"):
        load_feature_model(path, "svhn-multidigit")


def test_not_a_state_dict_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ConfigError, match="not a state dict"):
        load_feature_model(path, "svhn-multidigit")
    path.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="cannot read"):
        load_feature_model(path, "svhn-multidigit")


def test_frozen_but_gradients_reach_the_input(tmp_path: Path) -> None:
    _, path = _small_scripted(tmp_path)
    model = load_feature_model(path)
    assert all(not p.requires_grad for p in model.parameters())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    model(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_feature_dim_wants_one_tensor(tmp_path: Path) -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(ValueError, match="one \\(B, \\.\\.\\.\\) tensor"):
        feature_dim(Pair(), 8)
    assert feature_dim(nn.Conv2d(3, 5, 8), 8) == 5  # (B, 5, 1, 1) counts as 5
