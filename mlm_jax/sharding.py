"""Device meshes and batch placement: one code path for 1 device, N devices, N hosts.

Parameters and optimizer state are replicated; batches are sharded on the `data`
mesh axis. Each host feeds only its own slice of every global batch.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D `data` mesh over every device of every host."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Shards dimension `batch_axis` of an array on the `data` axis."""
  return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def process_slice(global_rows: int) -> slice:
  """This host's rows of a global batch of `global_rows` rows.

  Hosts take equal, contiguous slices in process order, which is the order in
  which `jax.make_array_from_process_local_data` lays them out on the mesh.
  """
  count, index = jax.process_count(), jax.process_index()
  if global_rows % count:
    raise ValueError(f'a global batch of {global_rows} rows does not split over {count} hosts')
  rows = global_rows // count
  return slice(index * rows, (index + 1) * rows)


def shard_batch(local_batch: Any, mesh: Mesh | None = None, batch_axis: int = 0,
                layout: str = 'jit') -> Any:
  """Places this host's slice of a batch (a pytree of numpy arrays) on the devices.

  layout='jit': a global `jax.Array` sharded on `batch_axis` over `mesh`.
  layout='pmap': numpy arrays with a leading axis of local devices, for `jax.pmap`.
  """
  if layout == 'pmap':
    n = jax.local_device_count()
    def split(x):
      shape = x.shape[:batch_axis] + (n, x.shape[batch_axis] // n) + x.shape[batch_axis + 1:]
      return np.moveaxis(x.reshape(shape), batch_axis, 0)
    return jax.tree_util.tree_map(split, local_batch)
  if layout != 'jit':
    raise ValueError(f'unknown layout {layout!r}; use "jit" or "pmap"')
  sharding = batch_sharding(mesh, batch_axis)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a pytree (parameters, optimizer state) on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
