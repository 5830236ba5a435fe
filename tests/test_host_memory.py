"""Guards the C allocator's policy for XLA:CPU's steps (`mlm_jax.host_memory`): once set, a
freed block over glibc's mmap threshold is reused from the heap, not mapped again as fresh
pages that the kernel zero-fills on first touch (the page faults that cost a cpu-small step
45 ms a step before), by the thread that set it and by threads started after; compiling CPU
steps or a CPU fill-mask predictor sets it, in a process that had glibc's defaults; the
entry points' early call sets it without starting JAX's backend, and only for the CPU; and
a step with large temporaries maps its large blocks again.
"""

import ctypes
import pathlib
import resource
import subprocess
import sys
import textwrap

import pytest

from mlm_jax import host_memory

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCK = 64 << 20  # Over glibc's largest mmap threshold (32 MB), as a step's buffers are.
PAGES = BLOCK // resource.getpagesize()

pytestmark = pytest.mark.skipif(host_memory._glibc() is None,  # pylint: disable=protected-access
                                 reason='the C library is not glibc')


def faults_of_a_fresh_block(size: int = BLOCK) -> int:
  """Page faults of this thread writing a fresh `size`-byte malloc'd block: the second of two
  (the first may grow the heap)."""
  libc = host_memory._glibc()  # pylint: disable=protected-access
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  for _ in range(2):
    block = libc.malloc(size)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    ctypes.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    libc.free(block)
  return faults


def test_a_freed_block_is_reused_without_new_pages():
  assert host_memory.keep_freed_memory()
  assert faults_of_a_fresh_block() < PAGES // 100


def test_a_thread_started_after_the_policy_reuses_freed_blocks_too():
  """XLA's threads allocate the steps' buffers: in an arena of their own, a block over 64 MB
  would get fresh pages whatever the mmap setting. In a fresh process, as the entry points
  set the policy before XLA's threads allocate (a thread may otherwise take over the arena of
  one that has ended: the policy cannot reach those)."""
  assert int(_in_a_fresh_process('''
      import concurrent.futures
      from mlm_jax import host_memory
      from tests.test_host_memory import BLOCK, faults_of_a_fresh_block
      assert host_memory.keep_freed_memory()
      with concurrent.futures.ThreadPoolExecutor(max_workers=1) as new_thread:
        print(new_thread.submit(faults_of_a_fresh_block, 2 * BLOCK).result())
  ''')) < 2 * PAGES // 100


def _in_a_fresh_process(script: str) -> str:
  """What `script` (indented as it comes) prints, run by a new Python in the repository."""
  return subprocess.run([sys.executable, '-c', textwrap.dedent(script)], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120, check=True).stdout


# Each place that compiles for the CPU, in a fresh process: the block's faults under glibc's
# defaults, then after it has run.
CPU_COMPILATIONS = {
    'compile_steps': '''
        import optax
        from mlm_jax import masking, sharding, steps
        spec = masking.MaskingSpec(mask_token_id=4, special_ids=(0, 1, 2, 3, 4), vocab_size=100)
        schedule = optax.constant_schedule(0.1)
        steps.compile_steps(model, optax.sgd(schedule), schedule, spec, 0, sharding.make_mesh())
    ''',
    'Predictor': '''
        from mlm_jax import infer
        infer.Predictor(model, model.params, tokenizer=None)
    ''',
}


@pytest.mark.parametrize('compilation', sorted(CPU_COMPILATIONS))
def test_compiling_for_the_cpu_sets_the_policy(compilation):
  script = textwrap.dedent('''
      import os
      os.environ['JAX_PLATFORMS'] = 'cpu'
      import transformers
      from mlm_jax.models import FlaxAutoModelForMaskedLM
      from tests.test_host_memory import faults_of_a_fresh_block
      print(faults_of_a_fresh_block())
      model = FlaxAutoModelForMaskedLM.from_config(transformers.RobertaConfig(
          vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
          intermediate_size=16, max_position_embeddings=18, type_vocab_size=1), seed=0)
  ''') + textwrap.dedent(CPU_COMPILATIONS[compilation]) + 'print(faults_of_a_fresh_block())\n'
  defaults, after = map(int, _in_a_fresh_process(script).split()[-2:])
  if defaults < PAGES // 2:
    pytest.skip(f'this kernel maps fresh blocks in huge pages ({defaults} faults for {PAGES} '
                'pages): no fresh page to count')
  assert after < PAGES // 100


def test_entry_points_set_the_policy_before_jax_starts_where_it_computes_on_cpu():
  """run_train.py and run_infer.py call `keep_freed_memory_if_on_cpu` first thing: it must
  tell the platform without starting JAX's backend (whose threads would take their own
  arenas first), and leave the allocator alone where JAX will compute on an accelerator."""
  told_cuda, told_cpu = _in_a_fresh_process('''
      import jax
      from jax._src import xla_bridge  # No public API tells whether the backend started.
      from mlm_jax import host_memory
      from tests.test_host_memory import faults_of_a_fresh_block
      jax.config.update('jax_platforms', 'cuda')
      print(host_memory.keep_freed_memory_if_on_cpu(), faults_of_a_fresh_block())
      jax.config.update('jax_platforms', 'cpu')
      print(host_memory.keep_freed_memory_if_on_cpu(), faults_of_a_fresh_block(),
            xla_bridge.backends_are_initialized())
  ''').splitlines()
  set_for_cuda, faults_for_cuda = told_cuda.split()
  if int(faults_for_cuda) < PAGES // 2:
    pytest.skip('this kernel maps fresh blocks in huge pages: no fresh page to count')
  assert set_for_cuda == 'False'
  set_for_cpu, faults_for_cpu, backend_started = told_cpu.split()
  assert set_for_cpu == 'True' and int(faults_for_cpu) < PAGES // 100
  assert backend_started == 'False'


def test_a_step_with_large_temporaries_maps_its_large_blocks_again():
  """Over `LARGE_STEP_BYTES` of a CPU step's temporaries, a block of 128 MB that the kept
  heap cannot serve from its free memory gets pages of its own again, which go back to the
  kernel on `free` (so the heap cannot come to hold a step's buffer twice), while a block of
  16 MB is still served from the kept heap. At the threshold, or for a step on an
  accelerator, the kept heap stays as it is."""
  defaults, kept, mapped = (line.split() for line in _in_a_fresh_process('''
      from mlm_jax import host_memory
      from tests.test_host_memory import BLOCK, faults_of_a_fresh_block
      print(faults_of_a_fresh_block())
      assert host_memory.keep_freed_memory()
      limit = host_memory.LARGE_STEP_BYTES
      print(host_memory.fit_to_step('cpu', limit), host_memory.fit_to_step('gpu', 2 * limit),
            faults_of_a_fresh_block())
      print(host_memory.fit_to_step('cpu', limit + 1), faults_of_a_fresh_block(2 * BLOCK),
            faults_of_a_fresh_block(BLOCK // 4))
  ''').splitlines())
  if int(defaults[0]) < PAGES // 2:
    pytest.skip('this kernel maps fresh blocks in huge pages: no fresh page to count')
  assert kept[:2] == ['False', 'False'] and int(kept[2]) < PAGES // 100
  assert mapped[0] == 'True' and int(mapped[1]) > PAGES  # Of the 2 * PAGES, fresh each time.
  assert int(mapped[2]) < PAGES // 4 // 100
