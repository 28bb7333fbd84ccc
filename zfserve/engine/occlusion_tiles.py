"""The occlusion engine's plan and glue (:mod:`zfserve.engine.occlusion`): which stages recompute which layer,
where each position's changed region lies in every map, and the crops and pastes between stages.

The stages follow the model's layer table (:mod:`zfserve.architecture`), so every member of ZFNet's family
gets the same exact incremental sweep:

- the first stage reads the occluded image: its first conv and, when a pool follows it straight away (ZFNet,
  AlexNet), that pool and its LRN in the same stage (``early``); otherwise the conv alone (VGG, ``first``);
- every later conv or pool up to the last conv is a stage of its own (``conv``, ``pool``: the pool and the LRN
  that follows it), reading a crop of the cached unoccluded map below with the new tile of that map pasted in;
- the head (the last pool and the fc layers) runs on full copies of the last conv's map.

Maps are (C, H, W) with :data:`MARGIN` zeros on every side (so every crop is a plain slice, and a conv's zero
padding is the margin); corners are numpy int arrays in map coordinates. Arrays are numpy on CPUs and torch
tensors elsewhere (the glue functions take either).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Cached maps are padded by this many zeros on every side so that every crop is a plain slice (it must cover
# the largest conv padding and a ceil-mode pool's read past the end).
MARGIN = 8


# ------------------------------------------------------------------------------------------------ geometry
def changed(lo, hi, k, s, p, n):
    """Outputs [lo', hi') of a k/s/p layer (n outputs) whose input window touches input rows [lo, hi)."""
    first = np.maximum(0, -(-(lo + p - k + 1) // s))
    last = np.minimum(n - 1, (hi - 1 + p) // s)
    return first, last + 1


def span(start, size, k, s, p):
    """The input rows [start', start' + size') that outputs [start, start + size) of a k/s/p layer read."""
    return s * start - p, s * (size - 1) + k


@dataclass(frozen=True)
class Stage:
    """One stage of the tile pipeline. ``name``: the layer whose tile it produces; ``kind``: ``early`` (the
    first conv and the pool after it, from the image), ``first`` (the first conv alone, from the image),
    ``conv`` or ``pool``; ``conv``: the conv inside an early stage; ``below``: the layer whose cached map (with
    its new tile) it reads (None: the image)."""

    kind: str
    name: str
    below: str | None = None
    conv: str | None = None


def stages(chain) -> tuple[list[Stage], str]:
    """The stages for a model's spatial chain (:meth:`~zfserve.model.LayeredCNN.layer_chain`) and the name of the
    last conv, whose full maps the head reads. A first pool is fused into the first stage only when its windows
    cover the whole conv map (ceil mode, or a floor-mode pool with nothing left over), so that the conv tile of
    that stage holds every changed conv value."""
    body = chain[:-1]   # the last layer is the head's pool
    first, second = body[0], body[1] if len(body) > 1 else None
    covers = second is not None and second.kind == "pool" and \
        (second.ceil_mode or (second.in_size - second.kernel) % second.stride == 0)
    plan = [Stage("early", second.name, conv=first.name)] if covers else [Stage("first", first.name)]
    below = plan[0].name
    for g in body[2 if covers else 1:]:
        plan.append(Stage(g.kind, g.name, below=below))
        below = g.name
    return plan, body[-1].name


@dataclass
class AxisPlan:
    """One axis of a group of positions: window rows and, per tile layer, tile starts and a fixed size."""

    lo: np.ndarray
    hi: np.ndarray
    tiles: dict          # layer -> (starts (n,), size)

    def take(self, index: np.ndarray) -> "AxisPlan":
        return AxisPlan(self.lo[index], self.hi[index], {k: (a[index], s) for k, (a, s) in self.tiles.items()})


def axis_plan(chain, tile_layers, input_size: int, starts: np.ndarray, window: int) -> AxisPlan:
    """Where each window (rows ``starts`` .. + ``window``) changes every layer up to the last conv, and the tile
    of each tile layer: the largest changed region's size, placed inside the map over each changed region."""
    lo = starts.astype(np.int64)
    hi = np.minimum(lo + window, input_size)
    regions = {}
    a, b = lo, hi
    for g in chain[:-1]:      # the head's pool reads full maps
        a, b = changed(a, b, g.kernel, g.stride, g.padding, g.out_size)
        regions[g.name] = (a, b, g.out_size)
    tiles = {}
    for name in tile_layers:
        a, b, n = regions[name]
        tile = int((b - a).max())
        tiles[name] = (np.clip(a, 0, n - tile), tile)
    return AxisPlan(lo, hi, tiles)


def full_plan(sizes: dict, tile_layers) -> AxisPlan:
    """Tiles that cover every map: the unoccluded pass through the same code, with an empty window."""
    zero = np.zeros(1, dtype=np.int64)
    return AxisPlan(zero, zero, {name: (zero, sizes[name]) for name in tile_layers})


def groups(chain, tile_layers, input_size: int, starts: np.ndarray, window: int, buckets: int) -> list[np.ndarray]:
    """Split one axis's positions into ``buckets`` groups of similar changed-region size (contiguous in size
    order), so border windows, which change less, run with smaller tiles."""
    sizes = np.array([sum(axis_plan(chain, tile_layers, input_size, starts[i:i + 1], window).tiles[name][1]
                          for name in tile_layers) for i in range(len(starts))])
    order = np.argsort(sizes, kind="stable")
    return [chunk for chunk in np.array_split(order, min(buckets, len(starts))) if len(chunk)]


# ------------------------------------------------------------------------------------------------ glue
def pad(a):
    if isinstance(a, np.ndarray):
        return np.pad(a, ((0, 0), (MARGIN, MARGIN), (MARGIN, MARGIN)))
    return F.pad(a, (MARGIN,) * 4)


def crop(padded, row0: np.ndarray, col0: np.ndarray, h: int, w: int):
    """Per-position (h, w) crops of a padded map -> (B, C, h, w)."""
    rows, cols = row0 + MARGIN, col0 + MARGIN
    if isinstance(padded, np.ndarray):
        out = np.empty((len(rows), padded.shape[0], h, w), dtype=padded.dtype)
        for b, (r, c) in enumerate(zip(rows.tolist(), cols.tolist())):
            out[b] = padded[:, r:r + h, c:c + w]
        return out
    dev = padded.device
    rows = torch.as_tensor(rows, device=dev)[:, None] + torch.arange(h, device=dev)
    cols = torch.as_tensor(cols, device=dev)[:, None] + torch.arange(w, device=dev)
    return padded[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3).contiguous()


def paste(dst, dst_row0: np.ndarray, dst_col0: np.ndarray, tile, tile_row0: np.ndarray, tile_col0: np.ndarray):
    """Write each position's tile into its crop ``dst`` (both placed by corners in the same map). The parts of
    a tile outside its crop are not read by that crop and are dropped."""
    b, c, h, w = dst.shape
    th, tw = tile.shape[-2:]
    off_r, off_c = tile_row0 - dst_row0, tile_col0 - dst_col0
    if isinstance(dst, np.ndarray):
        for i, (r, c) in enumerate(zip(off_r.tolist(), off_c.tolist())):
            r0, c0, r1, c1 = max(r, 0), max(c, 0), min(r + th, h), min(c + tw, w)
            if r1 > r0 and c1 > c0:
                dst[i, :, r0:r1, c0:c1] = tile[i, :, r0 - r:r1 - r, c0 - c:c1 - c]
        return dst
    dev = dst.device
    rows = torch.as_tensor(off_r, device=dev)[:, None] + torch.arange(th, device=dev)
    cols = torch.as_tensor(off_c, device=dev)[:, None] + torch.arange(tw, device=dev)
    # Parts that fall outside go to one spare row/column, cut off afterwards.
    spare = dst.new_empty(b, c, h + 1, w + 1)
    spare[:, :, :h, :w] = dst
    rows = torch.where((rows >= 0) & (rows < h), rows, h)
    cols = torch.where((cols >= 0) & (cols < w), cols, w)
    index_b = torch.arange(b, device=dev)[:, None, None]
    spare[index_b, :, rows[:, :, None], cols[:, None, :]] = tile.permute(0, 2, 3, 1)
    return spare[:, :, :h, :w].contiguous()


def where(mask: np.ndarray, a, b):
    """``a`` where the (B, 1, h, w) boolean ``mask`` is set, else ``b``."""
    if isinstance(b, np.ndarray):
        return np.where(mask, a, b)
    return torch.where(torch.as_tensor(mask, device=b.device), a, b)


def native(a: np.ndarray, like):
    return a if isinstance(like, np.ndarray) else torch.as_tensor(a, device=like.device)


def channel_sums(a, channel: int) -> np.ndarray:
    """Per-position float64 sum of one channel of (B, C, ...) values."""
    if isinstance(a, np.ndarray):
        return a[:, channel].reshape(len(a), -1).sum(1, dtype=np.float64)
    return a[:, channel].reshape(len(a), -1).sum(1, dtype=torch.float64).cpu().numpy()


def as_numpy(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.detach().cpu().numpy()


def integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table of a padded (C, H, W) map in float64, with a leading zero row and column."""
    table = np.zeros((a.shape[0], a.shape[1] + 1, a.shape[2] + 1))
    table[:, 1:, 1:] = a.astype(np.float64).cumsum(1).cumsum(2)
    return table


def box_sums(table: np.ndarray, channel: int, row0: np.ndarray, col0: np.ndarray, h: int, w: int) -> np.ndarray:
    """Sums of one channel of a padded map over the boxes [row0, row0+h) x [col0, col0+w)."""
    r0, c0, t = row0 + MARGIN, col0 + MARGIN, table[channel]
    return t[r0 + h, c0 + w] - t[r0, c0 + w] - t[r0 + h, c0] + t[r0, c0]


def exists(row0: np.ndarray, h: int, col0: np.ndarray, w: int, n: int) -> np.ndarray:
    """(B, 1, h, w) float mask: 1 where a conv row and column of the tile exist in the real n x n map.
    Ceil-mode pooling reads one past the end; ReLU outputs are >= 0, so a zero there never wins a max."""
    rows = (row0[:, None] + np.arange(h)) < n
    cols = (col0[:, None] + np.arange(w)) < n
    return (rows[:, None, :, None] & cols[:, None, None, :]).astype(np.float32)
