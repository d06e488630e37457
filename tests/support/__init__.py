"""Test support: reference models, tiny RLDS datasets and tokenizers, and the subprocess runners
of the training tests. Imported as `tests.support.<module>`."""
