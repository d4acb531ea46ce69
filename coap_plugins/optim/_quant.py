"""Blockwise dynamic 8-bit quantization in bitsandbytes' format, fast on CPU.

A tensor is cut into blocks of ``BLOCKSIZE`` elements; each block stores its absolute maximum
(fp32) and one uint8 per element, an index into bitsandbytes' 256-entry dynamic code map
(``create_dynamic_map``: signed for first moments, unsigned for second moments).  Decoding is
``code[q] * absmax[block]``, exactly what ``bitsandbytes.functional.dequantize_blockwise`` computes,
so codes written here decode there and vice versa.

On CUDA the bitsandbytes kernels quantize.  On CPU its quantizer is a scalar loop (about 28 ns per
element on the development machine, slower than the whole projected Adam step), so encoding runs
here in torch, in five passes: block absmax, scale, and a lookup of the nearest code in a 2^20-entry
table indexed by the top 20 bits of each scaled float (sign, exponent and 11 mantissa bits).  That
is round-to-nearest except within 1/16 of a code step of a midpoint (0.2 % of random inputs), where
the neighbour may be picked; bitsandbytes' own CPU quantizer differs from nearest more often.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["BLOCKSIZE", "MIN_8BIT_NUMEL", "QuantCodec", "codec", "require_bitsandbytes"]

# bitsandbytes' blockwise 8-bit optimizers use 256-element blocks.
BLOCKSIZE = 256
# Tensors below this many elements stay fp32, as bitsandbytes' ``min_8bit_size``.
MIN_8BIT_NUMEL = 4096
_TABLE_BITS = 20
_SHIFT = 32 - _TABLE_BITS


def require_bitsandbytes():
    """Import bitsandbytes or raise an ImportError that names the extra to install."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as err:  # pragma: no cover - exercised with the module hidden
        raise ImportError("The 8-bit COAP optimizers need bitsandbytes: pip install 'coap-plugins[8bit]'") from err
    return bnbf


class QuantCodec:
    """Encoder/decoder for one code map (signed or unsigned)."""

    def __init__(self, signed: bool) -> None:
        bnbf = require_bitsandbytes()
        self.signed = signed
        self.code = bnbf.create_dynamic_map(signed=signed).float()
        sorted_code, order = self.code.sort()
        mids = (sorted_code[1:] + sorted_code[:-1]) / 2
        # every 20-bit prefix of a float32 -> the code nearest the centre of its interval
        prefixes = (torch.arange(2**_TABLE_BITS, dtype=torch.int64) - 2 ** (_TABLE_BITS - 1)) << _SHIFT
        centers = (prefixes.to(torch.int32) | (1 << (_SHIFT - 1))).view(torch.float32)
        centers = centers.nan_to_num(0.0, 0.0, 0.0).clamp(-1.0, 1.0)
        self.table = order[torch.searchsorted(mids, centers)].to(torch.uint8)
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._device_cache:
            self._device_cache[device] = (self.code.to(device), self.table.to(device))
        return self._device_cache[device]

    def encode(self, x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> None:
        """Quantize fp32 ``x`` into ``codes`` (uint8, same numel) and ``absmax`` (fp32, one per block)."""
        flat = x.reshape(-1)
        code, table = self._tables(x.device)
        if x.is_cuda:
            bnbf = require_bitsandbytes()
            bnbf.quantize_blockwise(flat, code=code, absmax=absmax, out=codes.view(-1), blocksize=BLOCKSIZE)
            return
        n = flat.numel()
        full = n - n % BLOCKSIZE
        if full:
            lo, hi = torch.aminmax(flat[:full].view(-1, BLOCKSIZE), dim=1)
            torch.maximum(hi, lo.neg_(), out=absmax[: full // BLOCKSIZE])
        if full < n:
            absmax[-1] = flat[full:].abs().amax()
        inv = absmax.clamp_min(1e-30).reciprocal()
        normed = torch.empty_like(flat)
        if full:
            torch.mul(
                flat[:full].view(-1, BLOCKSIZE), inv[: full // BLOCKSIZE, None], out=normed[:full].view(-1, BLOCKSIZE)
            )
        if full < n:
            torch.mul(flat[full:], inv[-1], out=normed[full:])
        # scaled values lie in [-1, 1] (the table clamps rounding overshoot)
        prefix = normed.view(torch.int32).bitwise_right_shift_(_SHIFT).add_(2 ** (_TABLE_BITS - 1))
        torch.index_select(table, 0, prefix, out=codes.view(-1))

    def decode(self, codes: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``code[q] * absmax[block]`` as fp32, in the shape of ``codes``."""
        code = self._tables(codes.device)[0]
        index = codes.reshape(-1).int()  # index_select takes int32 indices: half the bytes of int64
        flat = code.index_select(0, index) if out is None else torch.index_select(code, 0, index, out=out.view(-1))
        n = flat.numel()
        full = n - n % BLOCKSIZE
        if full:
            flat[:full].view(-1, BLOCKSIZE).mul_(absmax[: full // BLOCKSIZE, None])
        if full < n:
            flat[full:].mul_(absmax[-1])
        return flat.view(codes.shape)


@functools.lru_cache(maxsize=2)
def codec(signed: bool) -> QuantCodec:
    """The shared code map and tables (one per signedness, built once per process)."""
    return QuantCodec(signed)


def n_blocks(numel: int) -> int:
    return -(-numel // BLOCKSIZE)
