"""The interactive chat (nanomedusa/chat.py): KV reuse between turns gives the answers of a growing prompt
run from scratch, a turn prefills only its new tokens, /reset clears, a full context drops the oldest turns."""

import functools
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanomedusa.chat import ChatSession, Turn, common_prefix, run_chat
from nanomedusa.errors import NanoMedusaError
from nanomedusa.decoder import Decoder
from nanomedusa.generation import GenerationResult, generate
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from nanomedusa.medusa_generation import generate_medusa
from nanomedusa.tokenizer import Tokenizer
from nanomedusa.tree import TreeBuffers
from tests.test_medusa import TREES
from tests.tiny_tokenizer import make_chat_checkpoint

REPO = Path(__file__).resolve().parent.parent
TURNS = ["Hi there", "How are you?", "Tell me a story."]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    make_chat_checkpoint(path)
    return path


def decoder(model, tokenizer, medusa: bool):
    """What generate.py's make_decode builds: greedy plain decoding, or Medusa with heads whose guesses are often
    right (the base model's own lm_head: a tree whose guesses were all rejected would decode plainly)."""
    if not medusa:
        return functools.partial(generate, Decoder(model), eos_ids=tokenizer.eos_ids)
    heads = MedusaHeads.from_base(model, num_heads=3).eval()
    tree = TreeBuffers.from_choices(TREES["small"], device=model.device)
    return functools.partial(generate_medusa, Decoder(model), heads, tree, eos_ids=tokenizer.eos_ids)


def growing_prompt_answers(model, tokenizer, decode, turns, max_new_tokens, history=()):
    """Each turn run as one prompt from scratch (a fresh cache, no reuse): the answers a chat must give."""
    messages, answers = list(history), []
    for text in turns:
        messages.append({"role": "user", "content": text})
        model.kv_cache = None
        result = decode(tokenizer.encode_chat(messages), max_new_tokens)
        answers.append(tokenizer.decode(result.tokens))
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def count_prefilled_tokens(model):
    """Wrap model.forward_hidden to record how many tokens each call runs; -> the list it appends to."""
    calls = []
    forward_hidden = model.forward_hidden

    def counting(tokens, *args, **kwargs):
        calls.append(tokens.shape[1])
        return forward_hidden(tokens, *args, **kwargs)

    model.forward_hidden = counting
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("medusa", [False, True], ids=["plain", "medusa"])
def test_chat_with_kv_reuse_equals_the_growing_prompt(checkpoint, device, medusa):
    model = load_model(checkpoint, device=device, dtype="float32")[0]
    tokenizer = Tokenizer.from_dir(checkpoint)
    decode = decoder(model, tokenizer, medusa)
    session = ChatSession(model, tokenizer, decode, max_new_tokens=12, extra=7 if medusa else 0)
    answers, prefilled = [], []
    for text in TURNS:
        cached = session.cached
        answers.append(session.say(text))
        prompt = tokenizer.encode_chat(session.conversation()[:-1])
        assert session.last.prefilled == len(prompt) - common_prefix(cached, prompt)
        prefilled.append(session.last.prefilled)
        assert not medusa or session.last.result.mean_accepted > 1  # guesses accepted in every turn
    assert answers == growing_prompt_answers(model, tokenizer, decode, TURNS, 12)
    # The later turns reuse everything before the new message: a few dozen tokens, not the whole prompt.
    assert prefilled[0] > 50 and all(n < 40 for n in prefilled[1:])


def test_second_turn_runs_only_its_new_tokens_through_the_model(checkpoint):
    model = load_model(checkpoint, device="cpu", dtype="float32")[0]
    tokenizer = Tokenizer.from_dir(checkpoint)
    session = ChatSession(model, tokenizer, decoder(model, tokenizer, False), max_new_tokens=6)
    session.say(TURNS[0])
    first_prompt = tokenizer.encode_chat(session.conversation()[:-1])
    cached = session.cached  # the first prompt and answer (but the answer's last token, sampled and never run)
    calls = count_prefilled_tokens(model)
    session.say(TURNS[1])
    prompt = tokenizer.encode_chat(session.conversation()[:-1])
    # The prefill is the first forward: from the first difference with the cached ids (at the latest, the
    # first answer's end) to the new turn's markers. Each decoding step runs one token.
    assert common_prefix(cached, prompt) >= len(first_prompt)
    assert calls[0] == session.last.prefilled == len(prompt) - common_prefix(cached, prompt)
    assert calls[0] < len(prompt) // 2 and set(calls[1:]) == {1}


def test_stats_give_the_decode_speed_of_the_steps_after_the_prefill(checkpoint):
    model = load_model(checkpoint, device="cpu", dtype="float32")[0]
    session = ChatSession(model, Tokenizer.from_dir(checkpoint), decode=None, max_new_tokens=8)
    result = GenerationResult(tokens=list(range(11)), seconds=1.25, prefill_seconds=0.25, steps=5)
    session.last = Turn(prompt_tokens=30, prefilled=30, first_token_seconds=0.3, seconds=1.3, answer_tokens=11,
                        result=result)
    # 10 tokens after the prefill's in 1 s (11 tokens in 1.25 s was called the decode speed)
    assert "prefill 250 ms, decode 1.00 s = 10.0 tokens/s, mean accepted length 2.00;" in session.stats()


