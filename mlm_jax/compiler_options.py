"""The XLA options the project's compiled programs are built with, per platform (and one
per model family).

On CPU, two options of XLA's own make the train step and fill-mask faster and leave their
numbers as they were up to float32 rounding (the order of a vectorised sum):
- `xla_cpu_prefer_vector_width=512`: LLVM, which compiles XLA:CPU's element-wise fusions,
  prefers 256-bit vectors on x86 even where the CPU has AVX-512 registers, to spare older
  server parts a lower clock. Where the CPU has them, the GELU's erf, the softmax's
  exponentials and the optimizer's update run twice as wide. Where it has not (AVX2), LLVM
  splits each vector in two: with XLA:CPU held to AVX2 on an AVX-512 machine
  (`xla_cpu_max_isa=AVX2`), the step was no slower with the option than without it.
- `xla_cpu_enable_concurrency_optimized_scheduler=true`: orders the program's ops so that
  more independent ones can run at once on XLA's threads, where the default order keeps
  the fewest buffers alive. The peak memory of the distilroberta-base step did not move.

A train step that rematerialises its layers (`config.remat_policy`) asks for memory rather than
speed, and there the concurrency-optimised scheduler undoes what remat saves: it computes a
layer's recomputed forward as early as it can, so the recomputed activations live as long as
the saved ones would have. Such a step is scheduled for memory instead
(`xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`, `_CPU_SAVING_MEMORY`):
ModernBERT-base's gradient at 8,192 tokens needed 22.6 GB of temporaries without remat, 21.8
GB with `full` under the default scheduler, and 12.0 GB with `full` under this one.

One option is a model family's: `xla_cpu_experimental_ynn_fusion_type` set to YNNPACK's
products alone (`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`), so that XLA's own emitters compute the
reductions and element-wise work that YNNPACK's fusions otherwise take with the products. In
ModernBERT's train step (rotary positions, a norm before every block, GeGLU, banded attention)
that made the step 3% to 7% faster at 1,024 and 2,048 tokens and cut its temporaries by a
fifth; in RoBERTa's small CPU step it made the step 12% slower, so it is set for ModernBERT
alone (`_CPU_BY_FAMILY`, keyed by `config.json`'s `model_type`).

BENCHMARKS.md has the measurements (*XLA:CPU's own options*, *remat_policy*). They are
passed to `jax.jit` at the program's boundary (`compiler_options=`), so they reach every caller of
`steps.compile_steps` and `infer.fill_mask`, the benchmarks and tests included, and are
part of the persistent compilation cache's key. They take precedence over `XLA_FLAGS`
for the options they name. Other platforms get none: their compilers need not know
XLA:CPU's options.

XLA's options come and go between jaxlib releases (0.11.1 dropped
`xla_cpu_use_fusion_emitters`), and one the installed jaxlib lacks fails every compile
(`jax.jit`'s `compiler_options`) or aborts the process (`XLA_FLAGS`). Each option is
therefore probed once, by compiling a one-operation program with it, and passed only
where the installed jaxlib accepts it (`accepted`).
"""

import functools
import types

import jax

_CPU = types.MappingProxyType({
    'xla_cpu_prefer_vector_width': 512,
    'xla_cpu_enable_concurrency_optimized_scheduler': True,
})


_CPU_SAVING_MEMORY = types.MappingProxyType({
    'xla_cpu_prefer_vector_width': 512,
    'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED',
})


# By model family (`model_type`): what its CPU steps add (see the module docstring).
_CPU_BY_FAMILY = types.MappingProxyType({
    'modernbert': types.MappingProxyType({
        'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}),
})


def for_platform(platform: str, saving_memory: bool = False, family: str | None = None) -> dict:
  """The options for a program compiled for `platform` ('cpu', 'gpu', 'tpu', ...) that the
  installed jaxlib knows; `saving_memory` for a step that rematerialises, `family` the model's
  `model_type` where its train step is compiled."""
  if platform != 'cpu':
    return {}
  options = _CPU_SAVING_MEMORY if saving_memory else _CPU
  return accepted({**options, **_CPU_BY_FAMILY.get(family, {})})


def accepted(options) -> dict:
  """Those of `options` (XLA option name -> value) that the installed XLA accepts, probed on
  the default backend."""
  return {name: value for name, value in options.items() if _accepts(name, value)}


@functools.cache
def _accepts(name: str, value) -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
  except jax.errors.JaxRuntimeError as e:
    if 'No such compile option' in str(e) or name in str(e):
      return False
    raise
  return True


def for_mesh(mesh, saving_memory: bool = False, family: str | None = None) -> dict:
  """The options for a program over `mesh`'s devices."""
  return for_platform(mesh.devices.flat[0].platform, saving_memory, family)
