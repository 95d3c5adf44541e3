"""Which torch device to train or score on: shared by the sites, the server and the simulations."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA where there is none is an error, named now."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but this torch build ({torch.__version__}) sees no CUDA "
                         "device; use device=auto or cpu, or install a CUDA build of torch")
    return device


def describe_device(device: torch.device) -> str:
    """What a site trains on, for its log: the GPU's name and memory, or the CPU threads."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"