def test_a_refused_prompt_ends_the_chat_and_a_refused_line_does_not(checkpoint, capsys):
    model = load_model(checkpoint, device="cpu", dtype="float32")[0]
    session = ChatSession(model, Tokenizer.from_dir(checkpoint), decode=None, max_new_tokens=8)
    long_system = "/system " + " ".join(str(i) for i in range(400))
    with pytest.raises(NanoMedusaError, match="this system message makes every prompt at least"):
        run_chat(session, first=long_system, stdin=io.StringIO("/stats\n"))  # (--prompt's: exit status 2)
    assert "context used" not in capsys.readouterr().err  # the chat ended there
    run_chat(session, stdin=io.StringIO(f"{long_system}\n/stats\n"))
    err = capsys.readouterr().err
    assert "error: this system message makes every prompt at least" in err and "context used" in err


def test_reset_clears_the_conversation_and_keeps_the_shared_start(checkpoint):
    model = load_model(checkpoint, device="cpu", dtype="float32")[0]
    tokenizer = Tokenizer.from_dir(checkpoint)
    session = ChatSession(model, tokenizer, decoder(model, tokenizer, False), max_new_tokens=8)
    first = session.say(TURNS[0])
    session.say(TURNS[1])
    session.reset()
    assert session.messages == [] and "context used: 0 of" in session.stats()
    assert session.say(TURNS[0]) == first
    assert session.last.prefilled == 1  # the same prompt as the first turn: all but its last token cached


def test_full_context_drops_the_oldest_turns_with_a_message(checkpoint):
    model = load_model(checkpoint, device="cpu", dtype="float32")[0]
    tokenizer = Tokenizer.from_dir(checkpoint)
    reference = load_model(checkpoint, device="cpu", dtype="float32")[0]  # the session's cache stays its own
    reference_decode = decoder(reference, tokenizer, False)
    notices = []
    session = ChatSession(model, tokenizer, decoder(model, tokenizer, False), max_new_tokens=60, notify=notices.append)
    turns = ["Hi there", "How are you?", "Tell me a story.", "And then?", "Why?"]
    for i, text in enumerate(turns):
        history = session.messages.copy()
        answer = session.say(text)
        kept = session.messages[:-2]  # what the turn was answered from, after any dropping
        assert kept == history[len(history) - len(kept):]  # the newest turns kept, the oldest dropped
        assert answer == growing_prompt_answers(reference, tokenizer, reference_decode, [text], 60, kept)[0]
        assert session.used + 60 - len(session.last.result.tokens) <= session.context
    assert notices and "the context of 256 tokens is full: dropped the oldest" in notices[0]
    assert len(session.messages) < 2 * len(turns)
    with pytest.raises(NanoMedusaError, match="send a shorter one"):
        session.say("x" * 250)
    assert len(session.messages) % 2 == 0  # the refused message left no half turn behind


def test_a_refused_turn_leaves_the_conversation_as_it_was(checkpoint):
    model = load_model(checkpoint, device="cpu", dtype="float32")[0]
    tokenizer = Tokenizer.from_dir(checkpoint)
    decode = decoder(model, tokenizer, False)
    refuse = False

    def decode_or_refuse(*args, **kwargs):  # as when the decoder refuses the run's settings
        if refuse:
            raise NanoMedusaError("refused")
        return decode(*args, **kwargs)

    session = ChatSession(model, tokenizer, decode_or_refuse, max_new_tokens=8)
    session.say(TURNS[0])
    history = session.messages.copy()
    refuse = True
    with pytest.raises(NanoMedusaError, match="refused"):
        session.say(TURNS[1])
    with pytest.raises(NanoMedusaError, match=r"the text is not valid UTF-8 \(a lone surrogate U\+D83D"):
        session.say("half an emoji: \ud83d")
    assert session.messages == history
    refuse = False
    assert session.say(TURNS[1]) == growing_prompt_answers(model, tokenizer, decode, [TURNS[1]], 8, history)[0]


def test_ctrl_c_stops_the_answer_and_keeps_the_session(checkpoint):
    model = load_model(checkpoint, device="cpu", dtype="float32")[0]
    tokenizer = Tokenizer.from_dir(checkpoint)
    decode = decoder(model, tokenizer, False)
    session = ChatSession(model, tokenizer, decode, max_new_tokens=12)
    pieces = []

    def interrupt_after_three(text):
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    partial = session.say(TURNS[0], interrupt_after_three)
    assert session.last.result is None and 0 < session.last.answer_tokens < 12
    history = session.messages.copy()
    assert history[-1] == {"role": "assistant", "content": partial}
    assert session.say(TURNS[1]) == growing_prompt_answers(model, tokenizer, decode, [TURNS[1]], 12, history)[0]


