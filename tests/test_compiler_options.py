"""Guards that XLA's options reach the compiler only where the installed jaxlib has them: an
option a jaxlib release dropped must not fail a compile (nor abort a process through
`XLA_FLAGS`), on the oldest and the newest jax the project supports."""

import jax

from mlm_jax import compiler_options


def test_an_option_the_installed_xla_lacks_is_dropped_and_a_known_one_kept():
  assert compiler_options.accepted({'not_an_xla_option': 1,
                                    'xla_backend_optimization_level': 3}) == {
                                        'xla_backend_optimization_level': 3}


def test_the_cpu_options_are_known_to_the_installed_jaxlib():
  """Both speed options exist from jax 0.10 to 0.12; one that a later jaxlib drops shows here,
  not as a slower step nobody notices."""
  assert compiler_options.for_platform('cpu') == dict(compiler_options._CPU)  # pylint: disable=protected-access


def test_the_cpu_options_compile():
  compiled = jax.jit(lambda x: x * 2, compiler_options=compiler_options.for_platform('cpu'))
  assert float(compiled(1.5)) == 3.0


def test_modernberts_cpu_steps_leave_ynnpack_the_products_alone():
  """Its family's option joins the CPU options (known to every jaxlib the project supports);
  other families get the CPU options alone, and other platforms none."""
  assert compiler_options.for_platform('cpu', family='modernbert') == {
      **compiler_options._CPU,  # pylint: disable=protected-access
      'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
  assert compiler_options.for_platform('cpu', family='roberta') == dict(compiler_options._CPU)  # pylint: disable=protected-access
  assert compiler_options.for_platform('gpu', family='modernbert') == {}
