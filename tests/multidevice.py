"""Runs a snippet of Python in a subprocess that sees N CPU devices.

XLA reads the device count once, before jax is first imported, so tests that need
several devices run their code in a fresh interpreter.
"""

import os
import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def run_with_devices(code: str, devices: int = 8, timeout: float = 900) -> str:
  """Runs `code` with `devices` CPU devices; returns its stdout, failing on a non-zero exit."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
  result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout
