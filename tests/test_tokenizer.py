"""nanomedusa.tokenizer and nanomedusa.chat_template against transformers, on checkpoints built here.

Two tiny checkpoints are made per run from a freshly generated corpus: a Llama-style sentencepiece BPE
model (byte fallback) and a SmolLM2-style byte-level BPE tokenizer.json with ChatML special tokens.
transformers (test-only) loads the same directories and is the reference for ids, decoded text and
rendered chat prompts. Random strings and ids are fresh each run; failures print the seed.
"""

import io
import json
import random
import re
import shutil

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaTokenizer
from transformers.tokenization_utils_base import generate_merges

from nanomedusa.chat_template import VICUNA_SYSTEM, ChatFormat, detect_preset, extract_chatml_system
from nanomedusa.errors import NanoMedusaError
from nanomedusa.tokenizer import Tokenizer

SEED = random.randrange(2**32)

SAMPLES = [
    "Hello world, this is a test.",
    "café naïve déjà vu, Größe, señor",
    "日本語のテキストと中文",
    "emoji 😀🎉 and more 👍🏽",
    "def f(x):\n    if x:\n        return x + 1\n\treturn 0\n",
    "a  b   c    d\t\te",
    " leading space",
    "trailing space ",
    "  both  ",
    "line1\nline2\n\n\nline3",
    "",
    "\n",
    "12345 3.14",
]
# Random test strings are drawn from these: whitespace runs, code punctuation, multi-byte characters.
ALPHABET = list("abcdefxyz ABC  \n\t.,:;()[]{}<>|_-=+0123456789éàüß日本語中文😀🎉ñ'\"")
ALPHABET += ["  ", "\n\n", "def ", "the "]

SYSTEM_PROMPT = "You are Tiny, a test assistant"
# SmolLM2-style ChatML: a default system turn unless the conversation brings one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen-style ChatML: escaped newlines in the Jinja literals, and a system turn that is template code.
ESCAPED_CHATML_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nBe nice.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% if not (loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% set content = message['content'] %}"
    "{% if loop.first and system is not none %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
MISTRAL_TEMPLATE = (  # Mixtral-8x7B-Instruct-v0.1's, word for word
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ZEPHYR_TEMPLATE = (  # written with newlines after tags, relying on transformers' trim_blocks/lstrip_blocks
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% else %}\n"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)
VICUNA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% set turns = messages[1:] %}{% else %}{{ '" + VICUNA_SYSTEM.replace("'", "\\'") + " ' }}"
    "{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me about 日本 😀"},
    ],
]


