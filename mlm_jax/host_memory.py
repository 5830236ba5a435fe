"""The C allocator's policy while XLA:CPU runs the steps: freed memory is kept and reused.

XLA:CPU allocates each run of a compiled program's temporary buffer (every intermediate of
a train step: tens of MB at cpu-small, hundreds at distilroberta-base) with `malloc` and frees
it when the run ends. glibc's `malloc` serves a block over its mmap threshold (32 MB at most)
with pages freshly mapped from the kernel and unmaps them on `free`, so every step touches
its whole buffer as new pages: the kernel zero-fills each one on its first write. At
cpu-small that was 16,700 page faults and about 45 ms of system time in a step of 100 ms
(BENCHMARKS.md, *The C allocator*).

`keep_freed_memory()` sets glibc to serve every block from its heap and keep what is freed
for the next step:
- `M_MMAP_MAX` 0: no block gets pages of its own;
- `M_TRIM_THRESHOLD` at its largest: the heap's free top is not handed back to the kernel;
- `M_ARENA_MAX` 1: threads that first allocate from now on share the main heap. Other
  arenas' heaps hold at most 64 MB, and they map a larger block's pages whatever `M_MMAP_MAX`
  says. A thread that already has an arena keeps it, and a new one can take over the arena
  of a thread that has ended: set once JAX's backend has started, the policy still took the
  cpu-small step from 16,700 faults to 1, but left the distilroberta-base step's 187,000 (its
  buffer is over 64 MB, and XLA's threads had their arenas). Set before the backend starts,
  both steps run without a fault, and the base step 20% faster.

The cost is that the process keeps its peak heap for its lifetime rather than shrinking
after a peak: what a training or inference process does anyway. That peak can hold the
step's buffer of temporaries twice: where the freed buffer has been split by smaller
allocations by the time the next step asks for it, the heap grows by a second one. In
ModernBERT's train step at 1,024 to 8,192 tokens that happened in about half the processes
(BENCHMARKS.md, *The allocator at long lengths*). At long lengths the heap stops paying for
that: above `LARGE_STEP_BYTES` of temporaries the step is no faster from the kept heap, and
the second buffer is 1.4 GB and more. There training calls `map_large_blocks()`
(`fit_to_step`): blocks of 32 MB and more get pages of their own again, returned to the
kernel on `free`, while smaller ones stay in the kept heap. It is for the whole process
(the allocator is). The entry points set it first thing, before JAX starts its backend,
where JAX will compute on the CPU (`keep_freed_memory_if_on_cpu`); for library callers,
`steps.compile_steps` and `infer.Predictor` set it where they compile for the CPU, as
`threefry.install` is set. On GPU and TPU the steps' buffers are device memory and the host's
allocator is left alone. Where the C library is not glibc (macOS, musl) it does nothing.
"""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util

import jax

# glibc's <malloc.h> parameter numbers for mallopt(3).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_LARGEST_INT = 2**31 - 1  # mallopt takes an int.
POLICY = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _LARGEST_INT), (M_ARENA_MAX, 1))
# glibc's largest mmap threshold on 64-bit hosts, and its default count of mapped blocks.
LARGE_BLOCKS = ((M_MMAP_THRESHOLD, 32 * 2**20), (M_MMAP_MAX, 65536))
# A step whose temporaries exceed this maps its large blocks (see the module docstring):
# below it the kept heap made ModernBERT's step 7% to 35% faster (1,024 to 4,096 tokens), above
# it no faster.
LARGE_STEP_BYTES = 1_250_000_000


def _glibc() -> ctypes.CDLL | None:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return None
  # gnu_get_libc_version exists in glibc alone; musl has a mallopt that ignores everything.
  if not (hasattr(libc, 'gnu_get_libc_version') and hasattr(libc, 'mallopt')):
    return None
  return libc


def _mallopt(settings) -> bool:
  """Sets each (parameter, value) of `settings`; True where glibc took every one."""
  libc = _glibc()
  if libc is None:
    return False
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


def keep_freed_memory() -> bool:
  """Sets `POLICY` (see the module docstring); True where glibc took every setting."""
  return _mallopt(POLICY)


def map_large_blocks() -> bool:
  """Blocks of 32 MB and more get pages of their own again (`LARGE_BLOCKS`), the rest of
  `POLICY` kept; True where glibc took every setting."""
  return _mallopt(LARGE_BLOCKS)


def fit_to_step(platform: str, temp_bytes: int) -> bool:
  """`map_large_blocks()` where a step on the host's CPU has over `LARGE_STEP_BYTES` of
  temporaries; True where it did."""
  return platform == 'cpu' and temp_bytes > LARGE_STEP_BYTES and map_large_blocks()


def keep_freed_memory_on(platform: str) -> None:
  """`keep_freed_memory()` where the steps run on the host's CPU."""
  if platform == 'cpu':
    keep_freed_memory()


def will_compute_on_cpu() -> bool:
  """Whether JAX will compute on the CPU, told without starting its backends: the platforms it
  is given (`JAX_PLATFORMS`, `jax_platforms`) start with cpu, or none is given and no
  accelerator plugin is installed (CUDA and ROCm come as `jax_plugins`, TPUs need `libtpu`)."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return (importlib.util.find_spec('jax_plugins') is None
          and not importlib.metadata.entry_points(group='jax_plugins')
          and importlib.util.find_spec('libtpu') is None)


def keep_freed_memory_if_on_cpu() -> bool:
  """`keep_freed_memory()` where JAX will compute on the CPU; for entry points, before
  anything starts JAX's backend. True where the policy was set."""
  return will_compute_on_cpu() and keep_freed_memory()
