"""The Gluon calls the kernels use, resolved once for the installed Triton release.

`triton.experimental.gluon` renames calls between releases; the kernels call the names below and
never test a release themselves. What moved, per supported release (3.6.0 ... 3.9.0):

| kernels call | 3.6 | 3.7 | 3.8 | 3.9 |
|---|---|---|---|---|
| `barrier()` | `gl.thread_barrier` | `gl.barrier` | `gl.barrier` | `gl.barrier` |
| `async_load(smem, ptr, mask=)` | `cp.async_copy_global_to_shared` | same | `cp.async_load` | `cp.async_load` (the old name raises) |

Layouts, shared-memory descriptors, `mma_v2`, `commit_group` and `wait_group` keep their names on
every supported release. Importing this module raises ImportError where Triton has no Gluon; the
package (`kernels/gluon/__init__.py`) catches it. `MISSING` says which calls this release's Gluon
lacks under every known name (None: none).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

__all__ = ["async_load", "barrier", "cp", "gl", "gluon", "mma_v2"]


def _first(module, *names):
    """The first of `names` that `module` defines (a release's spelling of one call)."""
    for name in names:
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    return None


# The block-wide barrier: `thread_barrier` until 3.6, `barrier` from 3.7.
barrier = _first(gl, "barrier", "thread_barrier")
# cp.async of a global tile into shared memory: `async_load` from 3.8; in 3.9 the old name is a stub
# that raises, so the new name is looked up first.
async_load = _first(cp, "async_load", "async_copy_global_to_shared")

_missing = [n for n, f in (("barrier", barrier), ("async_load", async_load)) if f is None]
MISSING = f"this Triton release's Gluon has no {' or '.join(_missing)} under any known name" if _missing else None