def _random_strings(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _corpus(rng: random.Random) -> list[str]:
    syllables = ["ka", "to", "ri", "mu", "sen", "dra", "pl", "qu", "ix", "oo", "日", "本", "é", "ü"]
    words = "the quick brown fox def return class self print café naïve 中文 😀 12 3.14".split()
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500)]
    return lines + ["def f(x):\n    return x + 1\n\tpass"] * 20


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """Llama-2 layout: tokenizer.model plus the tokenizer.json/config transformers writes for it."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(SEED))),
        model_writer=buf,
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # as Llama's model; transformers does not normalise either
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # What transformers' converter extracts from tokenizer.model (that path needs protobuf; see below).
    hf = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True)
    hf.chat_template = LLAMA2_TEMPLATE
    path = tmp_path_factory.mktemp("sp")
    hf.save_pretrained(path)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer.json with SmolLM2's special tokens at ids 0, 1, 2."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_corpus(random.Random(SEED + 1)), trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    raw.save(str(path))
    return path


def _bpe_checkpoint(bpe_json, directory, **config):
    directory.mkdir()
    shutil.copy(bpe_json, directory / "tokenizer.json")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "chat_template": CHATML_TEMPLATE,
        **config,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return directory


@pytest.fixture(scope="module")
def bpe_dir(bpe_json, tmp_path_factory):
    return _bpe_checkpoint(bpe_json, tmp_path_factory.mktemp("smol") / "ckpt", add_bos_token=False)


@pytest.fixture(scope="module")
def sp_json_dir(sp_dir, tmp_path_factory):
    """The same Llama-2 tokenizer with its tokenizer.json alone (as a GGUF's conversion or some uploads ship it)."""
    path = tmp_path_factory.mktemp("sp_json")
    for f in sp_dir.iterdir():
        if f.name != "tokenizer.model":
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(params=["sp", "sp_json", "bpe"])
def ckpt(request, sp_dir, sp_json_dir, bpe_dir):
    return {"sp": sp_dir, "sp_json": sp_json_dir, "bpe": bpe_dir}[request.param]


def test_encode_and_decode_match_transformers(ckpt):
    ours, ref = Tokenizer.from_dir(ckpt), AutoTokenizer.from_pretrained(ckpt)
    for text in SAMPLES + _random_strings(random.Random(SEED), 300):
        expected = ref(text)["input_ids"]
        assert ours.encode(text) == expected == ref.encode(text), f"seed={SEED} text={text!r}"
        for skip in (True, False):
            assert ours.decode(expected, skip) == ref.decode(expected, skip_special_tokens=skip), f"seed={SEED}"


def test_round_trip(ckpt):
    tok = Tokenizer.from_dir(ckpt)
    for text in SAMPLES:
        # transformers' Llama tokenizer folds a leading space into its "▁" prefix: that space is lost.
        expected = text[1:] if ckpt.name.startswith("sp") and text.startswith(" ") else text  # (sp, sp_json)
        assert tok.decode(tok.encode(text)) == expected


def test_ids_outside_the_vocabulary_decode_to_nothing(ckpt):
    # (both backends alike: the tokenizers library raised an OverflowError on a negative id)
    tok = Tokenizer.from_dir(ckpt)
    ids = tok.encode("hello world", add_bos=False)
    assert tok.decode([-1, *ids, tok.vocab_size + 5, 2**40]) == tok.decode(ids) == "hello world"


def test_checkpoint_defaults(sp_dir, bpe_dir):
    sp, bpe = Tokenizer.from_dir(sp_dir), Tokenizer.from_dir(bpe_dir)
    assert (sp.bos_id, sp.eos_ids, sp.add_bos, sp.vocab_size) == (1, [2], True, 500)
    assert sp.encode("hi")[0] == 1 and sp.encode("hi", add_bos=False)[:1] != [1]
    assert (bpe.bos_id, bpe.eos_ids, bpe.add_bos, bpe.vocab_size) == (1, [2], False, 500)
    assert bpe.encode("hi", add_bos=True)[0] == 1 and bpe.encode("hi")[:1] != [1]
    assert (sp.chat.preset, bpe.chat.preset) == ("llama2", "chatml")
    assert bpe.chat.default_system == SYSTEM_PROMPT


@pytest.mark.parametrize("add_bos_token", [None, False, True])
@pytest.mark.parametrize("bos_template", [False, True])
def test_bytelevel_bos_follows_post_processor(bpe_json, tmp_path, add_bos_token, bos_template):
    """transformers ignores add_bos_token next to a tokenizer.json: the file's post-processor decides."""
    json_file = tmp_path / "tokenizer.json"
    if bos_template:  # Llama-3 style "<bos> $A"
        raw = RawTokenizer.from_file(str(bpe_json))
        raw.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
        )
        raw.save(str(json_file))
    else:
        shutil.copy(bpe_json, json_file)
    config = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    path = _bpe_checkpoint(json_file, tmp_path / "ckpt", **config)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours, ref = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    assert ours.encode("hello there") == ref("hello there")["input_ids"]
    assert ours.add_bos is bos_template
    assert ours.eos_ids == [2, 0]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_prompt_matches_transformers(ckpt, messages):
    ours, ref = Tokenizer.from_dir(ckpt), AutoTokenizer.from_pretrained(ckpt)
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected
    # transformers tokenizes a rendered chat without adding special tokens: BOS comes from the text.
    assert ours.encode_chat(messages) == ref(expected, add_special_tokens=False)["input_ids"]


def test_encode_chat_adds_bos_once(sp_dir):
    tok = Tokenizer.from_dir(sp_dir, chat_preset="vicuna")  # a template without BOS in its text
    ids = tok.encode_chat(CONVERSATIONS[0])
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
    assert tok.decode(ids) == f"{VICUNA_SYSTEM} USER: What is 2+2? ASSISTANT:"
    llama2 = Tokenizer.from_dir(sp_dir).encode_chat(CONVERSATIONS[0])  # "<s>[INST] ..." brings its own
    assert llama2[0] == tok.bos_id and llama2.count(tok.bos_id) == 1


