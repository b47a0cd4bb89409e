"""A tiny character-level ChatML tokenizer for tests, and tiny chat checkpoints that use it.

`save_tiny_tokenizer(dir)` writes `tokenizer.json` (one token per character, built with the
`tokenizers` library) and `tokenizer_config.json` (ChatML `chat_template` with a default system
prompt, bos `<|im_start|>`, eos `<|im_end|>`). The special tokens get ids 0-2, matching
`tests/helpers.TINY` (bos 1, eos 2), and the whole vocabulary fits the tiny model's 97 ids.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from tests.helpers import make_hf_checkpoint

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = string.ascii_letters + string.digits + " \n.,:;?!'-+=()"
UNK = "<unk>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_tiny_tokenizer(path) -> int:
    """Write the tokenizer files into `path`; returns the vocabulary size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *CHARS, UNK])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": UNK, "add_bos_token": False, "model_max_length": 256,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def make_chat_checkpoint(path, seed: int = 0, **overrides):
    """A tiny random Llama plus the tiny tokenizer in one directory (a full checkpoint for training)."""
    model = make_hf_checkpoint(path, seed=seed, **overrides)
    assert save_tiny_tokenizer(path) <= model.config.vocab_size
    return model