def test_piped_cli_session(checkpoint, tmp_path):
    model = load_model(checkpoint, device="cpu", dtype="float32")[0]
    tokenizer = Tokenizer.from_dir(checkpoint)
    decode = decoder(model, tokenizer, False)
    expected = growing_prompt_answers(model, tokenizer, decode, TURNS[:2], 10)
    after_reset = growing_prompt_answers(model, tokenizer, decode, [TURNS[0], "/etc/hosts, what is it?"], 10)
    # Lines that are not UTF-8 (Latin-1 bytes) are refused one by one and leave the conversation as it was; so is
    # a system message too long for any message to fit; a message that starts with / is sent as //message.
    long_system = " ".join(str(i) for i in range(400))
    script = (f"{TURNS[0]}\n".encode() + b"caf\xe9\n/system \xe9t\xe9\n"
              + f"/system {long_system}\n{TURNS[1]}\n/stats\n/bogus\n/reset\n{TURNS[0]}\n"
                f"//etc/hosts, what is it?\n/exit\nnever read\n".encode())
    proc = subprocess.run(
        [sys.executable, "generate.py", "--model", str(checkpoint), "--device", "cpu", "--interactive",
         "--max-new-tokens", "10"],
        cwd=REPO, input=script, capture_output=True, env=os.environ, timeout=600,
    )
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert after_reset[0] == expected[0]
    assert stdout == "".join(answer + "\n" for answer in [*expected, *after_reset])
    assert "context used:" in stderr and "the conversation is cleared" in stderr
    assert "unknown command /bogus; /help lists the commands (send a message that starts with / as" in stderr
    assert "error: this line is not valid UTF-8 (byte 0xe9 at character 3); pass UTF-8 text." in stderr
    assert "error: this line is not valid UTF-8 (byte 0xe9 at character 8)" in stderr
    assert "error: this system message makes every prompt at least" in stderr and "system message set" not in stderr
    assert "Traceback" not in stderr


def test_system_messages_and_contexts_that_cannot_be(checkpoint):
    """A system message that leaves no room for a message is refused, naming it (not --max-new-tokens or the user's
    message), and the one before stays; a --context beyond the model's is capped with a notice."""
    model = load_model(checkpoint, device="cpu", dtype="float32")[0]
    tokenizer = Tokenizer.from_dir(checkpoint)
    long_system = " ".join(str(i) for i in range(400))
    with pytest.raises(NanoMedusaError, match="this system message makes every prompt at least .* shorten it"):
        ChatSession(model, tokenizer, decode=None, max_new_tokens=8, system=long_system)
    notices = []
    session = ChatSession(model, tokenizer, decode=None, max_new_tokens=8, system="Be brief.", context=1000,
                          notify=notices.append)
    limit = model.config.max_position_embeddings
    assert session.context == limit and notices == [f"the model's context is {limit} tokens, so the chat keeps "
                                                    f"{limit}, not 1000"]
    with pytest.raises(NanoMedusaError, match="shorten it"):
        session.set_system(long_system)
    assert session.system == "Be brief."
    medium = " ".join(str(i) for i in range(60))  # fits alone; with a long message, the message is refused
    session.set_system(medium)
    with pytest.raises(NanoMedusaError, match="tokens with the chat template and the system message, which"):
        session.say(medium)


def test_the_settings_leave_room_for_a_short_message_and_a_refusal_names_the_default_system_prompt(checkpoint):
    model = load_model(checkpoint, device="cpu", dtype="float32")[0]
    tokenizer = Tokenizer.from_dir(checkpoint)
    context = model.config.max_position_embeddings
    shortest = len(tokenizer.encode_chat([{"role": "user", "content": ""}]))  # markers and the default system prompt
    most = context - shortest - 16  # the longest answer that leaves a 16-token message room
    session = ChatSession(model, tokenizer, decode=None, max_new_tokens=most)
    with pytest.raises(NanoMedusaError, match="leaves no room for a message"):
        ChatSession(model, tokenizer, decode=None, max_new_tokens=most + 1)
    assert tokenizer.chat.default_system == "You are a tiny test model."
    with pytest.raises(NanoMedusaError, match="tokens with the chat template and the model's default system prompt, "
                                              "which leaves too little"):
        session.say(" ".join(str(i) for i in range(32)))


def test_ctrl_c_at_the_prompt_drops_the_line_and_the_chat_goes_on(monkeypatch, capsys):
    import io

    from nanomedusa import chat

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    typed = iter([KeyboardInterrupt, "hello", EOFError])

    def fake_input(prompt=""):
        value = next(typed)
        if isinstance(value, type):
            raise value
        return value

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert list(chat.read_lines(Terminal())) == ["hello"]
    assert capsys.readouterr().err == "\n\n"  # after ^C and after Ctrl-D, so that the next line starts clean


def test_the_prompt_stays_out_of_answers_written_to_a_file(monkeypatch, capsys):
    # input() writes its prompt to stdout: at a terminal that is the screen, but `--interactive > answers.txt` would
    # put a "> " before every answer in the file
    import io

    from nanomedusa import chat

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert chat._prompt() == "> " and capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert chat._prompt() == "" and capsys.readouterr().err == "> "
