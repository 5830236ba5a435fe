"""What the hosts' stop agreement (`preemption.agreed_stop`) costs per training step.

Starts `--processes` processes of `--devices` CPU devices each on 127.0.0.1
(`jax.distributed`, gloo). Each runs the same jitted step (a matmul chain on a
batch sharded over every device, the state replicated, donated) back to back for
`--steps` steps, once without any agreement and once calling `agreed_stop` after
every step with `every=1, 10`, and prints the mean step time of each and the
difference. The agreement is a small all-gather of one int32 per host; it waits for
the steps queued before it, which is most of its cost.

    python benchmarks/stop_agreement.py --processes=2 --devices=2 --steps=200
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

_WORKER = r'''
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from mlm_jax import cli
cli.initialize_distributed(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
from mlm_jax import preemption, sharding
steps, width = int(sys.argv[4]), int(sys.argv[5])
mesh = sharding.make_mesh()
replicated = sharding.replicated(mesh)
batch = sharding.shard_batch(np.ones((8 * jax.device_count(), width), np.float32), mesh)

@jax.jit
def step(w, x):
  y = x
  for _ in range(4):
    y = jnp.tanh(y @ w)
  return w - 1e-6 * jnp.mean(y) * w

def timed(every):
  w = jax.device_put(jnp.eye(width), replicated)
  w = step(w, batch); w.block_until_ready()  # Compiled before timing.
  with preemption.StopRequest() as stop:
    start = time.perf_counter()
    for i in range(1, steps + 1):
      w = step(w, batch)
      if every and preemption.agreed_stop(stop, i, every):
        break
    w.block_until_ready()
  return (time.perf_counter() - start) / steps * 1e3

results = {str(every): timed(every) for every in (0, 1, 10, 0)}
if jax.process_index() == 0:
  print(json.dumps(results))
'''


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices', type=int, default=2)
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--width', type=int, default=256)
  parser.add_argument('--timeout', type=float, default=600)
  args = parser.parse_args()
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'127.0.0.1:{s.getsockname()[1]}'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={args.devices}',
             PYTHONPATH=root)
  workers = [subprocess.Popen([sys.executable, '-c', _WORKER, address, str(args.processes),
                               str(i), str(args.steps), str(args.width)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(args.processes)]
  try:
    outputs = [w.communicate(timeout=args.timeout) for w in workers]
  except subprocess.TimeoutExpired:
    for w in workers:
      w.kill()
    sys.exit('the workers did not finish: ' + workers[0].stderr.read()[-3000:])
  finally:
    for w in workers:
      w.kill()
      w.wait()
  lines = [line for line in outputs[0][0].splitlines() if line.startswith('{')]
  if not lines:
    sys.exit(outputs[0][1][-3000:])
  times = json.loads(lines[-1])
  base = times['0']  # The second no-agreement pass (the first warms caches).
  print(f'{args.processes} processes x {args.devices} CPU devices, width {args.width}, '
        f'{args.steps} steps; load average {os.getloadavg()[0]:.2f}')
  print(f'no agreement:          {base:8.3f} ms/step')
  for every in ('1', '10'):
    print(f'agreement every {every:>2} steps: {times[every]:8.3f} ms/step '
          f'(+{times[every] - base:.3f} ms/step)')


if __name__ == '__main__':
  main()
