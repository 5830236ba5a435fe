"""Fill-mask inference throughput: texts/s of `mlm_jax.infer.fill_mask` on CPU.

One call of `fill_mask` takes a batch of `--batch` texts (64 by default) with one
`<mask>` each: it tokenizes them, pads them to one bucketed shape, runs the
jit-compiled forward + top-k and decodes the fills. Reported:
  * first call: includes compiling the forward for this padded shape;
  * steady state: `--repeats` further calls on the same texts (same padded shape, so the
    compiled forward is reused); median and mean.
texts/s = batch / seconds per call, tokenization and decoding included.

The model is a training workdir or HF-format directory (`--model`, loaded with
`infer.load_predictor`), or by default a freshly initialised RoBERTa with a byte-level BPE
tokenizer trained by `tokenizer.train_bpe_tokenizer` on the package's ELI5 sample
(answers texts). `--shape` picks its size: `tiny` (the default config's 2 layers x 128)
or `distilroberta-base` (6 layers x 768, vocab 50265, random init). The texts are the
first `--words` words of the sample's answers, the middle word replaced by `<mask>`.

Runs on CPU unless JAX_PLATFORMS is set otherwise.

Usage:
  python benchmarks/infer.py                                  # tiny model
  python benchmarks/infer.py --shape=distilroberta-base       # distilroberta-base size
  python benchmarks/infer.py --model=runs/tiny                # a training workdir
  python benchmarks/infer.py --model=runs/tiny/export --repeats=20 --json=/tmp/infer.json
  python benchmarks/infer.py --model=DIR --compilation_cache  # twice: the first call, cached
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # Before jax is imported.
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import argparse  # pylint: disable=wrong-import-position
import dataclasses
import json
import pathlib
import statistics
import time
from typing import Sequence

import jax
import transformers

from mlm_jax import cli
from mlm_jax.data import sources
from mlm_jax import infer
from mlm_jax import model as model_lib
from mlm_jax import validation
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.models import FlaxAutoModelForMaskedLM

SEED = 0
TOKENIZER_VOCAB = 4096  # configs/default.py's tokenizer_vocab_size.


@dataclasses.dataclass(frozen=True)
class ModelShape:
  layers: int
  hidden: int
  heads: int
  intermediate: int
  vocab: int | None  # None: the tokenizer's size.


SHAPES = {
    'tiny': ModelShape(layers=2, hidden=128, heads=4, intermediate=512, vocab=None),
    'distilroberta-base': ModelShape(layers=6, hidden=768, heads=12, intermediate=3072,
                                     vocab=50265),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default=None,
                      help='training workdir or HF-format directory; default: a fresh model')
  parser.add_argument('--shape', choices=sorted(SHAPES), default='tiny',
                      help='size of the fresh model (ignored with --model)')
  parser.add_argument('--batch', type=int, default=64, help='texts per fill_mask call')
  parser.add_argument('--words', type=int, default=24, help='words per text')
  parser.add_argument('--repeats', type=int, default=10, help='timed steady-state calls')
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--json', default=None, metavar='PATH', help='write the results here')
  parser.add_argument('--compilation_cache', action='store_true',
                      help="use run_infer.py's persistent compilation cache "
                           '(cli.use_compilation_cache): run twice, the second first call reads it')
  args = parser.parse_args(argv)
  if min(args.batch, args.words, args.repeats) < 1 or args.words < 3:
    parser.error('--batch and --repeats must be at least 1, --words at least 3')
  return args


# ----------------------------------------------------------------------------
# Texts and model.


def sample_answers() -> list[str]:
  """Each sample example's answers.text joined, as `sources.to_texts` does."""
  texts = []
  with open(sources.sample_data_path(), encoding='utf-8') as f:
    for line in f:
      answers = json.loads(line)['answers']['text']
      texts.append(' '.join(a for a in answers if a))
  return texts


