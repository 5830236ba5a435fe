"""The embedded offline run: a tiny RoBERTa trained from scratch on the shipped ELI5 sample.

Finishes in a few minutes on 2 CPU cores and needs no network.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Model: a hub id or local directory, or '' to train `model_config` from scratch.
  config.model_name_or_path = ''
  config.tokenizer_name = ''  # '' = the model's own tokenizer (or a new one from scratch).
  config.tokenizer_vocab_size = 4096  # For a tokenizer trained from scratch.
  # A tokenizer trained from scratch sees the first this-many train texts (streamed, bounded).
  config.tokenizer_train_max_texts = 100_000
  config.model_config = ml_collections.ConfigDict(dict(
      hidden_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=512,
      hidden_dropout_prob=0.1,
      attention_probs_dropout_prob=0.1,
  ))
  config.dtype = 'float32'  # Computation dtype: float32 | bfloat16 (params stay float32).
  # Train the vocabulary head on the masked positions only (the same loss, a fraction of the FLOPs).
  config.masked_lm_head = True
  # Attention's implementation (docs/long_context.md): 'auto' (dense up to 512 tokens, blocked
  # beyond), 'xla' (dense [L, L] scores), 'blocked' (memory linear in length, any device),
  # 'cudnn' (GPU: cuDNN's kernel for global layers), 'splash' (TPU: Pallas splash attention).
  config.attention_impl = 'auto'
  # What each layer's backward pass recomputes rather than keeps (less memory, more time):
  # 'none'; 'full' (the whole layer); 'minimal' (all but the weight products); 'dots' (all but
  # the products, the attention scores too). See docs/long_context.md.
  config.remat_policy = 'none'

  # New vocabulary (a pretrained model only): whole words added to its tokenizer as regular
  # tokens, comma-separated and/or one per line of a file; the embedding table (and an untied
  # decoder, and the decoder bias) grows to match.
  config.add_tokens = ''
  config.add_tokens_file = ''
  # How the new rows start: 'subwords' (the mean of the pieces the old tokenizer split the
  # word into), 'mean_cov' (sampled from the old rows' mean and covariance, as transformers'
  # resize_token_embeddings does) or 'mean' (the old rows' mean).
  config.new_token_init = 'subwords'
  # Pad the table to a multiple of this many rows (64 suits the matmul units; 1: no padding).
  # Padded rows are never predicted: their decoder bias is a large negative number.
  config.pad_vocab_to_multiple_of = 1
  # 'block': every token of a block attends to the whole block, as run_mlm does. 'document':
  # only to the tokens of its own text (the block's texts are cut at the separator the
  # tokenizer ends each one with), as Llama 3 and ModernBERT pretrain packed sequences.
  config.attention_scope = 'block'

  # Data: `data_files` (local files) wins over `dataset` (hub id or local
  # dataset dir); with both empty the embedded ELI5 sample is used.
  config.dataset = ''
  config.dataset_config = ''
  config.data_files = ''  # Comma-separated paths or globs: .jsonl/.json/.parquet/.csv/.txt.
  # Several weighted sources instead: '[NAME=]FILES:WEIGHT,...', e.g.
  # 'domain=notes/*.jsonl:0.7,general=wiki/*.txt:0.3'. Each keeps its own held-out split,
  # evaluated on its own (`eval/NAME/loss`); see docs/domain_adaptation.md.
  config.mixture = ''
  config.split = 'train'
  config.test_size = 0.2  # Below 1: a fraction of the examples; from 1 on: a count of them.
  config.block_size = 64
  config.mlm_probability = 0.15  # MosaicBERT and ModernBERT pretrain with 0.3 (see README).
  # 'token' (BERT) or 'whole_word': choose words, then mask every token of a chosen word.
  config.masking = 'token'
  # Of the chosen tokens: this fraction becomes <mask>, this one a random token; the rest stay.
  config.mask_replace_prob = 0.8
  config.random_replace_prob = 0.1
  config.num_proc = 1  # Tokenizer worker processes.
  # Tokenized blocks and from-scratch tokenizers, prepared once (see `python -m mlm_jax.prepare`).
  config.cache_dir = ''  # '' = $MLM_JAX_CACHE or ~/.cache/mlm_jax.

  # Optimisation.
  config.per_device_batch_size = 32
  config.grad_accum_steps = 1
  config.learning_rate = 2e-3
  config.weight_decay = 0.01
  config.warmup_steps = 50
  config.lr_schedule = 'linear'  # linear | cosine | wsd (warmup-stable-decay)
  # wsd: the decay takes the last this fraction of the steps, in (0, 1], ...
  config.wsd_decay_fraction = 0.1
  # ... shaped '1-sqrt' (lr * (1 - sqrt(t)), ModernBERT's cooldown) or 'linear'.
  config.wsd_decay = '1-sqrt'
  config.max_grad_norm = 1.0
  config.num_epochs = 24
  config.num_train_steps = -1  # -1: from num_epochs.
  # A resume with another num_train_steps/num_epochs keeps the checkpoint's learning-rate
  # schedule (no jump in the rate); True re-plans it over the new length.
  config.replan_schedule = False
  config.seed = 0
  # Devices per `fsdp` group that shard parameters and optimizer state (1: plain data parallel).
  config.fsdp = 1
  config.max_nonfinite_steps = 10  # Consecutive skipped (non-finite) updates before stopping.
  # On several hosts, how often (in steps) they agree whether a signal (SIGTERM, Ctrl-C) on
  # any of them stops the run: a small all-gather that waits for the queued steps.
  config.stop_check_every_steps = 1

  # Bookkeeping.
  config.eval_every_steps = 200
  config.eval_batch_size = 64  # Global.
  # Evaluate on a fixed seeded subset of this many test blocks (0 = all of them), the same
  # subset every time, so perplexities compare from one evaluation to the next.
  config.max_eval_blocks = 4096
  config.log_every_steps = 25
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  # Which eval loss picks the best checkpoint ('eval_loss'; '' for none): orbax keeps it beside
  # the newest `keep_checkpoints`, and the export is of it.
  config.keep_best_by = 'eval_loss'
  # Stop after this many evaluations without a lower `keep_best_by` loss (0: never).
  config.early_stopping_patience = 0

  # Sharing, as the guide does with push_to_hub=True.
  config.push_to_hub = False
  config.hub_model_id = ''
  return config
