"""The suite's model files. The builders live in bench/models.py, since the benchmarks use them
too and nothing outside tests/ may import tests/."""

from bench.models import (REPO_ROOT, SMOLLM2_VOCAB_SIZE, TOKENIZER_FILES, cache_dir, make_tiny_llama,
                          smollm2_gguf, smollm2_mlx_dir, write_random_dflash)

__all__ = ["REPO_ROOT", "SMOLLM2_VOCAB_SIZE", "TOKENIZER_FILES", "cache_dir", "make_tiny_llama",
           "smollm2_gguf", "smollm2_mlx_dir", "write_random_dflash"]