def one_mask_texts(answers: Sequence[str], count: int, words: int) -> list[str]:
  """`count` texts of `words` words, the middle one masked; cycles through the answers."""
  usable = [a.split() for a in answers if len(a.split()) >= words]
  if not usable:
    raise SystemExit(f'no sample answer has {words} words; lower --words')
  texts = []
  for i in range(count):
    chosen = list(usable[i % len(usable)][:words])
    chosen[words // 2] = infer.USER_MASK
    texts.append(' '.join(chosen))
  return texts


def varied_mask_texts(answers: Sequence[str], count: int, fewest: int, most: int) -> list[str]:
  """`count` one-mask texts of `fewest` to `most` words, lengths spread evenly in an order
  that mixes short and long (as texts read from a file come)."""
  span = most - fewest + 1
  return [one_mask_texts(answers[i:] + answers[:i], 1, fewest + (i * 37) % span)[0]
          for i in range(count)]


def fresh_predictor(shape: ModelShape, answers: Sequence[str]) -> infer.Predictor:
  tokenizer = tokenizer_lib.train_bpe_tokenizer(answers, TOKENIZER_VOCAB,
                                                model_max_length=validation.SCRATCH_MAX_LENGTH)
  config = transformers.RobertaConfig(
      vocab_size=shape.vocab or len(tokenizer), hidden_size=shape.hidden,
      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
      intermediate_size=shape.intermediate,
      max_position_embeddings=validation.SCRATCH_MAX_LENGTH + tokenizer.pad_token_id + 1,
      type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  model = FlaxAutoModelForMaskedLM.from_config(config, seed=SEED)
  return infer.Predictor(model, model.params, tokenizer)


def padded_shapes(predictor: infer.Predictor, texts: Sequence[str]) -> list[tuple[int, int]]:
  """(rows, length) of each batch `fill_mask` builds for `texts` at a batch size of all of
  them (one batch per padded length)."""
  encoded = infer.encode(predictor.tokenizer, texts,
                         model_lib.max_block_size(predictor.model.config))
  return [batch.ids.shape for batch in
          infer.padded_batches(predictor.tokenizer, encoded, batch_size=len(texts))]


def load_average() -> list[float]:
  """The host's 1/5/15-minute load averages: other work on the machine skews CPU figures."""
  return [round(x, 2) for x in os.getloadavg()]


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------
# Measurement.


def time_call(predictor: infer.Predictor, texts: Sequence[str], top_k: int) -> float:
  start = time.perf_counter()
  results = infer.fill_mask(predictor, texts, top_k=top_k, batch_size=len(texts))
  elapsed = time.perf_counter() - start
  assert len(results) == len(texts) and all(len(r) == 1 for r in results)
  return elapsed


def measure(predictor: infer.Predictor, texts: Sequence[str], top_k: int,
            repeats: int) -> dict:
  first = time_call(predictor, texts, top_k)
  steady = [time_call(predictor, texts, top_k) for _ in range(repeats)]
  median, mean = statistics.median(steady), statistics.fmean(steady)
  return {'first_call_s': first, 'first_call_texts_per_s': len(texts) / first,
          'steady_s_median': median, 'steady_s_mean': mean, 'steady_s': steady,
          'steady_texts_per_s_median': len(texts) / median,
          'steady_texts_per_s_mean': len(texts) / mean}


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.compilation_cache:
    cli.use_compilation_cache()
  load_before = load_average()
  answers = sample_answers()
  texts = one_mask_texts(answers, args.batch, args.words)
  start = time.perf_counter()
  if args.model:
    predictor, source = infer.load_predictor(args.model), args.model
  else:
    predictor, source = fresh_predictor(SHAPES[args.shape], answers), f'fresh {args.shape}'
  load_s = time.perf_counter() - start
  config = predictor.model.config
  shapes = padded_shapes(predictor, texts)
  result = {'device_kind': jax.devices()[0].device_kind, 'model': source,
            'layers': config.num_hidden_layers, 'hidden': config.hidden_size,
            'vocab': config.vocab_size, 'params': count_params(predictor.params),
            'batch': len(texts), 'padded_shapes': [list(shape) for shape in shapes],
            'load_s': load_s,
            **measure(predictor, texts, args.top_k, args.repeats),
            'load_average_before': load_before, 'load_average_after': load_average()}

  print(f'device: {result["device_kind"]} ({jax.device_count()} device, '
        f'{os.cpu_count()} CPUs); host load average (1/5/15 min) {load_before} before, '
        f'{result["load_average_after"]} after')
  print(f'model: {source}: {result["layers"]} layers, hidden {result["hidden"]}, vocab '
        f'{result["vocab"]}, {result["params"] / 1e6:.2f}M params (loaded/built in {load_s:.1f} s)')
  padded = ' and '.join(f'{rows} x {length}' for rows, length in shapes)
  print(f'batch: {len(texts)} one-mask texts of {args.words} words, padded to {padded} tokens; '
        f'top_k {args.top_k}')
  print(f'first call (compile + run): {result["first_call_s"]:.3f} s = '
        f'{result["first_call_texts_per_s"]:,.1f} texts/s')
  print(f'steady state ({args.repeats} calls): median {result["steady_s_median"] * 1e3:.1f} ms '
        f'= {result["steady_texts_per_s_median"]:,.1f} texts/s; mean '
        f'{result["steady_s_mean"] * 1e3:.1f} ms = {result["steady_texts_per_s_mean"]:,.1f} '
        'texts/s', flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    print(f'wrote {args.json}')
  return result


if __name__ == '__main__':
  main()
