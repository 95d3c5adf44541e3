"""Secure randomness for DP-SGD: uniforms (Poisson sampling) and Gaussian noise drawn from the OS CSPRNG.

Opacus' own `secure_mode` needs `torchcsprng`, which is archived and has no build for current torch, so
`privacy.secure_mode` / `--secure-mode` use this instead. Every random bit of a DP step (which users are
sampled, the noise added to their clipped gradient sum) comes from `os.urandom` (the kernel's CSPRNG), not
from torch's Mersenne Twister / Philox generators, whose state could in principle be recovered from outputs.
The noise also follows Opacus' defence against floating-point attacks on Gaussian samplers
(arXiv:2107.10138, §5.1, n = 2): each value is the sum of four independent standard normals, halved.
Sampling and noise are exactly the Sampled Gaussian Mechanism the accountant assumes, so ε is unchanged.
fl_client.dp.engine puts these draws into Opacus' Poisson loader and DP optimiser; this module imports no Opacus
(the popularity release and distributed DP draw from it too).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

SUMMED_NORMALS = 4  # 2n with n = 2, as Opacus' secure_mode


def secure_uniform(count: int) -> np.ndarray:
    """`count` floats uniform on (0, 1], 53 random bits each, from the OS CSPRNG."""
    words = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53


def secure_standard_normal(count: int) -> np.ndarray:
    """`count` independent N(0, 1) floats (float64): Box-Muller on CSPRNG uniforms, both outputs used."""
    pairs = (count + 1) // 2
    radius = np.sqrt(-2.0 * np.log(secure_uniform(pairs)))
    angle = 2.0 * math.pi * secure_uniform(pairs)
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


def secure_gaussian(reference: torch.Tensor, std: float) -> torch.Tensor:
    """N(0, std²) noise shaped, typed and placed like `reference`; the sum of four normals, halved."""
    count = reference.numel()
    total = sum(secure_standard_normal(count) for _ in range(SUMMED_NORMALS))
    noise = torch.from_numpy(total * (std / math.sqrt(SUMMED_NORMALS)))
    return noise.reshape(reference.shape).to(device=reference.device, dtype=reference.dtype)
