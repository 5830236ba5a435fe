"""Golden fixtures made by PyTorch transformers alone, for the torch-free tests.

Run where torch and transformers 5 are installed (from the repository root):

    python tests/goldens/make_goldens.py

For each tiny config of `FIXTURES` it writes `tests/goldens/<name>/`: the PyTorch masked LM
(`config.json`, `model.safetensors`, as `save_pretrained` writes them; every parameter
perturbed, so that a LayerNorm scale read as 1 or a bias read as 0 shows) and `outputs.npz`:

  input_ids [2, T]         two rows without padding; `logits` [2, T, V] is their output;
  padded_input_ids [2, T]  the same with row 1 padded after `real_length` tokens, and
  attention_mask [2, T]    its mask; `padded_logits` [2, T, V] is their output;
  masked_positions [2, K]  the labelled token indices (a mask id sits there in both inputs),
  labels [2, T]            their token ids, -100 elsewhere;
  loss []                  the mean masked-LM cross-entropy of `padded_logits` at `labels`;
  grad:<name>              its gradient wrt each tensor of model.safetensors, by its name;
  decay_parameters         the names `Trainer.get_decay_parameter_names` gives weight decay.

and `tests/goldens/optimizer.npz` (see `make_optimizer_golden`): a few steps of
`torch.optim.AdamW` as the Trainer sets it up, with `clip_grad_norm_` and the linear
warmup schedule, on the `roberta` fixture.

Nothing here imports mlm_jax. Running it twice writes the same bytes.
"""

import dataclasses
import os
import pathlib
import sys
import zipfile

import numpy as np
import safetensors
import torch
import transformers

GOLDENS = pathlib.Path(__file__).resolve().parent
SEED = 0
PERTURBATION = 0.1  # Standard deviation of the noise added to every parameter.
MASK_ID = 4  # Below every family's random tokens; written at the labelled positions.
FIRST_TOKEN = 5  # Random tokens are drawn from [FIRST_TOKEN, vocab_size).
NUM_MASKED = 3  # Labelled positions per row.

_BERTLIKE = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=24, max_position_embeddings=16, vocab_size=48)
_MODERNBERT = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                   intermediate_size=24, max_position_embeddings=32, vocab_size=48,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                   sep_token_id=2)
# name -> (model_type, config arguments, sequence length, real tokens of the padded row).
FIXTURES = {
    'roberta': ('roberta', dict(_BERTLIKE, type_vocab_size=1, pad_token_id=1), 10, 6),
    'roberta_untied': ('roberta', dict(_BERTLIKE, type_vocab_size=1, pad_token_id=1,
                                       tie_word_embeddings=False), 10, 6),
    'xlm_roberta': ('xlm-roberta', dict(_BERTLIKE, type_vocab_size=1, pad_token_id=1,
                                        vocab_size=56), 10, 8),
    'camembert': ('camembert', dict(_BERTLIKE, type_vocab_size=1, pad_token_id=1,
                                    hidden_act='gelu_new'), 10, 6),
    'bert': ('bert', dict(_BERTLIKE, pad_token_id=0, hidden_act='gelu_new'), 10, 6),
    'distilbert': ('distilbert', dict(dim=16, n_layers=2, n_heads=2, hidden_dim=24,
                                      max_position_embeddings=16, vocab_size=48,
                                      pad_token_id=0), 10, 6),
    'albert': ('albert', dict(_BERTLIKE, embedding_size=8, num_hidden_groups=1,
                              inner_group_num=1, pad_token_id=0, hidden_act='gelu_new'), 10, 6),
    # T=16 is longer than either window; the padded row's last tokens see only padding in
    # the sliding-window layers.
    'modernbert': ('modernbert', dict(_MODERNBERT, local_attention=4,
                                      global_attn_every_n_layers=3), 16, 11),
    'modernbert_untied': ('modernbert', dict(_MODERNBERT, local_attention=6,
                                             global_attn_every_n_layers=2,
                                             tie_word_embeddings=False), 16, 10),
}

# The optimizer golden: the Trainer's defaults (read from `TrainingArguments`), a weight
# decay, and a rate high enough that the updates move the parameters far between steps.
# Warmup from 0 over one step, then decay: the steps' rates are 0, 1 and 2/3 of the peak.
OPTIMIZER = dict(fixture='roberta', learning_rate=0.05, weight_decay=0.1, warmup_steps=1,
                 total_steps=4, steps=3, batch_size=4)


