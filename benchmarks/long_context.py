"""Long-sequence train step of a small ModernBERT: sliding windows through
`jax.nn.dot_product_attention(local_window_size=...)` against a dense [L, L] window mask.

The step is forward + backward of the masked-LM loss (cross-entropy at 15% of the
positions, gradients of every parameter; no optimizer) of a randomly initialised
`ModernBertForMaskedLM`, batch 1, float32, global attention every `--every` layers and
local layers of `--window` tokens in between. The two variants differ only in how a local
layer restricts its keys:

  * local_window_size: `layers.attend(..., local_window=(w, w))`, the model as it is;
  * dense mask: the same window as a boolean [1, 1, L, L] mask (`layers.window_mask`,
    built inside the step) handed to `jax.nn.dot_product_attention` as `mask`.

Each (variant, length) runs in its own process, so that its peak RSS is its own. Reported:
compile time, the median of `--steps` synced steps, XLA's temporary buffer size for the
compiled step (`memory_analysis().temp_size_in_bytes`: the step's scratch memory, the
saved attention probabilities included), the process's peak RSS, and the loss (the same
for both variants: they compute one thing).

On XLA (CPU, and GPU with attention_impl 'xla'), `local_window_size` builds the same
[L, L] mask inside `dot_product_attention` and computes every [L, L] logit, so both variants
should take the same time and memory there; cuDNN's sliding-window kernel on GPU is where the
window can save work. 2 CPU cores: about a minute for 2048 tokens, two to four for 4096.

Usage (from the repository root):
  python benchmarks/long_context.py                      # 2048 and 4096 tokens
  python benchmarks/long_context.py --seqs 1024 2048 --window 64 --json /tmp/long.json
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from mlm_jax.models import FlaxAutoModelForMaskedLM
from mlm_jax.models import layers

VARIANTS = ('local_window_size', 'dense mask')


def _config(args) -> transformers.ModernBertConfig:
  return transformers.ModernBertConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      global_attn_every_n_layers=args.every, local_attention=args.window,
      max_position_embeddings=max(args.seqs), pad_token_id=0, bos_token_id=1, eos_token_id=2,
      cls_token_id=1, sep_token_id=2)


def _attend_with_dense_mask(query, key, value, mask, *, local_window=None, **kwargs):
  """`layers.attend` with the window turned into a boolean [1, 1, L, L] mask."""
  if local_window is not None:
    window = layers.window_mask(query.shape[1], key.shape[1], local_window)
    mask = layers.combine_masks(mask, window)
  return _ATTEND(query, key, value, mask, **kwargs)


_ATTEND = layers.attend


def _step(model):
  """Loss and gradients of the masked-LM loss at the positions `weights` marks."""
  def loss(params, ids, labels, weights):
    logits = model(ids, params=params).logits.astype(jnp.float32)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
    return -jnp.sum(picked * weights) / jnp.sum(weights)
  return jax.jit(jax.value_and_grad(loss))


def measure(args, variant: str, seq: int) -> dict:
  """One variant at one length, in this process."""
  model = FlaxAutoModelForMaskedLM.from_config(_config(args), _do_init=False)
  params = jax.jit(model.init_weights)(model.key)
  rng = np.random.RandomState(0)
  ids = rng.randint(3, args.vocab, (1, seq)).astype(np.int32)
  weights = (rng.rand(1, seq) < 0.15).astype(np.float32)
  inputs = (params, ids, ids, weights)
  patch = (mock.patch.object(layers, 'attend', _attend_with_dense_mask)
           if variant == 'dense mask' else contextlib.nullcontext())
  start = time.perf_counter()
  with patch:
    compiled = _step(model).lower(*inputs).compile()
  compile_s = time.perf_counter() - start
  loss, _ = jax.block_until_ready(compiled(*inputs))
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - start)
  memory = compiled.memory_analysis()
  return dict(variant=variant, seq=seq, loss=float(loss), compile_s=compile_s,
              step_s=statistics.median(times),
              temp_mb=memory.temp_size_in_bytes / 2**20 if memory else float('nan'),
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)


def _in_subprocess(variant: str, seq: int) -> dict:
  command = [sys.executable, __file__, *sys.argv[1:], '--one', f'{variant}:{seq}']
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=os.environ | {'PYTHONPATH': os.getcwd()})
  if result.returncode:
    raise RuntimeError(f'{variant} at {seq} tokens failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def _print_table(rows: list[dict], args) -> None:
  print(f'ModernBERT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, '
        f'global every {args.every}, local_attention {args.window}, vocab {args.vocab}, '
        f'batch 1, float32; {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f}')
  print(f'{"seq":>6} {"variant":>18} {"compile s":>10} {"step s":>8} {"XLA temp MB":>12} '
        f'{"peak RSS MB":>12} {"loss":>10}')
  for r in rows:
    print(f'{r["seq"]:>6} {r["variant"]:>18} {r["compile_s"]:>10.1f} {r["step_s"]:>8.3f} '
          f'{r["temp_mb"]:>12.0f} {r["peak_rss_mb"]:>12.0f} {r["loss"]:>10.6f}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seqs', type=int, nargs='+', default=[2048, 4096])
  parser.add_argument('--layers', type=int, default=3)
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--every', type=int, default=3, help='global_attn_every_n_layers')
  parser.add_argument('--window', type=int, default=128, help='local_attention')
  parser.add_argument('--vocab', type=int, default=1024)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--json', help='also write the rows here')
  parser.add_argument('--one', help=argparse.SUPPRESS)  # variant:seq, run in this process.
  args = parser.parse_args()
  if args.one:
    variant, seq = args.one.rsplit(':', 1)
    print(json.dumps(measure(args, variant, int(seq))))
    return
  rows = [_in_subprocess(variant, seq) for seq in args.seqs for variant in VARIANTS]
  _print_table(rows, args)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
