"""The models a long-lived site process keeps between messages (a simulated sites' worker answers many): an
untouched template per model config, and the last message's model, taken back once it is clean.

A deployed site's process answers one message and keeps nothing. Every model handed out here is about to have
all its weights and buffers overwritten by the global ones (fl_client.round_config.build_global_model).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where the model is built: the protocol stages import no torch (fl_client.client_app)
    import torch

    from shared_model.modeling_fedrec import FedRecModel

MODEL_TEMPLATES: dict[str, FedRecModel] = {}  # model config -> an untouched model of it (untrained_model)
BUILT_ONCE: set[str] = set()  # the model config this process built once
SPARE_MODELS: dict[str, FedRecModel] = {}  # model config -> the last message's model, cleaned (take_back)
TEMPLATE_SIGNATURES: dict[str, tuple[Any, ...] | None] = {}  # model config -> its template's build_signature
# The largest model (weights and buffers) a process keeps an untouched copy of: 16M numbers, 64 MB of float32.
# Larger ones (a million-item catalog) are built each time rather than held twice in every simulated worker.
TEMPLATE_MAX_NUMBERS = 16_000_000


def untrained_model(model_config: str, build: Callable[[], FedRecModel], keep: bool = True) -> FedRecModel:
    """A model of `model_config`, its weights about to be overwritten by the global ones.

    A process that builds the same config a second time keeps one untouched copy, when `keep`, and from then on
    hands out the previous message's model once it came back clean (take_back), else a deep copy of the kept
    one: most of a build is the random initialisation of the item table, which nobody uses (Beauty's 12,101
    items: a copy 5-7 ms, a build 26-29 ms; a copy of the demo's model 3-7 ms; a reused model saves the copy:
    BENCHMARKS.md, "Many simulated sites"). A deployed site's process (one message) only builds. A copy keeps
    tied tensors tied; training reseeds its own randomness (fl_client.train)."""
    if (template := MODEL_TEMPLATES.get(model_config)) is not None:
        spare = SPARE_MODELS.pop(model_config, None)  # popped: never handed to two messages at once
        return spare if spare is not None else copy.deepcopy(template)
    model = build()
    if keep and model_config in BUILT_ONCE:
        for kept in (MODEL_TEMPLATES, SPARE_MODELS, TEMPLATE_SIGNATURES):
            kept.clear()  # one config at a time: a template can be as large as the model
        MODEL_TEMPLATES[model_config] = copy.deepcopy(model)
        TEMPLATE_SIGNATURES[model_config] = build_signature(model)
    BUILT_ONCE.clear()
    BUILT_ONCE.add(model_config)
    return model


def take_back(model_config: str, model: FedRecModel) -> None:
    """Keep a message's model, done with, for this config's next message, when this process keeps a template of
    the config and the model has nothing the template lacks (clean_for_reuse); otherwise let it go."""
    template = MODEL_TEMPLATES.get(model_config)
    if template is not None and model is not template and model_config in TEMPLATE_SIGNATURES and \
            clean_for_reuse(model, template, TEMPLATE_SIGNATURES[model_config]):
        SPARE_MODELS[model_config] = model


# Module fields that hold hooks: a model that comes back with more of them than its template is never reused.
HOOK_FIELDS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def clean_for_reuse(model: torch.nn.Module, template: torch.nn.Module, expected: tuple[Any, ...] | None) -> bool:
    """Whether `model`, once its gradients and the attributes an optimiser pinned on its parameters (Opacus'
    summed_grad, grad_sample) are dropped, is built like `template`, whose build_signature is `expected` (the
    same modules and fields, no hook the template lacks, the same settings, tensors and ties; None when the
    template has a buffer the global state would not overwrite). Its values do not matter: the next message
    overwrites them all. Cleans `model` when it answers yes."""
    if expected is None or build_signature(model) != expected:
        return False
    for parameter in model.parameters():
        parameter.grad = None
        for field in list(vars(parameter)):
            delattr(parameter, field)
    model.train(template.training)
    return True


def build_signature(model: torch.nn.Module) -> tuple[Any, ...] | None:
    """What two models of one build share whatever their values: each module's name, type, fields, number of
    each kind of hook (Opacus' hooks mode leaves its own) and plain settings (numbers, strings, flags, configs,
    sets of names); each parameter's and buffer's name, kind, shape, dtype, device and trainability; which are
    tied. None for a model with a non-persistent buffer, which a global state would not overwrite."""
    import torch

    containers = dict | list | torch.Tensor | torch.nn.Module  # compared by what they hold, not by value
    modules = []
    for name, module in model.named_modules(remove_duplicate=False):
        fields = vars(module)
        if fields.get("_non_persistent_buffers_set"):
            return None
        hooks = tuple(len(fields[field]) for field in HOOK_FIELDS if field in fields)
        settings = tuple((field, value) for field, value in fields.items()
                         if field != "training" and not isinstance(value, containers))
        modules.append((name, type(module), tuple(fields), hooks, settings))
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    first: dict[int, int] = {}
    ties = tuple(first.setdefault(id(tensor), position) for position, (_, tensor) in enumerate(tensors))
    meta = tuple((name, type(t), t.shape, t.dtype, t.device, t.requires_grad) for name, t in tensors)
    return tuple(modules), meta, ties