def training_defaults() -> dict:
  """`TrainingArguments`' defaults for AdamW, clipping and the schedule (no instance:
  that needs accelerate)."""
  defaults = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}
  return {k: defaults[k] for k in ('adam_beta1', 'adam_beta2', 'adam_epsilon', 'max_grad_norm',
                                   'lr_scheduler_type')}


# ----------------------------------------------------------------------------
# Inputs.

def make_inputs(vocab_size: int, pad_id: int, length: int, real_length: int,
                seed: int) -> dict[str, np.ndarray]:
  """Fixed token rows, the padded copy, and labels at fixed positions (see the docstring)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(FIRST_TOKEN, vocab_size, size=(2, length)).astype(np.int32)
  positions = np.stack([np.sort(rng.choice(np.arange(1, limit - 1), NUM_MASKED, replace=False))
                        for limit in (length, real_length)]).astype(np.int32)
  labels = np.full((2, length), -100, np.int32)
  np.put_along_axis(labels, positions, np.take_along_axis(ids, positions, 1), 1)
  np.put_along_axis(ids, positions, MASK_ID, 1)
  mask = np.ones((2, length), np.int32)
  mask[1, real_length:] = 0
  padded = np.where(mask > 0, ids, pad_id).astype(np.int32)
  return dict(input_ids=ids, padded_input_ids=padded, attention_mask=mask,
              masked_positions=positions, labels=labels)


# ----------------------------------------------------------------------------
# Models.

def make_config(model_type: str, arguments: dict) -> transformers.PretrainedConfig:
  return transformers.AutoConfig.for_model(model_type, **arguments)


def make_model(config: transformers.PretrainedConfig, seed: int) -> torch.nn.Module:
  """The masked LM, seeded, every parameter moved by normal(PERTURBATION) noise, eval mode."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation='eager')
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for _, parameter in sorted(model.named_parameters()):  # Shared tensors once.
      parameter.add_(torch.randn(parameter.shape, generator=generator) * PERTURBATION)
  return model.eval()


def mlm_loss(logits: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
  """Mean cross-entropy over the labelled tokens, as the masked LMs' own loss."""
  return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.from_numpy(labels).long().reshape(-1),
                                           ignore_index=-100)


def gradients(model: torch.nn.Module, names: list[str]) -> dict[str, np.ndarray]:
  """The gradient of each named parameter (zeros where the forward does not use it)."""
  grad = lambda p: np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy().copy()
  return {name: grad(model.get_parameter(name)) for name in names}


def decay_parameters(model: torch.nn.Module) -> list[str]:
  """The Trainer's weight-decay set (its method needs no Trainer state)."""
  return sorted(transformers.Trainer.get_decay_parameter_names(None, model))


def outputs(model: torch.nn.Module, inputs: dict[str, np.ndarray],
            names: list[str]) -> dict[str, np.ndarray]:
  """What the docstring lists; gradients under `names`, the checkpoint's."""
  tensor = lambda key: torch.from_numpy(inputs[key]).long()
  model.zero_grad()
  with torch.no_grad():
    logits = model(input_ids=tensor('input_ids')).logits
  padded = model(input_ids=tensor('padded_input_ids'),
                 attention_mask=tensor('attention_mask')).logits
  loss = mlm_loss(padded, inputs['labels'])
  loss.backward()
  result = dict(inputs, logits=logits.numpy(), padded_logits=padded.detach().numpy(),
                loss=np.float32(loss.item()),
                decay_parameters=np.array(decay_parameters(model)))
  result.update({f'grad:{name}': g for name, g in gradients(model, names).items()})
  return result


# ----------------------------------------------------------------------------
# Writing.

