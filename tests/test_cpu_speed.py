"""What the CPU speed-ups of the train step must not change (BENCHMARKS.md, *CPU against PyTorch*).

Guards the random bits (Threefry written out on CPU, `mlm_jax.threefry`: the Random123
known answers, and that the loop is really gone).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.extend.random import threefry_2x32

from mlm_jax import threefry

# Random123's known-answer vectors for Threefry-2x32, 20 rounds: (key, counter, output).
KNOWN_ANSWERS = (((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
                 ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
                 ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)))


@pytest.fixture(scope='module', autouse=True)
def written_out_threefry():
  assert threefry.install()


@pytest.mark.parametrize('key, counter, expected', KNOWN_ANSWERS)
def test_written_out_threefry_gives_the_known_answers(key, counter, expected):
  out = jax.jit(threefry_2x32)(jnp.asarray(key, jnp.uint32), jnp.asarray(counter, jnp.uint32))
  assert [int(x) for x in out] == list(expected)


def test_random_bits_lower_without_a_loop_on_cpu():
  lowered = jax.jit(lambda key: jax.random.bits(key, (4, 8))).lower(jax.random.PRNGKey(0))
  assert 'while' not in lowered.as_text()
