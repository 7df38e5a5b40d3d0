"""The networks one run trains, as one object: G, E, D and, for GALI-PT specs, the frozen feature model M."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gali.engine.errors import ConfigError
from gali.engine.method.config import MethodConfig
from gali.engine.method.tuple_spec import TupleSpec
from gali.engine.nets.config import ModelConfig
from gali.engine.nets.feature_models import FeatureModel, feature_dim, load_feature_model
from gali.engine.nets.paper import build_models

NETWORK_NAMES = ("G", "E", "D")  # the trained networks, by their attribute names


@dataclass
class Networks:
    """The three trained networks and the optional frozen feature model M (behind its input resize)."""

    G: nn.Module
    E: nn.Module
    D: nn.Module
    M: nn.Module | None = None
    extra_dim: int | None = None  # width of M's features, the size of D's extra slots


def build_networks(
    model: ModelConfig,
    method: MethodConfig,
    spec: TupleSpec,
    *,
    resolution: int,
    device: torch.device,
    extra_dim: int | None = None,
) -> Networks:
    """G, E, D for ``spec`` (and M when the spec uses M(...)), on ``device``; D has a pair head where the spec
    names cycle classes.

    ``extra_dim`` (the width of M's features) is measured from M when M is loaded; pass it when
    rebuilding from a checkpoint without M.
    """
    feature_model = None
    if spec.uses_feature_model and extra_dim is None:
        if not method.feature_model:
            raise ConfigError(
                "method.feature_model",
                f"tuple spec '{spec.name}' uses M(...); "
                "give method.feature_model=/path/to/model.pt (TorchScript or state dict)",
            )
        network = load_feature_model(method.feature_model, method.feature_arch).to(device)
        extra_dim = feature_dim(network, method.feature_input_size or resolution)
        feature_model = FeatureModel(
            network,
            input_size=method.feature_input_size,
            resize=method.feature_resize,
            name=f"the feature model {method.feature_model}",
        )
    G, E, D = build_models(
        model,
        slot_kinds=spec.slot_kinds,
        num_classes=spec.num_classes,
        extra_dim=extra_dim,
        pair_classes=spec.num_cycle_classes,
    )
    return Networks(G=G.to(device), E=E.to(device), D=D.to(device), M=feature_model, extra_dim=extra_dim)
