"""Small dask helpers shared by the lazy wrappers."""

from __future__ import annotations

from typing import Any

import dask.array as da


def window_delayed(x: Any) -> Any:
    """``x`` as one Delayed that shares the keys of ``x``'s graph (numpy passes through).

    Passing a dask array straight to ``dask.delayed(f)(x)`` optimises each such argument
    on its own (fusing and renaming its tasks), so per-tile tasks that read overlapping
    windows of one lazy product would each recompute it — measured: 90 × the
    L.A.Cosmic calls of a coadd written tile by tile. A window merged into one block and
    taken with ``to_delayed(optimize_graph=False)`` keeps the original keys, so every
    upstream task runs once however many windows read it.
    """
    if not isinstance(x, da.Array):
        return x
    if x.npartitions != 1:
        x = x.rechunk(x.shape)
    return x.to_delayed(optimize_graph=False).ravel()[0]