def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """`np.savez`, but byte-for-byte reproducible (fixed zip timestamps, sorted keys)."""
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
    for key in sorted(arrays):
      info = zipfile.ZipInfo(f'{key}.npy', date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      with archive.open(info, 'w') as f:
        np.lib.format.write_array(f, np.asanyarray(arrays[key]), allow_pickle=False)


def make_fixture(name: str, directory: pathlib.Path) -> None:
  """`FIXTURES[name]`'s model and outputs, into `directory`."""
  model_type, arguments, length, real_length = FIXTURES[name]
  seed = SEED + sorted(FIXTURES).index(name)
  config = make_config(model_type, arguments)
  model = make_model(config, seed)
  inputs = make_inputs(config.vocab_size, config.pad_token_id, length, real_length, seed)
  directory.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(directory)
  with safetensors.safe_open(directory / 'model.safetensors', 'np') as f:
    names = sorted(f.keys())
  save_npz(directory / 'outputs.npz', outputs(model, inputs, names))


# ----------------------------------------------------------------------------
# The optimizer golden.

def optimizer_batches(vocab_size: int, length: int) -> dict[str, np.ndarray]:
  """[steps, batch, length] input ids (a mask id at the labelled positions), and labels."""
  rng = np.random.RandomState(SEED + 100)
  shape = (OPTIMIZER['steps'], OPTIMIZER['batch_size'], length)
  ids = rng.randint(FIRST_TOKEN, vocab_size, size=shape).astype(np.int32)
  chosen = rng.rand(*shape) < 0.3
  chosen[..., 1] = True  # At least one label in every row.
  labels = np.where(chosen, ids, -100).astype(np.int32)
  return dict(input_ids=np.where(chosen, MASK_ID, ids).astype(np.int32), labels=labels)


def make_optimizer_golden(path: pathlib.Path, fixture_dir: pathlib.Path) -> None:
  """`OPTIMIZER['steps']` training steps of the Trainer's optimizer on the fixture's model:
  AdamW on two groups (`get_decay_parameter_names` with weight decay, the rest without),
  `clip_grad_norm_`, then the linear schedule with warmup, stepped after each update.
  Writes the batches, the parameters after each step (`step<i>:<name>`), each step's
  gradient norm before clipping and learning rate, and the settings."""
  torch.manual_seed(SEED)
  model = transformers.AutoModelForMaskedLM.from_pretrained(
      fixture_dir, attn_implementation='eager').eval()  # No dropout: deterministic steps.
  defaults = training_defaults()
  decay = set(decay_parameters(model))
  named = list(model.named_parameters())
  optimizer = torch.optim.AdamW(
      [{'params': [p for n, p in named if n in decay], 'weight_decay': OPTIMIZER['weight_decay']},
       {'params': [p for n, p in named if n not in decay], 'weight_decay': 0.0}],
      lr=OPTIMIZER['learning_rate'], betas=(defaults['adam_beta1'], defaults['adam_beta2']),
      eps=defaults['adam_epsilon'], foreach=False)
  schedule = transformers.get_scheduler(
      defaults['lr_scheduler_type'], optimizer, num_warmup_steps=OPTIMIZER['warmup_steps'],
      num_training_steps=OPTIMIZER['total_steps'])
  batches = optimizer_batches(model.config.vocab_size, 10)
  result = dict(batches, **{k: np.asarray(v) for k, v in OPTIMIZER.items()},
                max_grad_norm=np.float32(defaults['max_grad_norm']),
                adam_beta1=np.float32(defaults['adam_beta1']),
                adam_beta2=np.float32(defaults['adam_beta2']),
                adam_epsilon=np.float32(defaults['adam_epsilon']))
  norms, rates = [], []
  for step in range(OPTIMIZER['steps']):
    rates.append(optimizer.param_groups[0]['lr'])
    logits = model(input_ids=torch.from_numpy(batches['input_ids'][step]).long()).logits
    mlm_loss(logits, batches['labels'][step]).backward()
    norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                defaults['max_grad_norm']).item())
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
    result.update({f'step{step}:{name}': p.detach().numpy().copy()
                   for name, p in model.named_parameters()})
  result.update(grad_norms=np.array(norms, np.float32), learning_rates=np.array(rates, np.float32))
  save_npz(path, result)


def main(names: list[str]) -> None:
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(1)  # The same summation order on every machine's thread count.
  for name in names or sorted(FIXTURES):
    make_fixture(name, GOLDENS / name)
    print(f'wrote {GOLDENS / name}')
  if not names:
    make_optimizer_golden(GOLDENS / 'optimizer.npz', GOLDENS / OPTIMIZER['fixture'])
    print(f'wrote {GOLDENS / "optimizer.npz"}')


if __name__ == '__main__':
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  main(sys.argv[1:])
