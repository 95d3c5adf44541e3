"""A site's optimiser state as named tensors for the wire, and back (`federation.share_optimizer_state`).

Each site's Adam divides its steps by its own second moments, so sites whose gradients for a weight are small
take larger steps on it than sites whose gradients are large, whatever the global gradient says. Starting every
site from the average of the sites' moments gives them one preconditioner again. The moments are computed from
the site's (under DP: already noised) gradients, so sending them is post-processing of what DP-SGD releases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from shared_model import wire

STEP = "step"  # torch optimisers' per-parameter step count


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Trainable parameter names in the order the optimiser numbers them (build_optimizer's order)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def to_named_moments(state: Mapping[str, Any], names: list[str]) -> dict[str, torch.Tensor]:
    """An optimiser state_dict's per-parameter tensors as {"<param>:<moment>": tensor} plus the mean step."""
    per_param = state["state"]
    if not per_param:
        return {}
    out: dict[str, torch.Tensor] = {}
    steps = []
    for index, name in enumerate(names):
        for key, value in per_param.get(index, {}).items():
            if key == STEP:
                steps.append(float(value))
            elif isinstance(value, torch.Tensor):
                out[f"{name}:{key}"] = value.detach().cpu().clone()
    out[wire.MOMENTS_STEP] = torch.tensor([sum(steps) / max(len(steps), 1)], dtype=torch.float32)
    return out


def from_named_moments(moments: Mapping[str, torch.Tensor], model: torch.nn.Module,
                       template: Mapping[str, Any]) -> dict[str, Any]:
    """An optimiser state_dict made of shared moments, on the param groups of a fresh optimiser's
    state_dict (`template`); ValueError naming what does not fit the model's trainable weights."""
    if wire.MOMENTS_STEP not in moments:
        raise ValueError("the shared optimiser state has no step count")
    step = float(moments[wire.MOMENTS_STEP].reshape(-1)[0])
    state: dict[int, dict[str, torch.Tensor]] = {}
    known = {wire.MOMENTS_STEP}
    params = dict(model.named_parameters())
    for index, name in enumerate(trainable_names(model)):
        param = params[name]
        entries = {key.split(":", 1)[1]: value for key, value in moments.items() if key.startswith(f"{name}:")}
        if not entries:
            raise ValueError(f"the shared optimiser state has no moments for {name}")
        wrong = [key for key, value in entries.items() if value.shape != param.shape]
        if wrong:
            raise ValueError(f"the shared optimiser state's {name}:{wrong[0]} has shape "
                             f"{tuple(entries[wrong[0]].shape)}, the weight has {tuple(param.shape)}")
        known.update(f"{name}:{key}" for key in entries)
        state[index] = {STEP: torch.tensor(step), **{key: value.clone() for key, value in entries.items()}}
    unknown = sorted(set(moments) - known)
    if unknown:
        raise ValueError(f"the shared optimiser state has tensors this model does not train: {unknown[:3]}")
    return {"state": state, "param_groups": template["param_groups"]}
