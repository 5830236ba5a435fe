"""Golden fixtures made by PyTorch transformers (see make_goldens.py), read by the torch-free
tests/test_goldens.py and tests/test_optimizer_golden.py."""
