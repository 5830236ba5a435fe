"""Runs Python in subprocesses that see N CPU devices, alone or as the hosts of a cluster.

XLA reads the device count once, before jax is first imported, so tests that need
several devices run their code in a fresh interpreter; several hosts are several
processes on 127.0.0.1 joined by `jax.distributed` with gloo collectives.
"""

import os
import socket
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


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def cluster_env(devices: int) -> dict:
  """The environment of one host of a CPU cluster with `devices` devices per host."""
  env = dict(os.environ, PYTHONUNBUFFERED='1', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
  return env


def run_hosts(commands: list[list[str]], devices: int,
              timeout: float = 300) -> list[tuple[str, str]]:
  """Runs one command per host at once; returns each (stdout, stderr), failing on a non-zero exit.

  The processes are killed on the way out, whatever happens.
  """
  processes = [subprocess.Popen(command, cwd=ROOT, env=cluster_env(devices),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for command in commands]
  try:
    outputs = [p.communicate(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      p.kill()
      p.wait()
  for p, (_, stderr) in zip(processes, outputs):
    assert p.returncode == 0, stderr[-3000:]
  return outputs


def start_hosts(flags: list[str], hosts: int = 2, devices: int = 2) -> list[subprocess.Popen]:
  """Starts `hosts` run_train.py processes of one multi-host run on 127.0.0.1."""
  address = f'127.0.0.1:{free_port()}'
  return [subprocess.Popen(
      [sys.executable, 'run_train.py', *flags, f'--coordinator_address={address}',
       f'--num_processes={hosts}', f'--process_id={index}'],
      cwd=ROOT, env=cluster_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for index in range(hosts)]


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
  """(stdout, stderr) of each process once it exits; every process is killed at the end."""
  try:
    return [p.communicate(timeout=timeout) for p in processes]
  finally:
    for p in processes:
      p.kill()
      p.wait()