JINJA_TEMPLATES = {
    "chatml": ("chatml", CHATML_TEMPLATE),
    "chatml-escaped": ("chatml", ESCAPED_CHATML_TEMPLATE),
    "llama2": ("llama2", LLAMA2_TEMPLATE),
    "mistral": ("mistral", MISTRAL_TEMPLATE),
    "llama3": ("llama3", LLAMA3_TEMPLATE),
    "zephyr": ("zephyr", ZEPHYR_TEMPLATE),
    "vicuna": ("vicuna", VICUNA_TEMPLATE),
}


@pytest.mark.parametrize("name", JINJA_TEMPLATES)
def test_presets_match_jinja(sp_dir, name):
    preset, template = JINJA_TEMPLATES[name]
    ref = AutoTokenizer.from_pretrained(sp_dir)
    fmt = ChatFormat.from_checkpoint(template, (), ref.bos_token, ref.eos_token)
    assert fmt.preset == preset
    for messages in CONVERSATIONS:
        if name == "mistral" and messages[0]["role"] == "system":  # its template refuses one (raise_exception)
            continue
        for gen in (True, False):
            expected = ref.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=gen
            )
            assert fmt.render(messages, add_generation_prompt=gen) == expected


def test_detect_preset_and_system_prompt():
    assert detect_preset("{{ '<|im_start|>' + role }}") == "chatml"
    assert detect_preset("{{ bos_token + '[INST] ' }}") == "mistral"
    assert detect_preset("{{ bos_token + '[INST] ' + '<<SYS>>\\n' }}") == "llama2"
    assert detect_preset("<|start_header_id|>") == "llama3"
    assert detect_preset("{{ '<|user|>\\n' }}") == "zephyr"
    assert detect_preset("{{ 'USER: ' + m }}") == "vicuna"
    assert detect_preset("{{ messages[0]['content'] }}") == "plain"
    assert detect_preset(None, ["<s>", "<|im_start|>"]) == "chatml"
    assert detect_preset(None, ["<s>", "</s>"]) == "plain"
    # A template of a format without a preset is plain text, whatever the vocabulary (DeepSeek-R1-Distill-Qwen's
    # vocabulary has ChatML's tokens, its template another format): generate.py says so and takes --chat-format.
    assert detect_preset("{{ bos_token }}{{ '<｜User｜>' + message['content'] }}", ["<|im_start|>"]) == "plain"
    assert extract_chatml_system(ESCAPED_CHATML_TEMPLATE) == "Be nice."
    assert extract_chatml_system(CHATML_TEMPLATE) == SYSTEM_PROMPT
    assert extract_chatml_system("{{ '<|im_start|>' + message['role'] }}") is None
    # a default system prompt with a quote in it was dropped (the model then ran without its system turn)
    assert extract_chatml_system("{{ '<|im_start|>system\\nYou\\'re a helpful assistant.<|im_end|>\\n' }}") == \
        "You're a helpful assistant."
    assert extract_chatml_system('{{ "<|im_start|>system\\nSay \\"hi\\" first.<|im_end|>\\n" }}') == 'Say "hi" first.'
    assert extract_chatml_system("{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>' }}") is None
    mistral = ChatFormat("mistral", "<s>", "</s>").render([{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "Hi"},
                                                           {"role": "assistant", "content": "Hello!"},
                                                           {"role": "user", "content": "Bye"}])
    assert mistral == "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] Bye [/INST]"
    assert ChatFormat("plain").render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == "S\nU"


def test_stream_decoder_matches_decode(ckpt):
    tok = Tokenizer.from_dir(ckpt)
    rng = random.Random(SEED)
    texts = SAMPLES + ["Ünïcödé ✓ 日本語 😀🎉 ok\n  indented"] + _random_strings(rng, 50)
    for text in texts:
        ids = tok.encode(text) + tok.eos_ids
        stream = tok.stream_decoder()
        chunks = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(chunks) == tok.decode(ids), f"seed={SEED} text={text!r}"
        assert not any("\ufffd" in c for c in chunks), f"seed={SEED} text={text!r}"
    # Arbitrary ids (split characters, stray bytes, special tokens) still add up to the full decode.
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        stream = tok.stream_decoder()
        assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tok.decode(ids), f"seed={SEED}"


