"""From text to device batches: sources, preparation into blocks, the block store, the
input pipeline and the tokenizer."""
