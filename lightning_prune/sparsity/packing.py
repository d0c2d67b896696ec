"""Bool keep masks packed eight to a byte, and a checksum that tells whether two mask sets agree.

A bool mask costs one byte per weight (25 % of an fp32 model, 6.5 GB for 7B); packed it is
one bit. Packing goes through a ``uint8`` view in chunks, so no ``int64`` copy of a matrix is
ever made.
"""

import zlib

import torch

__all__ = ["pack_mask", "unpack_mask", "mask_checksum"]

_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_CHUNK = 1 << 24  # mask elements per packing step (16 MB of bools)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(ceil(numel / 8),) uint8: bit 7 of byte 0 is element 0 of the flattened mask (zero-padded)."""
    flat = mask.detach().reshape(-1)
    packed = []
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].to(torch.uint8)
        if chunk.numel() % 8:
            chunk = torch.cat([chunk, chunk.new_zeros(8 - chunk.numel() % 8)])
        packed.append((chunk.reshape(-1, 8) * _BITS.to(chunk.device)).sum(1, dtype=torch.uint8))
    return torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8, device=mask.device)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The bool mask of ``shape`` that :func:`pack_mask` packed."""
    numel = 1
    for size in shape:
        numel *= size
    bits = (packed[:, None] & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def mask_checksum(masks: dict[str, torch.Tensor]) -> str:
    """CRC-32 (hex) of every mask's packed bits, in key order: equal on ranks that chose the same masks."""
    crc = 0
    for name in sorted(masks):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(pack_mask(masks[name]).cpu().numpy().tobytes(), crc)
    return f"{crc:08x}"
