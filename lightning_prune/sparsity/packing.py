"""Bool keep masks packed eight to a byte, and a checksum that tells whether two mask sets agree.

A bool mask costs one byte per weight (25 % of an fp32 model, 6.5 GB for 7B); packed it is
one bit. Packing goes through ``uint8`` chunks, so no ``int64`` copy of a matrix is ever made.
:class:`PackedMasks` is the dict of masks that the sparsity code keeps: it stores the bits and
unpacks one mask when a key is read.
"""

import zlib
from collections.abc import Iterator, Mapping, MutableMapping

import torch

__all__ = ["PackedMasks", "pack_mask", "unpack_mask", "mask_checksum"]

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


class PackedMasks(MutableMapping):
    """Keep masks by name, stored one bit per weight (on the CPU); reading a key unpacks that mask.

    Args:
        masks: bool masks by name (packed on insertion).
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None):
        self._packed: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._kept: dict[str, int] = {}
        self.update(masks or {})

    @classmethod
    def from_packed(cls, packed: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> "PackedMasks":
        """Masks from their packed bits and shapes (as :meth:`packed` and :meth:`shape` give them)."""
        masks = cls()
        for name, bits in packed.items():
            masks._packed[name], masks._shapes[name] = bits.to(torch.uint8).cpu(), tuple(int(n) for n in shapes[name])
            masks._kept[name] = int(torch.count_nonzero(masks[name]))
        return masks

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        self._packed[name] = pack_mask(mask.bool()).cpu()
        self._shapes[name], self._kept[name] = tuple(mask.shape), int(torch.count_nonzero(mask))

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self._packed[name], self._shapes[name])

    def __delitem__(self, name: str) -> None:
        del self._packed[name], self._shapes[name], self._kept[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def packed(self, name: str) -> torch.Tensor:
        """The packed bits (uint8) of one mask."""
        return self._packed[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def kept(self, name: str) -> int:
        """Number of ``True`` (kept weights) in one mask."""
        return self._kept[name]

    def numel(self, name: str) -> int:
        return int(torch.Size(self._shapes[name]).numel())


def mask_checksum(masks: PackedMasks) -> str:
    """CRC-32 (hex) of every mask's name and packed bits, in key order: equal on ranks that chose the same masks."""
    crc = 0
    for name in sorted(masks):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(masks.packed(name).numpy().tobytes(), crc)
    return f"{crc:08x}"
