"""Device meshes and placement: one code path for 1 device, N devices, N hosts.

The mesh has two axes, `data` and `fsdp`. Batches are sharded over both (every
device gets its own rows). With `fsdp` of size 1 (the default) parameters and
optimizer state are replicated: plain data parallelism. A larger `fsdp` axis
shards them too, for models whose state does not fit one device. Each host feeds
only its own slice of every global batch.
"""

from typing import Any, Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlm_jax.errors import UserError

T = TypeVar('T')

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
_MIN_SHARDED_SIZE = 1 << 14  # Smaller arrays stay replicated: sharding them saves nothing.


def make_mesh(fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over every device of every host.

  Devices are ordered by host, so each host's devices hold a contiguous run of a
  batch's rows: the rows that host feeds (see `process_slice`).
  """
  devices = jax.devices() if devices is None else devices
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  if fsdp < 1 or len(devices) % fsdp:
    raise UserError(f'fsdp={fsdp} must divide the {len(devices)} devices; set --config.fsdp')
  return Mesh(np.asarray(devices).reshape(-1, fsdp), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Shards dimension `batch_axis` of an array over all devices (`data` x `fsdp`)."""
  return NamedSharding(mesh, P(*([None] * batch_axis), BATCH_AXES))


def state_sharding(tree: Any, mesh: Mesh) -> Any:
  """Shardings for a train state: replicated, or large arrays split on the `fsdp` axis.

  Each large array is split along its largest dimension that the `fsdp` axis divides;
  the rest stay replicated. Adam's moments mirror the parameters, so they split alike.
  """
  size = mesh.shape[FSDP_AXIS]

  def rule(x) -> NamedSharding:
    shape = np.shape(x)
    if size == 1 or np.prod(shape, dtype=np.int64) < _MIN_SHARDED_SIZE:
      return replicated(mesh)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % size == 0:
        spec = [None] * len(shape)
        spec[dim] = FSDP_AXIS
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree_util.tree_map(rule, tree)


def to_host(tree: Any) -> Any:
  """Numpy copies of a pytree of (possibly multi-host) arrays, on every host.

  Collective when an array is sharded across hosts: every process must call it.
  """
  def fetch(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree_util.tree_map(fetch, tree)


def gather_hosts(values: np.ndarray) -> np.ndarray:
  """`values` of every host, stacked in process order ([hosts, ...]); collective."""
  if jax.process_count() == 1:
    return np.asarray(values)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def sync_hosts(name: str) -> None:
  """A barrier across hosts (a no-op on one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def host_flag(flag: bool) -> bool:
  """Process 0's `flag`, on every host (collective: every process must call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def on_process_zero(fn: Callable[[], T], failure: str) -> T | None:
  """`fn()` on process 0 alone (None elsewhere), the hosts waiting for it. Every host learns
  whether it succeeded, so that none waits forever for a failed process 0 (which raises its
  own error): the others raise `UserError(failure)`.

  The hosts meet once before process 0 starts: the first collective over a set of devices
  connects them, and over gloo (jax 0.12.1) gives up on a host more than 30 s late, as the
  hosts waiting for a long `fn` would be. Connected, they wait as long as `fn` takes.
  """
  host_flag(False)
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except BaseException as e:  # pylint: disable=broad-exception-caught
      error = e
  if host_flag(error is not None):
    raise error if error is not None else UserError(failure)
  return result


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
