"""Reading and moving tokens in vLLM's CPU paged KV cache, whose page interiors depend on the kernel ISA.

One layer's cache is [num_blocks, num_kv_heads, block_size, 2 * head_size]; each (block, head) page holds the K of
block_size tokens in its first block_size * head_size elements and their V in the rest, but in the order the kernel
reads them: `vec` (fp32) stores K transposed, `amx` (bf16) packs pairs of tokens VNNI-style. Rather than re-deriving
each layout we probe it once per (dtype, block_size, head_size, isa) through the kernel's own writer,
`ops.cpu_attn_reshape_and_cache`, and index pages with the resulting position map. A slot is block * block_size +
offset, as in vLLM's slot_mapping. Unquantized caches only (kv_cache_dtype "auto").
"""
from __future__ import annotations

import functools

import torch

from vllm import _custom_ops as ops

_EXACT = 256        # probe values 1.._EXACT are exact integers in bf16/fp16/fp32


@functools.lru_cache(maxsize=None)
def kv_position_map(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> torch.Tensor:
    """[2, block_size, head_size] int64: flat index, inside one (block, head) page of 2 * block_size * head_size
    elements, of K (0) or V (1) of the token at offset o, dim d. E.g. fp32 `vec` K (transposed): [0, o, d] = d *
    block_size + o; V: [1, o, d] = block_size * head_size + o * head_size + d.

    Probe: block d of a scratch cache takes tokens whose only non-zero dim is d, valued offset + 1, so every non-zero
    element names its (offset, dim); the writer runs once per _EXACT offsets."""
    page = block_size * head_size
    kv = torch.zeros(head_size, 1, block_size, 2 * head_size, dtype=dtype)   # [num_blocks = head_size, 1, bs, 2 * hs]
    key_cache, value_cache = kv.view(head_size, 1, 2 * block_size, head_size).chunk(2, dim=2)
    pos = torch.full((2, block_size, head_size), -1, dtype=torch.long)
    dims = torch.arange(head_size)
    for lo in range(0, block_size, _EXACT):
        offsets = torch.arange(lo, min(lo + _EXACT, block_size))
        x = torch.zeros(head_size, len(offsets), head_size, dtype=dtype)     # [block (= probed dim), offset, dim]
        x[dims, :, dims] = (offsets - lo + 1).to(dtype)                      # x[d, o, d] = o - lo + 1
        slots = (dims[:, None] * block_size + offsets).flatten()             # token (d, o) -> slot d * bs + o
        kv.zero_()
        ops.cpu_attn_reshape_and_cache(x.view(-1, 1, head_size), x.view(-1, 1, head_size), key_cache, value_cache,
                                       slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        block, flat = kv.view(head_size, 2 * page).nonzero(as_tuple=True)
        offset = kv.view(head_size, 2 * page)[block, flat].float().long() - 1 + lo
        pos[(flat >= page).long(), offset, block] = flat
    if not torch.equal(pos.flatten().sort().values, torch.arange(2 * page)):
        raise RuntimeError(f"KV page layout probe for {dtype}, block_size {block_size}, head_size {head_size}, "
                           f"isa {isa!r} is not a permutation of the page; the cache format is not supported")
    return pos


@functools.lru_cache(maxsize=None)
def _offset_index(dtype: torch.dtype, block_size: int, head_size: int, isa: str) -> torch.Tensor:
    """[block_size, 2 * head_size]: page indices of one token's K then V."""
    return kv_position_map(dtype, block_size, head_size, isa).permute(1, 0, 2).reshape(block_size, 2 * head_size)


def slot_elements(kv_cache: torch.Tensor, slots: torch.Tensor, isa: str) -> torch.Tensor:
    """[num_slots, num_kv_heads, 2 * head_size] int64: where K then V of every head of each slot lie in
    _flat(kv_cache) (any strides). kv_cache: [num_blocks, num_kv_heads, block_size, 2 * hs]; slots: [num_slots] int.
    E.g. a contiguous fp32 `vec` cache, block 128, head 64 (strides 49152, 16384, 128, 1): slot 3 * 128 + 5, head 1,
    K dim 2 -> 3 * 49152 + 16384 + page index 2 * 128 + 5 (K transposed)."""
    _, num_kv_heads, block_size, two_hs = kv_cache.shape
    slots, st = slots.long(), kv_cache.stride()
    page = _offset_index(kv_cache.dtype, block_size, two_hs // 2, isa)[slots % block_size]      # [num_slots, 2 * hs]
    heads = torch.arange(num_kv_heads, device=kv_cache.device)
    return ((slots // block_size)[:, None, None] * st[0] + heads[None, :, None] * st[1]
            + (page // two_hs * st[2] + page % two_hs * st[3])[:, None, :])


def _flat(kv_cache: torch.Tensor) -> torch.Tensor:
    """kv_cache's elements as one 1-D view from its first element (the index space of slot_elements). A plain view
    when contiguous: index ops run faster on it than on the equivalent as_strided view (docs/notes.md)."""
    if kv_cache.is_contiguous():
        return kv_cache.view(-1)
    return kv_cache.as_strided((1 + sum((n - 1) * s for n, s in zip(kv_cache.shape, kv_cache.stride())),), (1,))


def _radix(seq: list[int]) -> list[tuple[int, int]] | None:
    """Mixed-radix digits (size, stride), least significant first, such that seq[i] - seq[0] = sum of digit_j(i) *
    stride_j; None if seq has no such form. E.g. bf16 `amx` K offsets (block 32, dim 0): [0, 2, 4, .., 30, 1024, 1026,
    ..] -> [(16, 2), (2, 1024)]: offsets come in runs of 16, two elements apart, runs 1024 apart."""
    n, digits, unit = len(seq), [], 1
    while unit < n:
        stride, size = seq[unit] - seq[0], 1
        while unit * size < n and seq[unit * size] - seq[0] == size * stride:
            size += 1
        if n % (unit * size):
            return None
        digits.append((size, stride))
        unit *= size
    return digits


def _value(i: int, digits: list[tuple[int, int]]) -> int:
    out = 0
    for size, stride in digits:
        out, i = out + (i % size) * stride, i // size
    return out


@functools.lru_cache(maxsize=None)
def page_strides(dtype: torch.dtype, block_size: int, head_size: int, isa: str):
    """The page layout as strided views, if it is one: per K and V, (base, sizes, strides) with the block offset's
    digits then the dim's digits, most significant first; None if some layout is not a plain mixed-radix map.
    E.g. fp32 `vec` K (transposed): base 0, sizes [block_size, head_size], strides [1, block_size]; bf16 `amx` K
    (block 32, head 64): sizes [2, 16, 32, 2], strides [1024, 2, 32, 1] (offset = 16 o_hi + o_lo, dim = 2 d_hi + d_lo)."""
    out = []
    for m in kv_position_map(dtype, block_size, head_size, isa).tolist():          # [block_size][head_size]
        o_digits, d_digits = _radix([row[0] for row in m]), _radix(m[0])
        if o_digits is None or d_digits is None:
            return None
        base = m[0][0]
        if any(m[o][d] != base + _value(o, o_digits) + _value(d, d_digits)
               for o in range(block_size) for d in range(head_size)):
            return None
        digits = o_digits[::-1] + d_digits[::-1]
        out.append((base, [sz for sz, _ in digits], [st for _, st in digits]))
    return out


def gather_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, isa: str,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of whole blocks, per request, laid out for attention.

    kv_cache: [num_blocks, num_kv_heads, block_size, 2 * head_size]; blocks: [R, NB] int, each row a request's blocks
    in order (pad a short row with any valid block and mask those columns out).
    -> k, v [R, num_kv_heads, NB * block_size, head_size] in `dtype` (default: the cache's): column j of row r is the
       token at offset j % block_size of block blocks[r, j // block_size]. E.g. block_size 32, row [5, 2]: columns
       0..31 from block 5, 32..63 from block 2; a request of 40 tokens uses columns 0..39.
    Fast path: K and V are strided views of a page ([heads, offset digits.., dim digits..]), so one gather of whole
    pages and one permuting copy lay them out; otherwise an element-wise gather through the position map."""
    num_blocks, num_kv_heads, block_size, two_hs = kv_cache.shape
    hs, (R, nb) = two_hs // 2, blocks.shape
    blocks = blocks.long()
    layout = page_strides(kv_cache.dtype, block_size, hs, isa)
    if layout is None or kv_cache.stride(3) != 1 or kv_cache.stride(2) != two_hs:
        slots = (blocks[:, :, None] * block_size + torch.arange(block_size, device=blocks.device)).flatten()
        kv = _flat(kv_cache)[slot_elements(kv_cache, slots, isa)]                # [R * P, heads, 2 * hs]
        kv = kv.view(R, nb * block_size, num_kv_heads, two_hs).transpose(1, 2).to(dtype or kv_cache.dtype)
        return kv[..., :hs], kv[..., hs:]
    # Whole pages first (one contiguous memcpy each), then the layout's permutation inside those few pages: an
    # advanced index straight on the strided view, or a converting permute, is several times slower.
    pages = kv_cache.index_select(0, blocks.flatten())                            # [R * nb, heads, bs, 2 * hs]
    out = []
    for base, sizes, strides in layout:
        view = pages.as_strided([R, nb, num_kv_heads, *sizes], [nb * pages.stride(0), *pages.stride()[:2], *strides],
                                base)                                             # [R, nb, heads, *digits]
        dst = torch.empty(R, num_kv_heads, nb, *sizes, dtype=kv_cache.dtype)
        dst.copy_(view.transpose(1, 2))
        out.append(dst.view(R, num_kv_heads, nb * block_size, hs).to(dtype or kv_cache.dtype))
    return out[0], out[1]


def copy_kv_slots(kv_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor, isa: str,
                  index: tuple | None = None) -> None:
    """In place: slot dst_slots[j] takes the K and V (all heads) of slot src_slots[j]. Every source is read before
    any destination is written, so a source may be another pair's destination (src [47, 49] -> dst [46, 47] moves
    the old 47, not the new one); destinations must be distinct.

    kv_cache: [num_blocks, num_kv_heads, block_size, 2 * head_size]; src_slots, dst_slots: [num_pairs] int;
    index: slot_copy_index(...) of these slots, for a copy repeated over layers of one shape."""
    dst, src = index or slot_copy_index(kv_cache, src_slots, dst_slots, isa)
    flat = _flat(kv_cache)
    flat.index_copy_(0, dst, flat.index_select(0, src))             # gather, then scatter


def slot_copy_index(kv_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor,
                    isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(destination, source) element indices of copy_kv_slots, flat: the same for every cache of kv_cache's shape,
    strides, dtype and isa. (One slot_elements call for both: its cost is per call, not per slot.)"""
    both = slot_elements(kv_cache, torch.cat([dst_slots, src_slots]), isa).view(2, -1)
    return both[0], both[1]
