"""Spreading a batch of spectra over several devices (data parallelism).

The cube fits spend their time on one computation repeated for every spectrum: a MAP
fit, a Laplace covariance, the χ² of the 3D model and its gradient. With more than
one accelerator the batch of spectra is split along its first axis, one block per
device (``jax.shard_map``); each device runs the single-device batching of
:func:`kinjax.optimize.map_spectra` on its block and the results come back in the
original order. The spectra are independent, so no device waits for another, and
gradients flow through the split unchanged (the 3D model's L-BFGS is sharded this way).

On a CPU the devices are one by default; tests emulate several with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before JAX starts).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from kinjax.errors import KinjaxError

__all__ = ["AXIS", "spectra_mesh", "shard_batch"]

AXIS = "spectra"
"""Name of the mesh axis the spectra are split along."""


def spectra_mesh(devices=None) -> Mesh | None:
    """A one-axis mesh to split batches of spectra over, or None for one device.

    Parameters
    ----------
    devices : None, "all", int or sequence of jax devices
        None or 1: no sharding (the default everywhere in kinjax). "all": every device of
        JAX's default backend (``jax.devices()``). An int n: the first n of them. A
        sequence: those devices.

    Returns
    -------
    Mesh with axis :data:`AXIS`, or None when only one device would take part.
    """
    if devices is None:
        return None
    available = jax.devices()
    if isinstance(devices, str):
        if devices != "all":
            raise KinjaxError(f"devices={devices!r}: use None, 'all', a count or a list of jax devices")
        chosen = available
    elif isinstance(devices, (int, np.integer)):
        if not 1 <= devices <= len(available):
            raise KinjaxError(f"devices={devices}: JAX sees {len(available)} device(s) "
                              f"({available[0].platform}); ask for 1 to {len(available)}")
        chosen = available[: int(devices)]
    elif isinstance(devices, Sequence) and devices:
        chosen = list(devices)
    else:
        raise KinjaxError(f"devices={devices!r}: use None, 'all', a count or a list of jax devices")
    if len(chosen) == 1:
        return None
    return Mesh(np.asarray(chosen), (AXIS,))


def shard_batch(batch_fn, mesh: Mesh | None):
    """Run ``batch_fn`` with its batch split over the devices of ``mesh``.

    ``batch_fn(*arrays)`` maps over the first axis of every array (all of one length n)
    and returns a pytree of arrays whose first axis is n, one row per input row. The
    returned function has the same signature and results. The batch is padded to a
    multiple of the device count with copies of its first row (a valid spectrum, so the
    padding cannot produce NaN) and the padding is cut from the results. ``mesh`` None:
    ``batch_fn`` itself. Use inside ``jit``.
    """
    if mesh is None:
        return batch_fn
    n_dev = mesh.size
    split = PartitionSpec(AXIS)
    inner = jax.shard_map(batch_fn, mesh=mesh, in_specs=split, out_specs=split, check_vma=False)

    def run(*arrays):
        n = arrays[0].shape[0]
        pad = (-n) % n_dev
        if pad:
            arrays = tuple(jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]) for a in arrays)
        return jax.tree_util.tree_map(lambda out: out[:n], inner(*arrays))

    return run
