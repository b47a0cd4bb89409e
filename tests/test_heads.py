"""Medusa heads: start as the base head, round-trip checkpoints, read the reference implementation's layout."""

import json
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kernels.medusa_heads import medusa_heads_reference
from nanomedusa.errors import NanoMedusaError
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from tests.helpers import make_hf_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_hf_checkpoint(path, num_key_value_heads=2)
    return load_model(path, device="cpu", dtype="float32")[0]


@pytest.mark.parametrize("shared", [False, True])
def test_untrained_heads_equal_the_base_head(model, shared):
    heads = MedusaHeads.from_base(model, num_heads=3, num_layers=2, shared_lm_head=shared)
    hidden = torch.randn(5, model.config.dim)
    logits = heads(hidden, model.lm_head.weight)  # [K, 5, V]
    base = model.logits(hidden)
    for k in range(3):
        assert torch.allclose(logits[k], base, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_forward_topk_and_kernel_reference_agree(model, shared):
    heads = MedusaHeads.from_base(model, num_heads=4, num_layers=2, shared_lm_head=shared)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    heads.eval()
    hidden = torch.randn(3, model.config.dim)
    logits = heads(hidden, model.lm_head.weight)
    assert torch.allclose(medusa_heads_reference(hidden, *heads.stacked_weights(model.lm_head.weight)), logits, atol=1e-5)
    assert torch.equal(heads.topk(hidden, 5, model.lm_head.weight), logits.topk(5, dim=-1).indices)


def test_the_kernels_read_the_weights_as_they_are_now(model):
    # The fused kernels read stacked copies of the weights: a load_state_dict or an optimizer's in-place step after a
    # first decode must reach them (it did not: decoding went on with the old copies), and in place, since a CUDA
    # graph captured on the copies reads their memory. Moving the heads makes new copies, under a new serial.
    def perturbed(seed):
        heads = MedusaHeads.from_base(model, num_heads=3, num_layers=1).eval()
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
        return heads

    def reads_its_weights(heads, hidden):
        return torch.equal(heads.topk(hidden, 5), heads(hidden).topk(5, dim=-1).indices)

    hidden = torch.randn(4, model.config.dim)
    heads, other = perturbed(1), perturbed(2)
    before = heads.topk(hidden, 5)
    copies, serial = [t.data_ptr() for t in heads.stacked_weights()], heads.copies_serial()
    heads.load_state_dict(other.state_dict())
    assert torch.equal(heads.topk(hidden, 5), other.topk(hidden, 5)) and not torch.equal(heads.topk(hidden, 5), before)
    with torch.no_grad():  # as an optimizer steps: in place
        for p in heads.parameters():
            p.mul_(-1)
    assert reads_its_weights(heads, hidden)
    assert [t.data_ptr() for t in heads.stacked_weights()] == copies and heads.copies_serial() == serial
    heads.double()
    assert reads_its_weights(heads, hidden.double()) and heads.copies_serial() != serial
    serial = heads.copies_serial()
    heads.double()  # (a move that moves nothing keeps the copies, and the graphs captured on them)
    assert heads.copies_serial() == serial and [t.dtype for t in heads.stacked_weights()] == [torch.float64] * 3
    bare = MedusaHeads.from_base(model, num_heads=2, num_layers=0, shared_lm_head=True)  # no parameters at all
    assert bare.stacked_weights(model.lm_head.weight)[0].dtype == torch.float32
    assert bare.stacked_weights(model.lm_head.weight.double())[0].dtype == torch.float64  # they follow the lm_head
    with torch.inference_mode():  # weights made here keep no version counter (the benches load heads so)
        made_here = perturbed(3)
        assert reads_its_weights(made_here, hidden)
        made_here.load_state_dict(perturbed(4).state_dict())
        assert reads_its_weights(made_here, hidden)


@pytest.mark.parametrize("shared, num_layers", [(False, 1), (True, 1), (False, 0), (True, 0)])
def test_save_load_round_trip(model, tmp_path, shared, num_layers):
    # (heads sharing the lm_head without ResBlocks save no tensors at all: config.json alone counts them)
    heads = MedusaHeads.from_base(model, num_heads=2, num_layers=num_layers, shared_lm_head=shared, base_model="tiny")
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    heads.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 2 and config["medusa_num_layers"] == num_layers
    loaded = MedusaHeads.load(tmp_path, model.config)
    assert loaded.config.shared_lm_head == shared and loaded.config.base_model == "tiny"
    assert loaded.config.num_heads == 2
    hidden = torch.randn(4, model.config.dim)
    assert torch.equal(loaded(hidden, model.lm_head.weight), heads(hidden, model.lm_head.weight))
    # the names the reference's training writes to this file, which TensorRT-LLM and TGI read: head.layer...
    names = {f"{k}.{j}.linear.{w}" for k in range(2) for j in range(num_layers) for w in ("weight", "bias")}
    names |= set() if shared else {f"{k}.{num_layers}.weight" for k in range(2)}
    assert set(load_file(tmp_path / "medusa_lm_head.safetensors")) == names


def test_trimmed_heads_keep_one_temperature_per_head(model, tmp_path):
    # tree_tuning --trim cut the head count and accuracy rows but left every temperature, which HeadsConfig (and so
    # bench/dynamic_trees_offline.py, reading config.json) then refused; MedusaHeads.load took the first ones.
    from bench.dynamic_trees_offline import heads_config
    from nanomedusa.tree_tuning import trim_heads

    heads = MedusaHeads.from_base(model, num_heads=3, num_layers=1)
    heads.config = replace(heads.config, rank_accuracy=[[0.5]] * 3, medusa_temperatures=[1.1, 1.2, 1.3])
    heads.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    trimmed_before = {**config, "medusa_num_heads": 2, "num_heads": 2, "rank_accuracy": [[0.5]] * 2}
    (tmp_path / "config.json").write_text(json.dumps(trimmed_before))
    assert heads_config(str(tmp_path)).medusa_temperatures == [1.1, 1.2]
    trim_heads(tmp_path, config, 2)
    assert config["num_heads"] == len(config["rank_accuracy"]) == len(config["medusa_temperatures"]) == 2


def reference_state(num_heads, num_layers, dim, vocab, prefix):
    """Random tensors under the reference implementation's names."""
    state = {}
    for i in range(num_heads):
        for j in range(num_layers):
            state[f"{prefix}{i}.{j}.linear.weight"] = torch.randn(dim, dim) * 0.1
            state[f"{prefix}{i}.{j}.linear.bias"] = torch.randn(dim) * 0.1
        state[f"{prefix}{i}.{num_layers}.weight"] = torch.randn(vocab, dim) * 0.1
    return state


def reference_logits(state, hidden, num_heads, num_layers, prefix):
    """The reference's computation, written out by hand."""
    out = []
    for i in range(num_heads):
        x = hidden
        for j in range(num_layers):
            x = x + F.silu(F.linear(x, state[f"{prefix}{i}.{j}.linear.weight"], state[f"{prefix}{i}.{j}.linear.bias"]))
        out.append(F.linear(x, state[f"{prefix}{i}.{num_layers}.weight"]))
    return torch.stack(out)


@pytest.mark.parametrize("fmt,prefix", [("safetensors", ""), ("safetensors", "medusa_head."), ("pt", ""),
                                        ("pt", "medusa_head.")])
def test_reference_layout_checkpoints_load(model, tmp_path, fmt, prefix):
    dim, vocab = model.config.dim, model.config.vocab_size
    state = reference_state(5, 1, dim, vocab, prefix)
    (tmp_path / "config.json").write_text(json.dumps(
        {"medusa_num_heads": 5, "medusa_num_layers": 1, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    if fmt == "safetensors":
        save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    else:
        torch.save(state, tmp_path / "medusa_lm_head.pt")
    heads = MedusaHeads.load(tmp_path, model.config)
    assert heads.config.num_heads == 5 and not heads.config.shared_lm_head
    hidden = torch.randn(3, dim)
    assert torch.allclose(heads(hidden), reference_logits(state, hidden, 5, 1, prefix), atol=1e-5)


def test_mismatched_heads_are_clear_errors(model, tmp_path):
    dim, vocab = model.config.dim, model.config.vocab_size
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    save_file(reference_state(2, 1, dim + 8, vocab, "medusa_head."), str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(NanoMedusaError, match=f"expect hidden size {dim + 8} but the model has {dim}"):
        MedusaHeads.load(tmp_path, model.config)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 0}))
    save_file(reference_state(2, 0, dim + 8, vocab, "medusa_head."), str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(NanoMedusaError, match=f"expect hidden size {dim + 8} but the model has {dim}"):  # (no ResBlock)
        MedusaHeads.load(tmp_path, model.config)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    save_file(reference_state(2, 1, dim, vocab + 3, "medusa_head."), str(tmp_path / "medusa_lm_head.safetensors"))
    with pytest.raises(NanoMedusaError, match=f"predict {vocab + 3} tokens but the model's vocabulary has {vocab}"):
        MedusaHeads.load(tmp_path, model.config)
    with pytest.raises(NanoMedusaError, match="does not exist"):
        MedusaHeads.load(tmp_path / "nope", model.config)
    (tmp_path / "medusa_lm_head.safetensors").unlink()
    with pytest.raises(NanoMedusaError, match="so it is not a Medusa heads checkpoint; pass the directory that holds "
                                              "the heads' weights file."):
        MedusaHeads.load(tmp_path, model.config)


@pytest.mark.parametrize("prefix", ["", "medusa_head."])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_trim_keeps_the_first_heads_whatever_the_file_calls_them(model, tmp_path, prefix, num_layers):
    # The reference's unprefixed keys "{head}.{layer}..." were trimmed by their layer index: the file kept every
    # head and lost layers (with 2 ResBlocks, every head's vocab projection) while config.json said 2 heads.
    from nanomedusa.tree_tuning import trim_heads

    dim, vocab = model.config.dim, model.config.vocab_size
    state = reference_state(4, num_layers, dim, vocab, prefix)
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 4, "medusa_num_layers": num_layers}))
    save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    config = {**json.loads((tmp_path / "config.json").read_text()), "rank_accuracy": [[0.5]] * 4}
    trim_heads(tmp_path, config, 2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    heads = MedusaHeads.load(tmp_path, model.config)
    assert heads.config.num_heads == 2 and not heads.config.shared_lm_head
    hidden = torch.randn(3, dim)
    assert torch.allclose(heads(hidden), reference_logits(state, hidden, 4, num_layers, prefix)[:2], atol=1e-5)


def test_trim_keeps_the_first_heads_that_read_their_path(model, tmp_path):
    # their path projections are stored as "medusa_path.{head}.weight"
    from nanomedusa.tree_tuning import trim_heads

    heads = MedusaHeads.from_base(model, num_heads=3, num_layers=1, reads_path=True)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.1)
    heads.config = replace(heads.config, rank_accuracy=[[0.5]] * 3)
    heads.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    trim_heads(tmp_path, config, 2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    trimmed = MedusaHeads.load(tmp_path, model.config)
    assert trimmed.config.num_heads == 2 and trimmed.config.reads_path
    hidden, path = torch.randn(3, model.config.dim), torch.randn(3, 3, model.config.dim)
    assert torch.equal(trimmed(hidden, model.lm_head.weight, path[:, :2]), heads(hidden, model.lm_head.weight, path)[:2])


def test_a_damaged_heads_file_or_config_says_what_to_do(model, tmp_path, capsys):
    """A file with a head missing, a stray tensor or a head short of a tensor is damaged (config.json cannot fix
    it); a bad tree or accuracy table in config.json is named there, with a fix that works."""
    dim, vocab = model.config.dim, model.config.vocab_size
    config = {"medusa_num_heads": 3, "medusa_num_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = reference_state(3, 1, dim, vocab, "")
    damaged = {
        "a head missing": ({k: v for k, v in state.items() if not k.startswith("1.")},
                           "has no tensors of head 1 (it has heads up to 2); re-download or re-train the heads."),
        "a stray tensor": ({**state, "foo": torch.zeros(1)},
                           "tensor foo belongs to no head (names start with the head's number); re-download or "
                           "re-train the heads."),
        "head 0 short of its vocab projection": ({k: v for k, v in state.items() if k != "0.1.weight"},
                                                 "heads 0 and 1 hold different tensors (1.weight is in one only); "
                                                 "re-download or re-train the heads."),
    }
    for name, (tensors, message) in damaged.items():
        save_file(tensors, str(tmp_path / "medusa_lm_head.safetensors"))
        with pytest.raises(NanoMedusaError, match=re.escape(message)):
            MedusaHeads.load(tmp_path, model.config)
    save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    bad_config = {
        "medusa_choices": ([[0], 1], "medusa_choices is not a tree (tree entry 1 is not a non-empty list of top-k "
                                     "indices); give it as a list of paths such as [[0], [0, 0], [1]] or a preset's "
                                     "name ("),
        "medusa_choices ": ([[0], [1, 0]], "medusa_choices is not a tree (tree path [1, 0] needs its prefix [1] in "
                                           "the tree too); give it as"),
        "medusa_choices  ": ("mc_sim", "medusa_choices 'mc_sim' is no preset; give it as a list of paths"),
        "rank_accuracy": ([[0.5, 0.2], [0.4], [0.3]], "remove it from config.json, then measure it again"),
        "rank_accuracy ": ([[0.1] * 17] * 3, "of 1 to 16 numbers from 0 to 1 each"),
        "medusa_temperatures": ([1.0], "remove them from config.json, then fit them again"),
    }
    for key, (value, message) in bad_config.items():
        (tmp_path / "config.json").write_text(json.dumps({**config, key.strip(): value}))
        with pytest.raises(NanoMedusaError, match=re.escape(f"{tmp_path}/config.json's ") + ".*" + re.escape(message)):
            MedusaHeads.load(tmp_path, model.config)
    # a preset's name is a tree: the heads' own, whose size is a dynamic tree's default budget
    from nanomedusa.dynamic_tree import default_nodes
    from nanomedusa.tree import PRESETS

    (tmp_path / "config.json").write_text(json.dumps({**config, "medusa_choices": "chain3"}))
    heads = MedusaHeads.load(tmp_path, model.config)
    assert heads.config.medusa_choices == PRESETS["chain3"] and default_nodes(heads.config) == 4
    assert default_nodes(replace(heads.config, medusa_choices="chain2")) == 3
    (tmp_path / "config.json").write_text(json.dumps({**config, "medusa_choices": []}))  # no tree of their own
    assert MedusaHeads.load(tmp_path, model.config).config.medusa_choices is None


def test_shipped_heads_are_the_default_model_s_default():
    import generate

    assert generate.default_heads_dir(generate.parse_args(["--prompt", "hi"])) == generate.SHIPPED_HEADS
    assert generate.default_heads_dir(generate.parse_args(["--prompt", "hi", "--model", "some/other-model"])) is None


def test_a_cpu_s_default_tree_is_the_root_and_one_guess_and_own_picks_the_heads_tree(model, tmp_path, capsys,
                                                                                        monkeypatch):
    import generate

    heads = MedusaHeads.from_base(model, num_heads=2, num_layers=1)
    heads.config.medusa_choices = [[0], [1], [0, 0], [0, 0, 0]]  # one path deeper than the heads: cut
    heads.save(tmp_path)
    monkeypatch.setattr(generate, "SHIPPED_HEADS", tmp_path)  # as the default model's heads: a CPU takes them too
    assert generate.load_heads(generate.parse_args(["--prompt", "hi"]), model)[1].paths == [[], [0]]
    argv = ["--prompt", "hi", "--medusa", str(tmp_path)]

    def tree_of(*flags):
        return generate.load_heads(generate.parse_args(argv + list(flags)), model)[1].paths

    assert tree_of() == [[], [0]]  # on a CPU: chain1
    assert "on a CPU the default tree is chain1" in capsys.readouterr().err
    assert tree_of("--tree", "own") == [[], [0], [1], [0, 0]]
    assert tree_of("--tree", "chain2") == [[], [0], [0, 0]]
    assert "default tree" not in capsys.readouterr().err  # a tree asked for: no note
    # a preset deeper than the heads runs cut to them, as the default tree does; a tree of one's own is refused
    # (generate_medusa's check, tests/test_errors.py)
    assert tree_of("--tree", "chain3") == [[], [0], [0, 0]]
    assert ("the preset chain3 is 3 deep and these heads guess 2 tokens, so it runs cut to its 3 nodes at most 2 "
            "deep." in capsys.readouterr().err)
    assert tree_of("--tree", "[[0], [0, 0], [0, 0, 0]]") == [[], [0], [0, 0], [0, 0, 0]]
    assert generate.load_heads(generate.parse_args(argv + ["--no-medusa"]), model) == (None, None)


@pytest.mark.parametrize("checkpoint, preset", [("smollm2-135m-instruct-medusa", "smollm2_135m_medusa1"),
                                                ("smollm2-135m-instruct-medusa2", "smollm2_135m_medusa2"),
                                                ("smollm2-135m-instruct-medusa-path", "smollm2_135m_medusa_path")])
def test_shipped_heads_run_their_named_tree_built_from_their_accuracies(checkpoint, preset):
    # The preset is the paper's greedy tree for the shipped heads' measured rank accuracies, and it is
    # the tree their config.json makes them run with (retraining the heads must update both).
    import generate
    from nanomedusa.tree import PRESETS, tree_from_head_accuracies

    config = json.loads((generate.SHIPPED_HEADS.parent / checkpoint / "config.json").read_text())
    assert config["medusa_choices"] == PRESETS[preset]
    assert tree_from_head_accuracies(config["rank_accuracy"], len(PRESETS[preset])) == PRESETS[preset]
    depth = max(len(path) for path in PRESETS[preset])  # the heads a tree does not reach were trimmed
    assert config["num_heads"] == len(config["rank_accuracy"]) == depth and config["shared_lm_head"]
    # trained before conversations were held out by id: tree tuning and calibration must split them by position
    assert config["held_out"] == {"eval_fraction": 0.02, "seed": 0, "chat_format": "chatml", "split": "position"}


def test_heads_of_another_local_model_get_a_note(tmp_path, monkeypatch):
    # Heads read their own model's hidden states: after full joint training that is train.py's OUT/model, which must
    # be served with them. Only local checkpoints are compared (a hub id or a label says too little).
    from nanomedusa.heads import base_model_note

    for name in ("base", "base-bfloat16", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    other = str(tmp_path / "other")
    assert base_model_note("h", other, tmp_path / "base") == (
        f"the heads in h were trained on the model in {other}, and this run loads {tmp_path / 'base'}; on a model "
        f"other than their own they guess worse (decoding is slower): pass --model {other}")
    assert base_model_note("h", other, tmp_path / "other") is None
    assert base_model_note("h", other, tmp_path / "other" / ".." / "other") is None
    # a dtype copy we prepared of the model the heads name (the default model's bfloat16 folder on a GPU) is that model
    assert base_model_note("h", str(tmp_path / "base"), tmp_path / "base-bfloat16") is None
    assert base_model_note("h", str(tmp_path / "base-bfloat16"), tmp_path / "base") is None
    monkeypatch.chdir(tmp_path)  # relative paths, from where they were written
    assert base_model_note("h", "other", "base") is not None
    assert base_model_note("h", "other", tmp_path / "other") is None
    for base in ("", "lmsys/vicuna-7b-v1.3", "SmolLM2-135M-Instruct (weights/default_model.py)", str(tmp_path / "gone")):
        assert base_model_note("h", base, tmp_path / "base") is None
