"""Compile time of ModernBERT's layers unrolled (the package's `layers.LayerStack`) against
scanned (MaxText's `scan_layers`: `nn.scan` over one group of layers, parameters stacked).

ModernBERT alternates layer types (global every `global_attn_every_n_layers`-th, local
otherwise), so a scan body is one period of the pattern (global, local, local) and the
layers past the last whole period run unrolled after it. The scanned model here exists
for this measurement only: its parameters are stacked per group ([groups, ...]) where the
package keeps `layers/0`, `layers/1`, ... (the checkpoints' names).

Each variant compiles the gradient of the MLM loss (forward and backward, full logits) of
one row, in its own process, so that no cache is shared; reported: tracing + lowering and
XLA's compilation in seconds, one timed run, and XLA's temporaries (memory_analysis).

Usage:
  python benchmarks/scan_layers.py                      # ModernBERT-base shape, 22 layers
  python benchmarks/scan_layers.py --layers=7 --seq=256
  python benchmarks/scan_layers.py --seq=1024 --remat_policy=full   # remat inside the scan
"""

import argparse
import json
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from mlm_jax.models import FlaxAutoModelForMaskedLM
from mlm_jax.models import layers
from mlm_jax.models.modernbert import backbone
from mlm_jax.models.modernbert import masked_lm


def config(args) -> transformers.ModernBertConfig:
  return transformers.ModernBertConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, local_attention=128,
      global_attn_every_n_layers=3, max_position_embeddings=8192, pad_token_id=0,
      bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


class _Group(nn.Module):
  """One period of the layer pattern, each layer rematerialised under `remat_policy`."""
  config: object
  size: int
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, hidden, _):
    for offset in range(self.size):
      # index 1 + offset: a layer with attn_norm (as every layer but the first), the type
      # of layer `offset` of the period.
      layer_class = backbone.Layer
      if self.remat_policy != 'none':
        layer_class = nn.remat(backbone.Layer, static_argnums=(3,),
                               policy=layers.REMAT_POLICIES[self.remat_policy])
      hidden = layer_class(self.config, self.size + offset, name=str(offset))(hidden, None, True)
    return hidden, None


class _ScannedBackbone(nn.Module):
  config: object
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, input_ids):
    cfg = self.config
    period = cfg.global_attn_every_n_layers
    groups, rest = divmod(cfg.num_hidden_layers, period)
    hidden, table = backbone.Embeddings(cfg, name='embeddings')(input_ids, True)
    scanned = nn.scan(_Group, variable_axes={'params': 0}, split_rngs={'params': True},
                      length=groups)
    hidden, _ = scanned(cfg, period, self.remat_policy, name='groups')(hidden, None)
    for index in range(rest):
      hidden = backbone.Layer(cfg, groups * period + index, name=f'rest_{index}')(
          hidden, None, True)
    hidden = backbone.norm(cfg, jnp.float32, 'final_norm')(hidden)
    hidden = masked_lm.Head(cfg, name='head')(hidden)
    return masked_lm.Decoder(cfg, name='decoder')(hidden, table)


def measure(args) -> dict:
  cfg = config(args)
  ids = jnp.asarray(np.random.default_rng(0).integers(5, args.vocab, (1, args.seq)), jnp.int32)
  if args.variant == 'unrolled':
    model = FlaxAutoModelForMaskedLM.from_config(cfg, _do_init=False,
                                                 remat_policy=args.remat_policy)
    apply = lambda params: model(ids, params=params).logits
    params = jax.eval_shape(model.init_weights, model.key)
  else:
    module = _ScannedBackbone(cfg, args.remat_policy)
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))['params']
    apply = lambda params: module.apply({'params': params}, ids)

  def loss(params):
    logits = apply(params)
    return -jnp.mean(jax.nn.log_softmax(logits)[0, jnp.arange(args.seq), ids[0]])

  start = time.perf_counter()
  lowered = jax.jit(jax.grad(loss)).lower(params)
  traced = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  real = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  start = time.perf_counter()
  jax.block_until_ready(compiled(real))
  run_s = time.perf_counter() - start
  return {'variant': args.variant, 'remat_policy': args.remat_policy, 'layers': args.layers,
          'seq': args.seq,
          'trace_lower_s': round(traced, 2), 'compile_s': round(compile_s, 2),
          'first_run_s': round(run_s, 2),
          'temp_bytes': compiled.memory_analysis().temp_size_in_bytes}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', type=int, default=22)
  parser.add_argument('--hidden', type=int, default=768)
  parser.add_argument('--heads', type=int, default=12)
  parser.add_argument('--intermediate', type=int, default=1152)
  parser.add_argument('--vocab', type=int, default=50368)
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--remat_policy', choices=sorted(layers.REMAT_POLICIES), default='none',
                      help='each layer rematerialised under this policy, in both variants')
  parser.add_argument('--variant', choices=('unrolled', 'scanned'), default=None,
                      help='measure one variant in this process (default: both, each in its own)')
  args = parser.parse_args()
  if args.variant:
    print(json.dumps(measure(args)), flush=True)
    return
  for variant in ('unrolled', 'scanned'):
    subprocess.run([sys.executable, __file__, *sys.argv[1:], f'--variant={variant}'], check=True)


if __name__ == '__main__':
  main()