def test_stream_decoder_holds_back_partial_characters(ckpt):
    tok = Tokenizer.from_dir(ckpt)
    ids = tok.encode("🦙", add_bos=False)
    assert len(ids) > 1  # not in the corpus, so spelled out in byte tokens
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.push(ids[-1]) + stream.flush() == tok.decode(ids)


def test_cut_off_characters_decode_alike_from_tokenizer_model_and_tokenizer_json(sp_dir, sp_json_dir):
    """Byte tokens that do not make whole characters (an answer cut off inside one, stray bytes) keep the whole
    characters around them, from either file: the tokenizers library alone turned a run with one bad byte into
    U+FFFD throughout, so text already streamed changed as ids arrived."""
    sp, js = Tokenizer.from_dir(sp_dir), Tokenizer.from_dir(sp_json_dir)
    ids = js.encode("x 🦙🦙 y", add_bos=False)
    cut = ids[:-4]  # inside the second llama (" y" is two tokens at most: "▁y" or "▁", "y")
    assert js.decode(cut) == sp.decode(cut) == "x 🦙\ufffd"
    byte = {b: js._backend.token_to_id(f"<0x{b:02X}>") for b in (0xE6, 0x97, 0xA5, 0x9C)}
    stray = [byte[0xE6], byte[0x97], byte[0xA5], byte[0xE6], byte[0x9C]]  # "日" then the first two bytes of "本"
    assert js.decode(stray) == sp.decode(stray) == "日\ufffd"
    rng = random.Random(SEED)
    for _ in range(200):
        ids = [rng.randrange(js.vocab_size) for _ in range(rng.randint(1, 30))]
        for skip in (True, False):
            assert js.decode(ids, skip) == sp.decode(ids, skip), f"seed={SEED} ids={ids}"


def test_sentencepiece_matches_transformers_own_conversion(sp_dir, tmp_path):
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to convert tokenizer.model")
    shutil.copy(sp_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True})
    )
    ours, ref = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES + _random_strings(random.Random(SEED), 100):
        assert ours.encode(text) == ref(text)["input_ids"], f"seed={SEED} text={text!r}"


def test_errors(tmp_path):
    with pytest.raises(NanoMedusaError, match=r"Tokenizer directory .*missing does not exist; pass the checkpoint"):
        Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        NanoMedusaError, match=rf"No tokenizer.model or tokenizer.json in {re.escape(str(tmp_path))}; copy"
    ):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(NanoMedusaError, match="Unknown chat preset 'alpaca'; use one of chatml, llama2"):
        ChatFormat("alpaca")
    with pytest.raises(NanoMedusaError, match="The conversation is empty"):
        ChatFormat("chatml").render([])
    with pytest.raises(NanoMedusaError, match="malformed; give each message as a dict with 'role'"):
        ChatFormat("chatml").render([{"role": "robot", "content": "beep"}])


@pytest.mark.parametrize("field, value, message", [
    ("chat_template", 5, "the chat template in .*tokenizer_config.json is 5, not text; restore the file"),
    ("eos_token", {"content": 5}, r"tokenizer_config.json's eos_token is \{'content': 5\}, not a token's text"),
])
def test_config_values_of_the_wrong_type(bpe_dir, tmp_path, field, value, message):
    shutil.copytree(bpe_dir, tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), field: value}))
    with pytest.raises(NanoMedusaError, match=message):
        Tokenizer.from_dir(tmp_path / "ckpt")


def test_text_that_is_not_utf8_is_refused(ckpt):
    # what Python makes of a byte that is not UTF-8 in argv or a pipe (U+DC00 + byte), and a JSON "\ud83d"
    with pytest.raises(NanoMedusaError, match=r"the text is not valid UTF-8 \(byte 0xe9 at character 3\)"):
        Tokenizer.from_dir(ckpt).encode("caf\udce9")
    with pytest.raises(NanoMedusaError, match=r"\(a lone surrogate U\+D83D at character \d+\); pass UTF-8 text"):
        Tokenizer.from_dir(ckpt).encode_chat([{"role": "user", "content": "a\ud83d"}])
