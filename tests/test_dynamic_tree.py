"""Dynamic trees, calibration and their benchmark (decoding with dynamic trees: tests/test_medusa.py).

A step's choice is checked against a plain-Python reference (the N best nodes by score, ties to the
smaller node), its buffers against `TreeBuffers.from_choices` of the chosen paths, and the acceptance
kernels on those buffers against the same kernels on the static buffers: so a dynamic step verifies and
accepts exactly as a static tree of the same shape would. Which tree is chosen depends only on the
context (the heads' output), never on the step's random draws, so lossless sampling stays lossless.
"""

import contextlib
import copy
import io
import json
import math

import pytest
import torch

from kernels.acceptance import accept_candidates_reference, accept_candidates_triton
from nanomedusa.calibration import fit_temperature, held_out_prompts
from nanomedusa.calibration import main as calibration_main
from nanomedusa.dynamic_tree import DynamicTree
from nanomedusa.errors import NanoMedusaError
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from nanomedusa.tree import TreeBuffers, tree_from_head_accuracies
from nanomedusa.training.data import load_conversations, train_eval_split
from tests.test_medusa import one_thread  # noqa: F401 (a fixture)
from tests.test_tree import random_tree
from tests.tiny_tokenizer import make_chat_checkpoint

# Where the Triton kernels take their tensors: CUDA on a GPU machine, the CPU under the interpreter (CI).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_kernel_device(fn):
    """fn with its tensor arguments moved to KERNEL_DEVICE and its tensor results back to the CPU."""
    def call(*args):
        results = fn(*(a.to(KERNEL_DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
        return [r.cpu() for r in results]
    return call

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_choice(paths: list[list[int]], logprobs: list[list[float]], n: int) -> list[int]:
    """The n superset nodes with the largest summed log-probability, ties to the smaller node, in node order."""
    score = [0.0] * len(paths)
    for node, path in enumerate(paths[1:], start=1):  # a path's sum in the order the device adds it up
        for depth, rank in enumerate(path):
            score[node] += logprobs[depth][rank]
    return sorted(sorted(range(len(paths)), key=lambda node: (-score[node], node))[:n])


def random_cases(count: int):
    """(dynamic tree, head ids [K, k], head log-probabilities [K, k]) on random supersets; every other case
    has small-integer log-probabilities, whose sums tie often and exactly."""
    gen = torch.Generator().manual_seed(0)
    for case in range(count):
        choices = random_tree(gen, int(torch.randint(1, 40, (1,), generator=gen)), depth=4, topk=4)
        superset = TreeBuffers.from_choices(choices)
        n = [1, superset.num_nodes, int(torch.randint(1, superset.num_nodes + 1, (1,), generator=gen))][case % 3]
        K, k = superset.depth_max, superset.topk
        if case % 2:
            logprobs = (-torch.randint(0, 3, (K, k), generator=gen).float()).sort(dim=1, descending=True).values
        else:
            logprobs = torch.rand(K, k, generator=gen, dtype=torch.float64).log().sort(dim=1, descending=True).values
        ids = torch.randperm(1000, generator=gen)[: K * k].view(K, k)  # distinct ids: a wrong slot shows
        yield DynamicTree.from_choices(choices, n), ids, logprobs


def test_choice_is_the_n_best_nodes_and_a_tree():
    for tree, ids, logprobs in random_cases(60):
        paths = tree.superset.paths
        tokens, nodes = tree.choose(torch.tensor(7777), ids, logprobs)
        assert nodes.tolist() == reference_choice(paths, logprobs.tolist(), tree.num_nodes)
        chosen = {tuple(paths[node]) for node in nodes.tolist()}
        assert all(path[:-1] in chosen for path in chosen if path)  # ancestor-closed: a tree
        assert tokens.tolist() == [7777] + [ids[len(paths[n]) - 1, paths[n][-1]].item() for n in nodes.tolist()[1:]]


def test_a_child_never_outranks_its_parent_when_probabilities_are_one():
    # log-probabilities 0 (certain guesses, or rounding just above 0, clamped): a whole path ties with the
    # root, and the ties go to the shallower node, so any N of them are still a tree.
    tree = DynamicTree.from_choices([[1], [0], [0, 0], [0, 0, 0], [1, 0]], 3)
    logprobs = torch.tensor([[1e-7, 0.0], [0.0, -1.0], [0.0, -1.0]])
    assert tree.choose(torch.tensor(1), torch.zeros(3, 2, dtype=torch.long), logprobs)[1].tolist() == [0, 1, 2]


def check_layout(tree: DynamicTree, nodes: torch.Tensor) -> tuple[TreeBuffers, TreeBuffers]:
    """The step's buffers equal from_choices' for the chosen paths, padded to fixed shapes -> (step, static)."""
    step = tree.layout(nodes)
    N = tree.num_nodes
    assert step.num_nodes == N and step.attn_mask.shape == (N, N)
    assert step.retrieve_indices.shape == (N, tree.depth_max + 1)
    if N == 1:  # from_choices has no root-only tree: its one row is the root
        assert step.attn_mask.tolist() == [[True]] and step.retrieve_indices.tolist() == [[0]]
        return step, step
    static = TreeBuffers.from_choices([tree.superset.paths[n] for n in nodes.tolist()[1:]])
    assert torch.equal(step.attn_mask, static.attn_mask)
    assert torch.equal(step.depths, static.depths) and torch.equal(step.parents, static.parents)
    P, D = static.retrieve_indices.shape
    assert torch.equal(step.retrieve_indices[:P, :D], static.retrieve_indices)
    assert (step.retrieve_indices[:P, D:] == -1).all() and (step.retrieve_indices[P:] == -1).all()
    return step, static


def test_layout_equals_the_static_buffers_of_the_chosen_paths():
    for tree, ids, logprobs in random_cases(60):
        tokens, nodes = tree.choose(torch.tensor(5), ids, logprobs)
        step, static = check_layout(tree, nodes)
        if tree.num_nodes > 1:
            assert torch.equal(tokens, static.candidate_tokens(torch.tensor(5), ids))


def test_docstring_example_exactly():
    tree = DynamicTree.from_choices([[0], [1], [0, 0], [0, 1]], 4)
    ids = torch.tensor([[10, 11], [12, 13]])  # a, b; c, d
    assert tree.ranks.tolist() == [[-1, -1], [0, -1], [1, -1], [0, 0], [0, 1]]
    tokens, nodes = tree.choose(torch.tensor(99), ids, torch.tensor([[0.7, 0.2], [0.6, 0.3]]).log())
    assert nodes.tolist() == [0, 1, 3, 4] and tokens.tolist() == [99, 10, 12, 13]
    step = tree.layout(nodes)
    assert step.depths.tolist() == [0, 1, 2, 2] and step.parents.tolist() == [0, 0, 1, 1]
    assert step.attn_mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]
    assert step.retrieve_indices.tolist() == [[0, 1, 2], [0, 1, 3], [-1, -1, -1], [-1, -1, -1]]
    assert tree.children.tolist() == [[1, 2], [3, 4], [-1, -1], [-1, -1], [-1, -1]]  # the superset's, for layouts
    chain = DynamicTree.from_choices([[0], [1], [0, 0], [0, 1]], 3)
    assert chain.choose(torch.tensor(99), ids, torch.tensor([[0.7, 0.2], [0.6, 0.3]]).log())[1].tolist() == [0, 1, 3]
    unsure = torch.tensor([[0.3, 0.25], [0.6, 0.3]]).log()
    assert chain.choose(torch.tensor(99), ids, unsure)[1].tolist() == [0, 1, 2]


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_acceptance_on_a_dynamic_layout_equals_the_static_trees(kernel):
    """Greedy, typical and lossless-sampling acceptance give the same path and length on a step's padded buffers
    as on the chosen paths' static buffers (sampling: the same draw at each node)."""
    accept = {"torch": accept_candidates_reference, "triton": on_kernel_device(accept_candidates_triton)}[kernel]
    gen = torch.Generator().manual_seed(1)
    cases = list(random_cases(5 if kernel == "triton" else 40))  # (the interpreter is slow)
    accepted = dict.fromkeys(("greedy", "typical", "sample"), 0)
    for case, (tree, ids, logprobs) in enumerate(cases):
        tokens, nodes = tree.choose(torch.tensor(0), ids % 16, logprobs)  # tokens in a 16-token vocabulary
        step, static = check_layout(tree, nodes)
        logits = torch.randn(tree.num_nodes, 16, generator=gen) * 3
        # most nodes' tokens their parent's likeliest (so mostly drawn too): paths get accepted, not only rejected
        likely = torch.rand(tree.num_nodes, generator=gen) < 0.7
        likely[0] = False  # (the root has no parent)
        logits[step.parents[likely], tokens[likely]] += 20
        drawn = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]  # [N] each node's draw
        for mode in accepted:  # the leaves' rows come first, in the same order: the same row
            draws = drawn if mode == "sample" else None
            got, want = (accept(logits, tokens, t.retrieve_indices, mode, 0.7, 0.09, 0.3, draws)
                         for t in (step, static))
            assert [t.item() for t in got] == [t.item() for t in want], (case, mode)
            accepted[mode] += int(want[1] > 0)
    assert all(count > len(cases) // 2 for count in accepted.values()), accepted  # most cases accept something


def test_a_dynamic_proposal_launches_no_more_kernels_than_a_static_one(tiny):
    """Pinned, so that the choice's launches do not creep back. On the Triton kernels (what a GPU's step graph
    replays), a dynamic tree's proposal and layout launch the heads' L + 2 kernels (their top-k with the
    log-partition), one choice and one layout; a static tree's proposal the same heads' kernels and two torch
    ops laying its tokens out. (With the torch log-softmax and choice: 47 + 21 kernels, against 6.)"""
    import kernels
    from bench.dynamic_trees import proposal_kernels

    root, model = tiny
    model = copy.deepcopy(model).to(KERNEL_DEVICE)  # (the module's model stays on the CPU for the other tests)
    heads = MedusaHeads.load(root / "heads", model.config).to(KERNEL_DEVICE).eval()
    config = heads.config
    kernels.set_backend("triton")  # (the conftest fixture restores the backend)
    for nodes in (2, 16):
        static = TreeBuffers.from_choices(tree_from_head_accuracies(config.rank_accuracies(), nodes - 1),
                                          device=KERNEL_DEVICE)
        dynamic = DynamicTree.for_heads(config, nodes, device=KERNEL_DEVICE)
        static_kernels, dynamic_kernels = proposal_kernels(model, heads, static, dynamic)
        assert static_kernels == config.num_layers + 4
        assert dynamic_kernels <= config.num_layers + 4, dynamic_kernels


def test_path_reading_heads_get_a_budget_sized_superset():
    # Their proposal runs on every superset parent, so their superset is 4 N nodes (at most 256); Medusa's 256.
    from dataclasses import replace

    from nanomedusa.heads import HeadsConfig

    config = HeadsConfig(3, 1, 40, 300, True, rank_accuracy=[[0.5 / (r + 1) for r in range(10)]] * 3)
    path = replace(config, reads_path=True)
    assert [DynamicTree.for_heads(path, n).superset.num_nodes for n in (16, 32, 64, 128)] == [64, 128, 256, 256]
    assert [DynamicTree.for_heads(config, n).superset.num_nodes for n in (16, 128)] == [256, 256]
    assert DynamicTree.for_heads(path, 16, superset_nodes=256).superset.num_nodes == 256  # a size given is kept


def test_budget_out_of_range_is_a_clear_error():
    with pytest.raises(NanoMedusaError, match=r"verifies 1 to 4 of them, not 5; pass a node budget \(--tree-nodes\) in "
                                              r"that range"):
        DynamicTree.from_choices([[0], [1], [0, 0]], 5)


# --- calibration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("true_temperature", [3.0, 0.5])
def test_fitted_temperature_recovers_a_known_one(true_temperature):
    # Targets drawn from softmax(z); the heads report z * T (T = 3: over-confident): the fit must find T and
    # lower the NLL.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 50, generator=gen) * 2
    targets = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=gen)[:, 0]
    logits = z * true_temperature
    fit = fit_temperature(lambda: ((logits[i:i + 4096], targets[i:i + 4096]) for i in range(0, 20000, 4096)))
    assert fit.temperature == pytest.approx(true_temperature, rel=0.05)
    assert fit.nll_after < fit.nll_before - 0.05
    exact = torch.nn.functional.cross_entropy(logits / fit.temperature, targets).item()
    assert fit.nll_after == pytest.approx(exact, rel=1e-4)
    assert fit.nll_before == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny chat checkpoint (model + tokenizer) and random heads saved beside it."""
    root = tmp_path_factory.mktemp("tiny")
    make_chat_checkpoint(root / "model", seed=1, max_position_embeddings=512)
    model = load_model(root / "model", "cpu", "float32")[0]
    heads = MedusaHeads.from_base(model, num_heads=3, num_layers=1)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    heads.save(root / "heads")
    return root, model


def test_heads_config_round_trips_temperatures_and_uses_them(tiny, tmp_path):
    root, model = tiny
    plain = MedusaHeads.load(root / "heads", model.config)  # written without temperatures: T = 1
    assert plain.config.medusa_temperatures is None and plain.config.temperatures() == [1.0, 1.0, 1.0]
    plain.config.medusa_temperatures = [2.0, 0.5, 1.25]
    plain.save(tmp_path)
    heads = MedusaHeads.load(tmp_path, model.config)
    assert heads.config.medusa_temperatures == [2.0, 0.5, 1.25]
    hidden = torch.randn(2, model.config.dim)
    ids, logprobs = heads.topk_logprobs(hidden, 4, model.lm_head.weight)
    logits = heads(hidden, model.lm_head.weight)
    expected = torch.log_softmax(logits / torch.tensor([2.0, 0.5, 1.25])[:, None, None], dim=-1).topk(4, dim=-1)
    assert torch.equal(ids, expected.indices) and torch.allclose(logprobs, expected.values)
    assert torch.equal(ids, heads.topk(hidden, 4, model.lm_head.weight))  # a temperature reorders nothing


@pytest.mark.parametrize("bad", [[1.0, 2.0], [1.0, 0.0, 1.0], "warm", [1.0, True, 1.0]])
def test_bad_temperatures_are_a_clear_error(tiny, tmp_path, bad):
    root, model = tiny
    heads = MedusaHeads.load(root / "heads", model.config)
    heads.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "medusa_temperatures": bad}))
    with pytest.raises(NanoMedusaError, match="medusa_temperatures must be 3 positive numbers, one per head; remove "
                                              "them from config.json, then fit them"):
        MedusaHeads.load(tmp_path, model.config)


def write_prompts(path, count: int) -> None:
    words = ["Hi.", "Tell me a story about a cat.", "What is 2+2?", "Name three colours, please."]
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": words[i % 4] + " x" * (i % 7)}) + "\n"
                            for i in range(count)))


def test_held_out_prompts_are_those_train_py_holds_out(tiny, tmp_path, capsys):
    # train.py holds out part of the answers file, which distillation writes longest prompt first.
    from nanomedusa.tokenizer import Tokenizer
    from nanomedusa.training.distill import DistillConfig, distill

    root, _ = tiny
    write_prompts(tmp_path / "prompts.jsonl", 30)
    distill(DistillConfig(model=str(root / "model"), data=str(tmp_path / "prompts.jsonl"),
                          out=str(tmp_path / "a.jsonl"), max_new_tokens=2, device="cpu", dtype="float32"))
    for split, tokenizer in (("position", Tokenizer.from_dir(root / "model")), ("id", None)):
        trained_held_out = train_eval_split(load_conversations(tmp_path / "a.jsonl"), 0.2, 3, split)[1]
        held_out = held_out_prompts(str(tmp_path / "prompts.jsonl"), tokenizer, 0.2, 3, split)
        assert sorted(c.id for c in held_out) == sorted(c.id for c in trained_held_out)
        assert [c.id for c in held_out] == sorted((c.id for c in held_out), key=lambda i: int(i[1:]))  # file order
    # The command line splits as --heads record they were split (by position here), or as --split says.
    heads = MedusaHeads.load(root / "heads", load_model(root / "model", "cpu", "float32")[0].config)
    heads.config.held_out = {"eval_fraction": 0.2, "seed": 3, "chat_format": "chatml", "split": "position"}
    heads.save(tmp_path / "heads")
    for flags, split in ((["--heads", str(tmp_path / "heads")], "position"), (["--split", "id"], "id")):
        out = tmp_path / f"held-{split}.jsonl"
        assert calibration_main(["--held-out-prompts", str(tmp_path / "prompts.jsonl"), "--out", str(out), "--model",
                                 str(root / "model"), "--eval-fraction", "0.2", "--seed", "3", *flags]) == 0
        expected = train_eval_split(load_conversations(tmp_path / "a.jsonl"), 0.2, 3, split)[1]
        assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == sorted(c.id for c in expected)
    assert (tmp_path / "held-id.jsonl").read_text() != (tmp_path / "held-position.jsonl").read_text()
    capsys.readouterr()
    assert calibration_main(["--held-out-prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                             "--model", str(root / "model"), "--eval-fraction", "0.2", "--heads",
                             str(tmp_path / "heads"), "--seed", "0"]) == 0
    assert "the heads were trained with --seed 3 and this run has 0" in capsys.readouterr().err
    # left out, --eval-fraction and --seed are the heads' own too
    assert calibration_main(["--held-out-prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                             "--model", str(root / "model"), "--heads", str(tmp_path / "heads")]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "o.jsonl").read_text() == (tmp_path / "held-position.jsonl").read_text()
    # heads trained on every answer have no held-out prompts to give
    heads.config.held_out["eval_fraction"] = 0
    heads.save(tmp_path / "heads")
    assert calibration_main(["--held-out-prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                             "--heads", str(tmp_path / "heads")]) == 2
    assert "were trained with --eval-fraction 0, on the answers to every prompt" in capsys.readouterr().err


def test_calibration_cli_writes_temperatures(tiny, tmp_path):
    root, _ = tiny
    answers = tmp_path / "answers.jsonl"
    turns = [[{"from": "human", "value": "Say something."}, {"from": "gpt", "value": f"Hello, friend number {i}."}]
             for i in range(4)]
    answers.write_text("".join(json.dumps({"id": str(i), "conversations": t}) + "\n" for i, t in enumerate(turns)))
    heads_dir = tmp_path / "heads"
    MedusaHeads.load(root / "heads", load_model(root / "model", "cpu", "float32")[0].config).save(heads_dir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = calibration_main(["--heads", str(heads_dir), "--data", str(answers), "--model", str(root / "model"),
                               "--whole-files", "--device", "cpu", "--write"])
    assert rc == 0, printed.getvalue()
    temperatures = json.loads((heads_dir / "config.json").read_text())["medusa_temperatures"]
    assert len(temperatures) == 3 and all(t > 0 for t in temperatures)
    assert printed.getvalue().count("NLL") == 3


def test_calibration_cli_needs_heads_and_data(capsys):
    assert calibration_main(["--heads", "."]) == 2
    assert "pass --heads DIR and --data FILE" in capsys.readouterr().err


# --- generate.py and the benchmark ----------------------------------------------------------------

def test_generate_runs_a_dynamic_tree(tiny, capsys):
    import generate

    root, _ = tiny
    argv = ["--model", str(root / "model"), "--medusa", str(root / "heads"), "--device", "cpu", "--prompt", "Hi.",
            "--max-new-tokens", "8", "--quiet"]
    assert generate.main(argv + ["--tree", "dynamic", "--tree-nodes", "5"]) == 0
    assert "[medusa] " in capsys.readouterr().err
    assert generate.main(argv + ["--tree-nodes", "5"]) == 2
    assert "--tree-nodes sizes a dynamic tree; add --tree dynamic" in capsys.readouterr().err


def test_generate_compare_says_whether_medusa_gave_plain_greedys_tokens(tiny, capsys):
    import generate

    root, _ = tiny
    argv = ["--model", str(root / "model"), "--medusa", str(root / "heads"), "--device", "cpu", "--prompt", "Hi.",
            "--max-new-tokens", "12", "--quiet", "--compare"]
    assert generate.main(argv) == 0
    assert "[compare] same tokens as plain greedy decoding: yes" in capsys.readouterr().err  # fp32: exact anyway
    assert generate.main(argv + ["--accept", "typical", "--temperature", "0.7"]) == 0  # need not give greedy's text
    assert "same tokens as plain" not in capsys.readouterr().err
    assert generate._first_difference([5, 6, 7], [5, 6, 8]) == 2
    assert generate._first_difference([5, 6], [5, 6, 7]) == 2  # one stopped early (an eos)


def test_generate_turns_default_exact_off_for_a_tree_its_kernels_cannot_take(tiny, capsys, monkeypatch):
    import generate
    import kernels
    from nanomedusa import cli

    root, _ = tiny
    monkeypatch.setattr(cli, "exact_by_default", lambda backend, device: True)  # as on a Hopper GPU
    monkeypatch.setattr(cli, "exact_fits", lambda num_nodes, depth: False)  # as for a tree 8 deep
    # (the Triton kernels need a GPU, or the interpreter the CPU runs them in here)
    argv = ["--model", str(root / "model"), "--medusa", str(root / "heads"), "--device", KERNEL_DEVICE,
            "--prompt", "Hi.", "--max-new-tokens", "1", "--quiet", "--kernels", "triton"]
    assert generate.main(argv) == 0
    assert "[note] --exact is off: its kernels take trees of at most" in capsys.readouterr().err
    assert not kernels.row_invariant()
    assert generate.main(argv + ["--exact"]) == 0  # asked for: kept (and the kernels would refuse the tree)
    assert "--exact is off" not in capsys.readouterr().err and kernels.row_invariant()
    # what the kernels limit is the tree's depth, not the heads' count (3 here): a shallower tree keeps --exact
    asked = []
    monkeypatch.setattr(cli, "exact_fits", lambda num_nodes, depth: asked.append((num_nodes, depth)) or True)
    assert generate.main(argv + ["--tree", "[[0], [1], [0, 0]]"]) == 0
    assert asked == [(4, 2)] and kernels.row_invariant()


def test_benchmark_runs_on_a_tiny_model(tiny, tmp_path):
    from bench.dynamic_trees import main as bench_main

    root, _ = tiny
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, 2)
    printed = io.StringIO()
    argv = ["--heads", str(root / "heads"), "--model", str(root / "model"), "--prompts", str(prompts),
            "--budgets", "2,5", "--max-new-tokens", "6", "--choice-reps", "2", "--device", "cpu"]
    with contextlib.redirect_stdout(printed):
        assert bench_main(argv + ["--json", str(tmp_path / "out.json")]) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["nodes"], r["tree"]) for r in rows] == [(2, "static"), (2, "dynamic"), (5, "static"), (5, "dynamic")]
    assert all(r["mean_accepted"] >= 1 and r["step_ms"] > 0 and math.isfinite(r["tokens_per_s"]) for r in rows)
    assert all(r["same_as_static"] == 2 for r in rows if r["tree"] == "dynamic")  # greedy: the same text
    assert all(r["proposal_kernels"] > 0 for r in rows)
    assert "| 5 | dynamic |" in printed.getvalue()
    # typical acceptance and lossless sampling with both trees (their texts may differ: no count of equal ones)
    for accept in ("typical", "sample"):
        with contextlib.redirect_stdout(printed):
            assert bench_main(argv + ["--accept", accept, "--json", str(tmp_path / f"{accept}.json")]) == 0
        out = json.loads((tmp_path / f"{accept}.json").read_text())
        assert out["accept"] == accept and out["sampling"]["temperature"] == 0.7
        assert len(out["rows"]) == 4 and all(r["mean_accepted"] >= 1 for r in out["rows"])
        assert all(r["same_as_static"] is None for r in out["rows"] if r["tree"] == "dynamic")
    assert "typical at temperature 0.7, 2 prompts" in printed.getvalue()
    assert "sample at temperature 0.7, top-p 0.9, 2 prompts" in printed.getvalue()
    with pytest.raises(SystemExit) as stopped:  # a rule that draws needs a temperature: one line, before loading
        bench_main(argv + ["--accept", "sample", "--temperature", "0"])
    assert stopped.value.code == 2
