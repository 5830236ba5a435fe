"""Threefry-2x32 written out on CPU: the same random bits as JAX's, at a fraction of the cost.

Every random draw of a step (masking, dropout) is JAX's default Threefry-2x32 hash of a
counter. On CPU, JAX lowers the hash's 5 groups of 4 rounds as a rolled `while` loop (to
compile faster), so each draw becomes a loop that writes and reads its whole
[batch, seq, hidden] state 5 times; written out, as JAX lowers it on GPU and TPU, the 20
rounds fuse into one elementwise pass. The hash, hence every bit, is unchanged: the
Random123 known-answer vectors are checked in tests/test_threefry.py.

`install()` registers the written-out lowering for CPU, for the whole process (the hash is a
JAX primitive: lowering rules are per platform, not per call); it must run before a step is
compiled (`steps.compile_steps` calls it).
"""

import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
_installed = False


def hash_2x32(key1, key2, x1, x2):
  """Threefry-2x32 with 20 rounds (Salmon et al., SC 2011) of uint32 arrays, written out."""
  keys = (key1, key2, key1 ^ key2 ^ _PARITY)
  x = [x1 + keys[0], x2 + keys[1]]
  for group in range(5):
    for rotation in _ROTATIONS[group % 2]:
      x[0] = x[0] + x[1]
      x[1] = (x[1] << np.uint32(rotation)) | (x[1] >> np.uint32(32 - rotation))
      x[1] = x[0] ^ x[1]
    x[0] = x[0] + keys[(group + 1) % 3]
    x[1] = x[1] + keys[(group + 2) % 3] + np.uint32(group + 1)
  return tuple(x)


def install() -> bool:
  """Lowers JAX's threefry2x32 primitive written out on CPU; True once it is (idempotent).

  A JAX without the hooks used here keeps its own lowering: the same bits, slower.
  """
  global _installed  # pylint: disable=global-statement
  if not _installed:
    try:
      from jax.extend.random import threefry2x32_p  # pylint: disable=import-outside-toplevel
      from jax.interpreters import mlir  # pylint: disable=import-outside-toplevel
    except ImportError:
      return False
    mlir.register_lowering(threefry2x32_p, mlir.lower_fun(hash_2x32, multiple_results=True),
                           platform='cpu')
    _installed = True
  return _installed
