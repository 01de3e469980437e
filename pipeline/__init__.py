"""Stage 1: load preference pairs, tokenize once, score completions under the reference model, write the cache."""
