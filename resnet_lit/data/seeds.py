"""Seed hashing (splitmix64 rounds): integers in, a 63-bit seed out, the same in every process and on every device.

Augmentation draws from ``sample_seed(seed, epoch, index)`` only, so it does not depend on workers, ranks or resumes.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _absorb(*values: int) -> int:
    """The 64-bit hash state after absorbing ``values``, one splitmix64 round each."""
    state = _GOLDEN
    for value in values:
        state = (((state ^ (value & _MASK64)) & _MASK64) + _GOLDEN) & _MASK64
        z = ((state ^ (state >> 30)) * _MIX1) & _MASK64
        z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
        state = z ^ (z >> 31)
    return state


def mix_seed(*values: int) -> int:
    """Hash integers into a 63-bit seed; stable across processes and Python versions."""
    return _absorb(*values) >> 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in ``epoch``."""
    return mix_seed(seed, epoch, index)


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical (unsigned) right shift of int64 bit patterns."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _round(state: Tensor, value: Tensor | int) -> Tensor:
    """One splitmix64 round of :func:`_absorb` on int64 bit patterns (wrapping, as on every device)."""
    s = (state ^ value) + _signed(_GOLDEN)
    z = (s ^ _shift_right(s, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    return z ^ _shift_right(z, 31)


def sample_seeds(seed: int, epoch: int, indices: Tensor) -> Tensor:
    """:func:`sample_seed` of every index, computed on the indices' device (the device path's augmentation).

    int64 arithmetic wraps modulo 2**64 on CPU and CUDA alike, so this equals ``sample_seed`` bit for bit.
    """
    return _shift_right(_round(indices.to(torch.int64), _signed(_absorb(seed, epoch))), 1)


def seed_uniforms(seeds: Tensor, stream: int, count: int) -> Tensor:
    """``count`` uniform float32 draws in [0, 1) per seed, ``[len(seeds), count]``, on the seeds' device.

    Draw ``k`` of seed ``s`` is the top 24 bits of ``mix_seed(s, stream, k)``: a function of the seed alone, so
    a sample gets the same draws in any batch, on any rank, after any resume.
    """
    state = _round(torch.full_like(seeds, _signed(_GOLDEN), dtype=torch.int64), seeds.to(torch.int64))
    state = _round(state, stream)
    counters = torch.arange(count, dtype=torch.int64, device=seeds.device)
    bits = _shift_right(_round(state[:, None], counters), 40)  # mix_seed's 63 bits, of which the top 24
    return bits.to(torch.float32) * 2.0**-24
