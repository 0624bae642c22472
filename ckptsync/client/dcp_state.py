"""What a sharded save and a sharded restore share: how a manifest marks a DCP checkpoint,
and state dicts in the form ``torch.distributed.checkpoint`` saves and loads (imports DCP).

Models and optimizers go through DCP's ``get_state_dict`` helpers (fully-qualified names, so
an optimizer resumes onto another sharding); other objects through their ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ckptsync.client.state import load_into, unwrap
from ckptsync.errors import ConfigError
from ckptsync.manifest import Manifest

__all__ = ["DCP_META", "dcp_states", "is_dcp", "load_dcp_states"]

DCP_META = "dcp"
"""Key in a manifest's ``meta`` marking a DCP checkpoint: ``{"world_size", "objects"}``."""


def is_dcp(manifest: Manifest | None) -> bool:
    """True for the manifest of a checkpoint written through DCP."""
    return manifest is not None and isinstance(manifest.meta.get(DCP_META), dict)


def dcp_states(objects: Mapping[str, Any]) -> dict[str, Any]:
    """Each object's state dict in DCP's form: FQN keys for modules and optimizers.

    Raises:
        ConfigError: an object has no ``state_dict()``, or an optimizer is passed with other
            than exactly one model.
    """
    modules = [unwrap(o) for o in objects.values() if isinstance(unwrap(o), torch.nn.Module)]
    out: dict[str, Any] = {}
    for name, obj in objects.items():
        target = unwrap(obj)
        if isinstance(target, torch.nn.Module):
            out[name] = get_model_state_dict(target)
        elif isinstance(target, torch.optim.Optimizer):
            out[name] = get_optimizer_state_dict(_model_of(name, modules), target)
        elif hasattr(target, "state_dict") and callable(target.state_dict):
            out[name] = target.state_dict()
        elif isinstance(target, dict):
            out[name] = dict(target)
        else:
            raise ConfigError(f"cannot checkpoint {name!r}: a {type(obj).__name__} has no "
                              "state_dict(); pass a module, optimizer, or dict")
    return out


def _model_of(name: str, modules: list[torch.nn.Module]) -> torch.nn.Module:
    if len(modules) != 1:
        raise ConfigError(
            f"a sharded save or restore of optimizer {name!r} needs exactly one model among the "
            f"objects (DCP keys optimizer state by the model's parameter names); got "
            f"{len(modules)}: pass the model it optimizes, e.g. save(step, model=m, optim=o)")
    return modules[0]


def load_dcp_states(objects: Mapping[str, Any], states: Mapping[str, Any]) -> None:
    """Load ``states`` (as :func:`dcp_states` made them, filled by ``dcp.load``) into
    ``objects``."""
    modules = [unwrap(o) for o in objects.values() if isinstance(unwrap(o), torch.nn.Module)]
    for name, obj in objects.items():
        target = unwrap(obj)
        if isinstance(target, torch.nn.Module):
            set_model_state_dict(target, states[name])
        elif isinstance(target, torch.optim.Optimizer):
            set_optimizer_state_dict(_model_of(name, modules), target, states[name])
        else:
            load_into(name, obj, states[name])
