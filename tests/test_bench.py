"""The benchmarks (bench/) on CPU with tiny shapes: every part runs and the JSON holds what it claims."""

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import linear as linear_bench
from bench import tree_attention
from bench.checkpoints import heads_specs, parse_heads_spec
from bench.decode import main
from bench.prompts import DEFAULT_PROMPTS
from kernels.testing import tree_attention_inputs
from nanomedusa.config import ModelConfig
from nanomedusa.errors import NanoMedusaError
from nanomedusa.heads import MedusaHeads
from nanomedusa.loading import load_model
from nanomedusa.model import Transformer
from tests.tiny_tokenizer import make_chat_checkpoint

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRAIN_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts-train.jsonl"
CHAT_PROMPTS = DEFAULT_PROMPTS.with_name("prompts-chat.jsonl")
TINY_7B = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96)
SHAPE_FLAGS = [("vocab", "vocab_size"), ("dim", "dim"), ("layers", "n_layers"), ("heads", "n_heads"),
               ("kv-heads", "n_kv_heads"), ("ffn", "intermediate_size")]


def save_random_heads(model, out_dir, num_heads, seed, medusa_choices=None):
    heads = MedusaHeads.from_base(model, num_heads=num_heads, num_layers=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    heads.config.medusa_choices = medusa_choices
    heads.save(out_dir)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One benchmark run: base model with Medusa-1 heads, plus joint-trained heads beside their own backbone."""
    tmp = tmp_path_factory.mktemp("bench")
    seed = 1  # fixed: a random tiny model may answer eos at once, leaving no decoding step to check
    make_chat_checkpoint(tmp / "base", seed=seed, max_position_embeddings=1024)
    make_chat_checkpoint(tmp / "joint" / "model", seed=seed + 1, max_position_embeddings=1024)
    base = load_model(tmp / "base", "cpu", "float32")[0]
    joint = load_model(tmp / "joint" / "model", "cpu", "float32")[0]
    save_random_heads(base, tmp / "m1", num_heads=3, seed=seed, medusa_choices=[[0], [1], [0, 0]])
    save_random_heads(joint, tmp / "joint" / "heads", num_heads=2, seed=seed + 1)
    out = tmp / "results.json"
    # Tiny shapes gain nothing from threads, and on a shared CPU spinning threads cost seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    argv = ["--model", str(tmp / "base"), "--device", "cpu", "--dtype", "float32", "--num-prompts", "2",
            "--max-new-tokens", "8", "--heads", f"m1={tmp / 'm1'}", "--heads", str(tmp / "joint" / "heads"),
            "--json", str(out), "--7b-prefix", "16", "--7b-reps", "3", "--copy-mib", "1",
            "--sampling", str(DEFAULT_PROMPTS), str(CHAT_PROMPTS),
            *[f"--7b-{flag}={TINY_7B[key]}" for flag, key in SHAPE_FLAGS]]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            rc = main(argv)
    finally:
        torch.set_num_threads(threads)
    return rc, json.loads(out.read_text()), printed.getvalue()


def test_every_part_reports(run):
    rc, r, _ = run
    assert rc == 0
    assert {"device", "torch", "triton", "date", "dtype"} <= set(r["meta"])
    first_two = [json.loads(line)["id"] for line in DEFAULT_PROMPTS.read_text().split("\n")[:2]]
    assert [p["id"] for p in r["prompts"]] == first_two
    assert set(r["ar"]) == {"base", "joint/model"}
    for ar in r["ar"].values():
        assert len(ar["per_prompt"]) == 2 and ar["tokens_per_second"] > 0 and ar["mean_accepted"] == 1.0
        assert ar["new_tokens"] == sum(p["new_tokens"] for p in ar["per_prompt"]) <= 16


def test_summary_is_the_last_table(run):
    _, r, printed = run
    last = printed.split("\n### ")[-1]
    assert last.startswith("Summary (")
    for row in ["AR, ours (base)", "AR, ours (joint/model)", "Medusa m1 / own", "Medusa joint / chain4<=2",
                "HF transformers", "7B step ms", "7B floor"]:
        assert f"| {row}" in last
    assert "7B projected" in last and f"decode {r['7b']['decode_ms']:.2f}, mc_sim_7b_63 (T=64)" in last


def test_medusa_runs_each_tree_on_its_backbone_and_matches_plain_decoding(run):
    _, r, _ = run
    got = {(m["heads"], m["backbone"], m["tree"], m["tree_nodes"]) for m in r["medusa"]}
    assert got == {("m1", "base", "own", 4), ("m1", "base", "chain4<=3", 4), ("m1", "base", "mc_sim_7b_63<=3", 62),
                   ("joint", "joint/model", "chain4<=2", 3), ("joint", "joint/model", "mc_sim_7b_63<=2", 39)}
    for m in r["medusa"]:
        assert m["matches_ar"] == m["prompts"] == 2
        assert all(p["first_difference"] is None for p in m["per_prompt"])
        assert m["new_tokens"] == r["ar"][m["backbone"]]["new_tokens"]
        assert m["steps"] > 0 and m["mean_accepted"] == pytest.approx((m["new_tokens"] - 2) / m["steps"])
        assert m["vs_ar"] == pytest.approx(m["tokens_per_second"] / r["ar"][m["backbone"]]["tokens_per_second"])
        decode_seconds = sum(p["seconds"] - p["prefill_seconds"] for p in m["per_prompt"])
        assert m["decode_tokens_per_second"] == pytest.approx((m["new_tokens"] - 2) / decode_seconds)
        assert m["decode_vs_ar"] == pytest.approx(
            m["decode_tokens_per_second"] / r["ar"][m["backbone"]]["decode_tokens_per_second"])


def test_transformers_generate_matches_our_plain_decoding(run):
    _, r, _ = run
    assert r["hf"]["matches_ar"] == 2 and r["hf"]["tokens_per_second"] > 0
    ratio = r["ar"]["base"]["tokens_per_second"] / r["hf"]["tokens_per_second"]
    assert r["hf"]["ours_ar_vs_hf"] == pytest.approx(ratio)


def test_7b_shape_steps_floor_and_projection(run):
    _, r, _ = run
    big = r["7b"]
    with torch.device("meta"):
        params = sum(p.numel() for p in Transformer(ModelConfig(**TINY_7B)).parameters())
    assert big["weight_bytes"] == params * 4  # float32 on the CPU
    assert {64, 16} <= {s["nodes"] for s in big["tree_steps"]}
    assert big["decode_ms"] > 0
    assert big["floor_ms"] == pytest.approx(big["weight_bytes"] / big["copy_bandwidth_bytes_per_s"] * 1e3)
    assert len(big["projected"]) == len(r["medusa"])
    for p in big["projected"]:
        step = next(s for s in big["tree_steps"] if s["ms"] == p["tree_ms"])
        assert step["nodes"] == p["tree_nodes"]
        assert p["speedup"] == pytest.approx(p["mean_accepted"] * big["decode_ms"] / p["tree_ms"])


def test_sampling_part_reports_each_method_on_each_prompt_set(run):
    _, r, printed = run
    s = r["sampling"]
    assert (s["temperature"], s["top_p"], s["heads"], s["tree"], s["tree_nodes"]) == (0.7, 0.9, "m1", "own", 4)
    assert list(s["sets"]) == [DEFAULT_PROMPTS.stem, CHAT_PROMPTS.stem]
    for name, rows in s["sets"].items():
        assert list(rows) == ["plain greedy", "plain sampling", "Medusa lossless", "Medusa typical"]
        plain = rows["plain sampling"]
        for label, row in rows.items():
            assert row["prompts"] == 2 and 2 <= row["new_tokens"] <= 16 and row["tokens_per_second"] > 0
            assert row["vs_plain_sampling"] == pytest.approx(row["tokens_per_second"] / plain["tokens_per_second"])
            assert row["mean_accepted"] == 1.0 if label.startswith("plain") else row["mean_accepted"] >= 1.0
        assert f"### Sampling: {name} (temperature 0.7, top-p 0.9; m1 heads, tree own, T=4)" in printed


def test_heads_spec_syntax(tmp_path):
    spec = parse_heads_spec(f"m2={tmp_path / 'h'}@{tmp_path / 'm'}")
    assert (spec.label, spec.heads_dir, spec.model_dir) == ("m2", tmp_path / "h", tmp_path / "m")
    spec = parse_heads_spec(str(tmp_path / "run7" / "heads"))  # train.py's OUT/heads, no OUT/model
    assert (spec.label, spec.model_dir) == ("run7", None)
    for out, heads in (("run8", "heads"), ("mine", "medusa")):  # OUT/model goes with OUT/heads, not other folders
        (tmp_path / out / "model").mkdir(parents=True)
        (tmp_path / out / "model" / "config.json").write_text("{}")
        (tmp_path / out / heads).mkdir()
    assert parse_heads_spec(str(tmp_path / "run8" / "heads")).model_dir == tmp_path / "run8" / "model"
    assert parse_heads_spec(str(tmp_path / "mine" / "medusa")).model_dir is None
    # nor when that model is --model itself
    args = SimpleNamespace(heads=[str(tmp_path / "run8" / "heads")], model=str(tmp_path / "run8" / "model"), tree=[])
    assert [s.model_dir for s in heads_specs(args)] == [None]
    with pytest.raises(NanoMedusaError, match=r"--heads 'x=' is malformed; write \[LABEL=\]HEADS_DIR\[@MODEL_DIR\]"):
        parse_heads_spec("x=")


def test_bad_heads_are_refused_before_anything_runs(tmp_path, capsys):
    argv = ["--device", "cpu", "--skip-7b", "--heads", f"a={tmp_path}", "--heads", f"a={tmp_path}", "--json",
            str(tmp_path / "r.json")]
    assert main(argv) == 2
    assert "two --heads are both labelled 'a'; name them apart with LABEL=HEADS_DIR." in capsys.readouterr().err
    argv = ["--device", "cpu", "--skip-7b", "--heads", f"b={tmp_path / 'nope'}", "--json", str(tmp_path / "r.json")]
    assert main(argv) == 2
    assert f"heads directory {tmp_path / 'nope'} of --heads b does not exist; fix the path." in capsys.readouterr().err


@pytest.mark.parametrize("path, count", [(DEFAULT_PROMPTS, 20), (DEFAULT_PROMPTS.with_name("prompts-chat.jsonl"), 24)])
def test_held_out_prompts_are_diverse_and_not_training_prompts(path, count):
    prompts = [json.loads(line) for line in path.read_text().split("\n") if line]
    assert len(prompts) == count and len({p["id"] for p in prompts}) == count
    assert len({p["prompt"] for p in prompts}) == count
    if not TRAIN_PROMPTS.is_file():
        pytest.skip("../shared/data/prompts-train.jsonl is not beside this checkout")
    train = [json.loads(line)["prompt"].lower() for line in TRAIN_PROMPTS.read_text().split("\n") if line]
    for p in prompts:
        text = p["prompt"].lower()
        assert not any(text in t or t in text for t in train), p["id"]


def test_tree_attention_correctness_check_runs_on_a_tiny_case():
    errors = tree_attention.max_rel_errors(*tree_attention_inputs(4, 2, 16, 9, 3, torch.float32, DEVICE))
    assert set(errors) == {"triton", "triton 0-d prefix", "triton row-invariant", "torch reference", "torch SDPA"} | {
        f"triton split {n}" for n in (1, 2, 4, 8, 16, 32)}
    assert max(errors.values()) <= 1e-5


def test_tree_attention_smoke_runs_all_but_the_graph_timing(poisoned_allocations, tmp_path, capsys):
    # The GPU run's path (per-layer input sets, every implementation, a checked pass over all layers,
    # table, split sweep, JSON) on a tiny float32 shape, with one eager untimed pass in place of the
    # CUDA graph's capture and timing; every output starts as NaN, so an unwritten one fails the check.
    out = tmp_path / "tree_attention.json"
    assert tree_attention.main(["--smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["failures"] == [] and len(results["correctness"]) == len(tree_attention.SMOKE_NEW_TOKENS)
    rows = results["timings"]
    assert {(r["T"], r["implementation"]) for r in rows} == {
        (T, name) for T in tree_attention.SMOKE_NEW_TOKENS for name in tree_attention.IMPLEMENTATIONS}
    assert all(r["calls_per_graph"] == tree_attention.SMOKE_SHAPE.n_layers for r in rows)
    assert all(r["check_error"] <= 1e-5 for r in rows)
    assert [s["best"] for s in results["splits"]] == [1, 1]  # untimed: the first split that ran
    for label in ("triton (", "triton 0-d prefix (", "triton best (1 split)", "torch reference", "torch SDPA",
                  "heuristic"):
        assert label in printed


def test_linear_bench_matrices_are_the_two_models_layers():
    shapes = {(m.model, m.name): (m.N, m.K) for m in linear_bench.MATRICES}
    assert shapes == {("7B", "wqkv"): (12288, 4096), ("7B", "wo"): (4096, 4096), ("7B", "w13"): (22016, 4096),
                      ("7B", "w2"): (4096, 11008), ("7B", "lm_head"): (32000, 4096),
                      ("SmolLM2-135M", "wqkv"): (960, 576), ("SmolLM2-135M", "wo"): (576, 576),
                      ("SmolLM2-135M", "w13"): (3072, 576), ("SmolLM2-135M", "w2"): (576, 1536),
                      ("SmolLM2-135M", "lm_head"): (49152, 576)}
    grid = linear_bench.sweep_configs(227 << 10, 2)
    assert len(grid) == 102 and len(set(grid)) == len(grid)  # 4 of the 108 overflow 227 KiB


def test_linear_smoke_checks_times_and_sweeps(tmp_path, capsys):
    # The GPU run's path (checks, invariance of the kernel and of F.linear, the timing table, the sweep with
    # its split-K round, the JSON) on two tiny float32 matrices, one eager call per timing.
    out = tmp_path / "linear.json"
    assert linear_bench.main(["--smoke", "--sweep", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["failures"] == [] and r["mode"] == "smoke" and r["dtype"] == "float32"
    names = [m.name for m in linear_bench.SMOKE_MATRICES]
    assert [c["matrix"] for c in r["checks"]] == names
    assert all(c["triton_rows_differing"] == [] and c["rel_error"] <= 1e-5 for c in r["checks"])
    assert all(c["rows_checked"] == max(linear_bench.SMOKE_ROWS) for c in r["checks"])
    assert [(t["matrix"], t["M"]) for t in r["timings"]] == [(n, M) for n in names for M in linear_bench.SMOKE_ROWS]
    assert all(t["triton_us"] > 0 and t["cublas_us"] > 0 for t in r["timings"])
    for name in names:
        swept = {s["label"] for s in r["sweep"] if s["matrix"] == name and s["error"] is None}
        assert {linear_bench.config_label(c) for c in linear_bench.SMOKE_SWEEP} < swept
        assert any(label.endswith(" split2") for label in swept)
    for title in ("### Checks (float32)", "### Time per call", "### Sweep tiny a [24, 40]", "### Sweep summary"):
        assert title in printed


def test_linear_tree_sweep_keeps_the_k_schedule_and_checks_every_row_bitwise(tmp_path, capsys):
    # --sweep-tree: configs that cut the features differently but sum each element's products alike, each
    # checked bit for bit against the 1-row calls of the shipped config before it is timed.
    out = tmp_path / "linear.json"
    assert linear_bench.main(["--smoke", "--sweep-tree", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    on_gpu = torch.cuda.is_available()  # (the smoke runs on the GPU where there is one)
    assert r["failures"] == [] and r["sweep_tree"]
    for row in r["sweep_tree"]:
        m = next(m for m in linear_bench.SMOKE_MATRICES if m.name == row["matrix"])
        own, cfg = linear_bench._tile_config(m.N, m.K, torch.float32, on_gpu), row["config"]
        assert (cfg["block_m"], cfg["block_k"], cfg["split_k"]) == (own.block_m, own.block_k, own.split_k)
        assert row["rows_differing"] == [] and set(row["us"]) == {"16"}  # (JSON keys)
    assert {row["config"]["block_n"] for row in r["sweep_tree"]} >= set(linear_bench.SMOKE_TREE_BLOCK_N)
    assert "### Tree tiles summary" in capsys.readouterr().out
    # A config that sums each element's products in another order is caught, not timed: here 16-long K steps, with
    # K split in two whose sums are added at the end. (A shorter K step alone was the example, but an H200's fp32
    # product adds each product in K order whatever the step, so its bits did not change there.)
    matrix = linear_bench.SMOKE_MATRICES[0]
    own = linear_bench._tile_config(matrix.N, matrix.K, torch.float32, on_gpu)
    case = linear_bench.make_case(matrix, (16,), torch.float32, torch.device("cuda" if on_gpu else "cpu"), 0)
    results = {"sweep_tree": []}
    ranked = linear_bench.sweep_tree_matrix(case, own, [own._replace(block_k=16, split_k=2)],
                                            linear_bench.TABLE_REPS, results)
    assert ranked == [] and results["sweep_tree"][0]["rows_differing"]


def test_linear_sweep_compiles_in_worker_processes(capsys):
    # On the GPU the sweep's configs compile in parallel processes first; without one the same pool runs the
    # interpreter. Either way the call pickles and a worker's failure (a K step of 0) is counted, not raised.
    configs = [linear_bench.SMOKE_SWEEP[0], linear_bench.SMOKE_SWEEP[0]._replace(block_k=0)]
    linear_bench.precompile(configs, torch.float32, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    printed = capsys.readouterr().out
    assert printed.startswith("compiled 2 configs in ") and "(1 failed to compile or run)" in printed


def test_ab_steps_times_exported_versions_in_alternation(tmp_path, monkeypatch, capsys):
    from bench import ab_steps, timer
    monkeypatch.setattr(timer, "copy_bandwidth", lambda device, nbytes, samples: 1e9)  # 1 GB/s: a known floor
    first = ab_steps.export("HEAD", tmp_path)
    assert (first / "kernels" / "linear.py").is_file() and (first / "bench" / "steps.py").is_file()
    assert sorted(p.name for p in (first / "weights").iterdir()) == sorted(
        p.name for p in (ab_steps.REPO / "weights").glob("*.py"))  # the code, not the shipped heads
    second = tmp_path / "again"
    first.rename(second)
    ab_steps.export("HEAD", tmp_path)
    out = ab_steps.run(ab_steps.parse_args(
        ["run", str(first), str(second), "--shape", "smollm2-135m", "--layers", "1", "--prefix", "4",
         "--reps", "2", "--rounds", "1", "--device", "cpu", "--floor", "--json", str(tmp_path / "ab.json")]))
    assert [r["version"] for r in out["results"]] == ["HEAD", "again"]
    assert all(r["decode_ms"] > 0 and r["tree_ms"] > 0 and len(r["rounds"]) == 1 for r in out["results"])
    # the floor column: the one-layer model's weights at 1 GB/s, over each version's decode step
    first_run = out["results"][0]["rounds"][0]
    floor_ms = first_run["weight_bytes"] / 1e9 * 1e3
    assert first_run["weight_bytes"] > 1e6
    assert f"{floor_ms / out['results'][0]['decode_ms']:.1%}" in capsys.readouterr().out
    saved = json.loads((tmp_path / "ab.json").read_text())
    assert saved["results"][1]["version"] == "again" and saved["copy_bandwidth_bytes_per_s"] == 1e9


def test_ab_steps_errors_name_the_fix(tmp_path):
    from bench import ab_steps
    with pytest.raises(SystemExit, match="name a branch, tag or commit"):
        ab_steps.export("no-such-revision-anywhere", tmp_path)
    with pytest.raises(SystemExit, match="python -m bench.ab_steps export"):
        ab_steps.run(ab_steps.parse_args(["run", str(tmp_path)]))


def test_ab_decode_runs_each_version_end_to_end(tmp_path):
    from bench import ab_decode, ab_steps
    make_chat_checkpoint(tmp_path / "base", seed=1, max_position_embeddings=1024)
    save_random_heads(load_model(tmp_path / "base", "cpu", "float32")[0], tmp_path / "m1", num_heads=2, seed=1,
                      medusa_choices=[[0], [1], [0, 0]])
    files = []
    for name, text in (("a.jsonl", "Name three colours."), ("b.jsonl", "What is 2 + 3?")):
        (tmp_path / name).write_text(json.dumps({"id": name, "prompt": text}) + "\n")
        files.append(str(tmp_path / name))
    exported = ab_steps.export("HEAD", tmp_path / "ab")
    out = ab_decode.run(ab_decode.parse_args(
        [str(exported), ".", "--rounds", "1", "--json", str(tmp_path / "ab.json"), "--",
         "--model", str(tmp_path / "base"), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4",
         "--heads", f"m1={tmp_path / 'm1'}", "--tree", "own", "--no-hf", "--skip-7b", "--quick-warmup", "--prompts",
         *files]))
    assert (exported / "weights" / "smollm2-135m-instruct-medusa-path").is_symlink()  # the shipped heads, linked in
    versions = ("HEAD", ab_steps.REPO.name)
    assert {(r["method"], r["prompts"], r["version"]) for r in out["results"]} == {
        (m, f, v) for m in ("plain (base)", "m1 / own") for f in ("a.jsonl", "b.jsonl") for v in versions}
    assert all(r["tokens_per_second"] > 0 and r["runs"] == 1 for r in out["results"])
    assert json.loads((tmp_path / "ab.json").read_text())["versions"] == list(versions)


def test_ab_decode_reads_the_sampling_methods_of_every_file():
    from bench.ab_decode import methods
    result = {"ar": {"base": {"per_prompt": [{"id": "a1"}]}},
              "sampling": {"temperature": 0.7, "sets": {
                  "a": {"plain sampling": {"per_prompt": [{"id": "a1"}]},
                        "Medusa, lossless": {"per_prompt": [{"id": "a1"}]}},
                  "b": {"plain sampling": {"per_prompt": [{"id": "b1"}, {"id": "b2"}]}}}}}
    assert methods(result) == {"plain (base)": [{"id": "a1"}], "sampling: Medusa, lossless": [{"id": "a1"}],
                               "sampling: plain sampling": [{"id": "a1"}, {"id": "b1"}, {"id": "b2"}]}


def test_ab_decode_knows_the_sampling_prompt_files():
    from bench.ab_decode import prompt_files
    from bench.ab_steps import REPO
    from bench.prompts import DEFAULT_PROMPTS
    assert prompt_files(["--prompts", "a.jsonl", "--sampling", "b.jsonl", "a.jsonl", "--no-hf"]) == [
        REPO / "a.jsonl", REPO / "b.jsonl"]
    assert prompt_files(["--sampling", "b.jsonl"]) == [DEFAULT_PROMPTS, REPO / "b.jsonl"]
    assert prompt_files(["--sampling", "--no-hf"]) == [DEFAULT_PROMPTS]


def test_ab_decode_errors_name_the_fix(tmp_path):
    from bench import ab_decode
    with pytest.raises(SystemExit, match="python -m bench.ab_steps export"):
        ab_decode.run(ab_decode.parse_args([str(tmp_path), "--", "--no-hf"]))
    with pytest.raises(SystemExit):
        ab_decode.parse_args([".", "--", "--json", "x.json"])  # its own --json goes before `--`


# ---------------------------------------------------------------------------------------------------
# Bad flags: one `error:` line and exit status 2, before anything slow. A --model that does not exist shows the
# order: a flag refused after the model load would be reported as that missing model instead.

REPO = DEFAULT_PROMPTS.parents[1]
M1_HEADS = REPO / "weights" / "smollm2-135m-instruct-medusa"
PATH_HEADS = REPO / "weights" / "smollm2-135m-instruct-medusa-path"
NO_MODEL = ["--model", "{tmp}/no-model"]
BAD_FLAGS = {  # name: (module, argv, the error's start); {tmp} is a fresh directory
    "decode: a missing --prompts file": ("decode", ["--device", "cpu", "--skip-7b", "--prompts", "{tmp}/none.jsonl",
                                                    "--json", "{tmp}/r.json", *NO_MODEL],
                                         "--prompts {tmp}/none.jsonl does not exist; check the path."),
    "decode: --num-prompts 0": ("decode", ["--device", "cpu", "--skip-7b", "--num-prompts", "0", "--json",
                                           "{tmp}/r.json", *NO_MODEL], "--num-prompts must be at least 1, not 0"),
    "decode: a missing --sampling file": ("decode", ["--device", "cpu", "--skip-e2e", "--skip-7b", "--sampling",
                                                     "{tmp}/none.jsonl", "--json", "{tmp}/r.json", *NO_MODEL],
                                          "--sampling {tmp}/none.jsonl does not exist"),
    "decode: --7b-heads that do not split the width": ("decode", ["--device", "cpu", "--skip-e2e", "--7b-heads", "5",
                                                                  "--json", "{tmp}/r.json"],
                                                       "--7b-heads 5 does not split --7b-dim 4096"),
    "dynamic_trees: --budgets 4,x": ("dynamic_trees", ["--heads", "{tmp}", "--prompts", str(CHAT_PROMPTS), *NO_MODEL,
                                                       "--budgets", "4,x", "--device", "cpu"],
                                     "--budgets '4,x' is not a comma-separated list of node counts"),
    "dynamic_trees: --budgets 1": ("dynamic_trees", ["--heads", "{tmp}", "--prompts", str(CHAT_PROMPTS), *NO_MODEL,
                                                     "--budgets", "1", "--device", "cpu"],
                                   "--budgets must be at least 2, not 1"),
    "dynamic_trees: --choice-reps 0": ("dynamic_trees", ["--heads", "{tmp}", "--prompts", str(CHAT_PROMPTS), *NO_MODEL,
                                                         "--choice-reps", "0", "--device", "cpu"],
                                       "--choice-reps must be at least 1, not 0"),
    "dynamic_trees: --json a directory": ("dynamic_trees", ["--heads", "{tmp}", "--prompts", str(CHAT_PROMPTS),
                                                            *NO_MODEL, "--json", "{tmp}", "--device", "cpu"],
                                          "--json {tmp} is a directory"),
    "path_trees_offline: --budgets 4,x": ("path_trees_offline", ["--heads", str(PATH_HEADS), "--prompts",
                                                                 str(CHAT_PROMPTS), *NO_MODEL, "--budgets", "4,x"],
                                          "--budgets '4,x' is not a comma-separated list"),
    "path_trees_offline: --supersets y": ("path_trees_offline", ["--heads", str(PATH_HEADS), "--prompts",
                                                                 str(CHAT_PROMPTS), *NO_MODEL, "--supersets", "y"],
                                          "--supersets 'y' is not a comma-separated list"),
    "path_trees_offline: --beam 0": ("path_trees_offline", ["--heads", str(PATH_HEADS), "--prompts", str(CHAT_PROMPTS),
                                                            *NO_MODEL, "--beam", "0"], "--beam must be at least 1"),
    "path_trees_offline: --json a directory": ("path_trees_offline", ["--heads", str(PATH_HEADS), "--prompts",
                                                                      str(CHAT_PROMPTS), *NO_MODEL, "--json", "{tmp}"],
                                               "--json {tmp} is a directory"),
    "path_trees_offline: Medusa's heads": ("path_trees_offline", ["--heads", str(M1_HEADS), "--prompts",
                                                                  str(CHAT_PROMPTS), *NO_MODEL],
                                           f"--heads {M1_HEADS} holds heads that do not read their path"),
    "dynamic_trees_offline: --eval FILE:x": ("dynamic_trees_offline", ["--heads", str(M1_HEADS), "--eval",
                                                                       f"{CHAT_PROMPTS}:x", "--validate", "1"],
                                             f"--eval '{CHAT_PROMPTS}:x' is not FILE or FILE:N"),
    "dynamic_trees_offline: --tune FILE:x": ("dynamic_trees_offline", ["--heads", str(M1_HEADS), "--eval",
                                                                       str(CHAT_PROMPTS), "--tune",
                                                                       f"{CHAT_PROMPTS}:x"],
                                             f"--tune '{CHAT_PROMPTS}:x' is not FILE or FILE:N"),
    "dynamic_trees_offline: path-reading heads": ("dynamic_trees_offline", ["--heads", str(PATH_HEADS), "--eval",
                                                                            str(CHAT_PROMPTS), "--validate", "1"],
                                                  f"--heads {PATH_HEADS} reads its path, which this simulator does not "
                                                  f"model (its heads' guesses must not depend on the tree); run python "
                                                  f"-m bench.path_trees_offline"),
    **{f"{module}: an unknown --chat-format": (module, [*argv, "--chat-format", "nope"],
                                                "argument --chat-format: invalid choice: 'nope'")
       for module, argv in (("dynamic_trees", ["--heads", "{tmp}", *NO_MODEL, "--device", "cpu"]),
                            ("dynamic_trees_offline", ["--heads", str(M1_HEADS), "--validate", "1"]),
                            ("path_trees_offline", ["--heads", str(PATH_HEADS), *NO_MODEL]),
                            ("conditioned_heads_probe", ["--train", str(CHAT_PROMPTS), "--eval", str(CHAT_PROMPTS)]),
                            ("feature_draft_probe", ["--train", str(CHAT_PROMPTS), "--eval", str(CHAT_PROMPTS)]))},
    "tree_attention: --out a directory": ("tree_attention", ["--out", "{tmp}"], "--out {tmp} is a directory"),
    "linear: --json a directory": ("linear", ["--json", "{tmp}"], "--json {tmp} is a directory"),
    "step_profile: --prefetch 0,x": ("step_profile", ["--prefetch", "0,x"], "--prefetch '0,x' is not a comma-"),
    "step_profile: --json a directory": ("step_profile", ["--json", "{tmp}"], "--json {tmp} is a directory"),
    "sampling_cost: --budgets x": ("sampling_cost", ["--budgets", "x"], "--budgets 'x' is not a comma-separated"),
    "sampling_cost: --blocks z": ("sampling_cost", ["--blocks", "z"], "--blocks 'z' is not a comma-separated"),
    "sampling_cost: missing --heads": ("sampling_cost", ["--heads", "{tmp}/none"], "--heads {tmp}/none is not a "
                                                                                  "directory"),
    "sampling_cost: --heads without a config": ("sampling_cost", ["--heads", "{tmp}"],
                                                "--heads {tmp} has no readable config.json"),
    "proposal_cost: --supersets y": ("proposal_cost", ["--heads", str(M1_HEADS), "--supersets", "y"],
                                     "--supersets 'y' is not a comma-separated"),
    "proposal_cost: missing --heads": ("proposal_cost", ["--heads", "{tmp}/none"], "--heads {tmp}/none is not a "
                                                                                  "directory"),
    "bench_startup: --follow-ups 0": ("bench_startup", ["--follow-ups", "0"], "--follow-ups must be at least 1, not 0"),
    "bench_startup: a chat's flag for part 1's one-shot runs": (
        "bench_startup", ["--", "--context", "512"], "--context sets how much of a chat is kept; pass it with "
                                                     "--interactive, or drop it."),
    "ab_steps: --reps 0": ("ab_steps", ["run", ".", "--reps", "0"], "--reps must be at least 1, not 0"),
    "ab_steps: --rounds 0": ("ab_steps", ["run", ".", "--rounds", "0"], "--rounds must be at least 1, not 0"),
    "ab_steps: an unknown --shape": ("ab_steps", ["run", ".", "--shape", "8b"], "argument --shape: invalid choice"),
    "ab_steps: an unknown --tree": ("ab_steps", ["run", ".", "--tree", "nope"], "argument --tree: invalid choice"),
    "body_chunks: an unknown --chunks": ("body_chunks", [".", "--chunks", "4x"],
                                         "--chunks '4x' is not COUNT, COUNT:MAX_TILES or shipped"),
    "body_chunks: --reps 0": ("body_chunks", [".", "--reps", "0"], "--reps must be at least 1, not 0"),
    "body_chunks: an unknown --shape": ("body_chunks", [".", "--shape", "8b"], "argument --shape: invalid choice"),
    "prefill_memory: --lengths 64,x": ("prefill_memory", ["--lengths", "64,x"],
                                       "--lengths '64,x' is not a comma-separated list of token counts"),
    "prefill_memory: --json a directory": ("prefill_memory", ["--json", "{tmp}"], "--json {tmp} is a directory"),
}


def exit_status(main, argv) -> int:
    """main(argv)'s status, whether returned or raised (argparse's own errors exit)."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


@pytest.mark.parametrize("name", BAD_FLAGS)
def test_bad_flags_are_one_error_line_before_anything_slow(name, tmp_path, capsys):
    import importlib
    module, argv, expected = BAD_FLAGS[name]
    argv = [a.format(tmp=tmp_path) for a in argv]
    status = exit_status(importlib.import_module(f"bench.{module}").main, argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert status == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and errors[0].startswith(f"error: {expected.format(tmp=tmp_path)}"), err


def test_sampling_cost_needs_the_heads_rank_accuracies(tmp_path, capsys):
    from bench import sampling_cost
    (tmp_path / "config.json").write_text(json.dumps({"medusa_num_heads": 2}))
    assert sampling_cost.main(["--heads", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'config.json'} has no rank_accuracy; measure it with "
                                       f"python -m nanomedusa.tree_tuning --heads {tmp_path} --data ANSWERS.jsonl "
                                       f"--write, or pass other --heads.\n")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a GPU")
@pytest.mark.parametrize("module", ["step_profile", "sampling_cost", "tree_attention", "linear", "prefill_memory"])
def test_gpu_benchmarks_refuse_a_cpu_in_one_line(module, capsys):
    import importlib
    assert importlib.import_module(f"bench.{module}").main([]) == 2
    assert capsys.readouterr().err.startswith(f"error: bench.{module} times CUDA kernels; run it on a GPU machine")


@pytest.mark.skipif(torch.cuda.is_available(), reason="every worker must fail: --device cuda without a GPU")
def test_ab_steps_fails_when_no_version_was_measured(capsys):
    from bench import ab_steps
    with pytest.raises(SystemExit, match="no version's steps were measured"):
        ab_steps.main(["run", str(ab_steps.REPO), "--device", "cuda", "--shape", "smollm2-135m", "--layers", "1",
                       "--prefix", "4", "--rounds", "1", "--reps", "1"])
    assert "| failed" in capsys.readouterr().out


def test_ab_steps_modes_are_described_by_name_and_export_goes_to_the_repository(tmp_path, monkeypatch, capsys):
    from bench import ab_steps
    monkeypatch.chdir(tmp_path)  # not the repository: ab/ is still the repository's
    assert ab_steps.parse_args(["export", "main"]).dir == ab_steps.REPO / "ab"
    assert list(ab_steps.MODES) == ["exact-pdl", "exact", "cublas"]  # the default first; none named "default"
    assert ab_steps.parse_args(["run", "."]).mode == "exact-pdl"
    with pytest.raises(SystemExit):
        ab_steps.parse_args(["run", ".", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("exact-pdl (the default): the row-invariant kernels (--exact) with programmatic dependent launch; exact: "
            "the same kernels with ordinary launches; cublas: cuBLAS") in text


def test_default_outputs_leave_the_tracked_records_alone():
    from bench import decode, linear, linear_tma
    args = decode.parse_args([])
    work = REPO / "work"
    for path in (args.json, args.step_times, Path(linear.DEFAULT_JSON), Path(linear_tma.DEFAULT_JSON)):
        assert work in path.parents, path
    assert "/work/" in (REPO / ".gitignore").read_text().splitlines()


def test_num_prompts_is_per_file(tmp_path):
    from bench.prompts import chat_prompts
    for name in "ab":
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"id": f"{name}{i}", "prompt": "hi"}) + "\n"
                                                        for i in range(3)))

    class Tokenizer:
        def encode_chat(self, messages):
            return [1]

    prompts = chat_prompts(Tokenizer(), [tmp_path / "a.jsonl", tmp_path / "b.jsonl"], 2)
    assert [p.id for p in prompts] == ["a0", "a1", "b0", "b1"]


def test_dynamic_trees_decodes_the_prompts_in_chat_format(tmp_path, monkeypatch):
    # The heads are measured on prompts of the format they were trained on: --chat-format reaches the ids decoded.
    from bench import dynamic_trees
    from bench.prompts import chat_prompts
    from nanomedusa.tokenizer import Tokenizer

    make_chat_checkpoint(tmp_path / "model", seed=1)
    save_random_heads(load_model(tmp_path / "model", "cpu", "float32")[0], tmp_path / "heads", num_heads=2, seed=1)
    fed = []

    def decoded(tokenizer, *args):  # the prompts the tool would decode; then stop, before any decoding
        fed.append([p.ids for p in chat_prompts(tokenizer, *args)])
        raise NanoMedusaError("enough")

    monkeypatch.setattr(dynamic_trees, "chat_prompts", decoded)
    argv = ["--model", str(tmp_path / "model"), "--heads", str(tmp_path / "heads"), "--prompts", str(CHAT_PROMPTS),
            "--num-prompts", "1", "--device", "cpu", "--dtype", "float32", "--json", str(tmp_path / "d.json")]
    for chat_format in ("auto", "plain"):
        assert dynamic_trees.main([*argv, "--chat-format", chat_format]) == 2
    want = [[p.ids for p in chat_prompts(Tokenizer.from_dir(tmp_path / "model", preset), CHAT_PROMPTS, 1)]
            for preset in ("auto", "plain")]
    assert fed == want and want[0] != want[1]


def test_the_six_prompt_sets_are_their_sets_subsets():
    def lines(name):
        return [line for line in (REPO / "bench" / name).read_text().split("\n") if line]

    assert lines("prompts-chat-heldout-6.jsonl") == lines("prompts-chat-heldout.jsonl")[::8]
    assert lines("prompts-train-mix-6.jsonl") == lines("prompts-train-mix.jsonl")[::3][:6]


def test_bench_startup_help_is_its_whole_docstring(capsys):
    from bench import bench_startup
    with pytest.raises(SystemExit) as stop:
        bench_startup.main(["--help"])
    assert stop.value.code == 0
    assert "Arguments after `--` go to generate.py in both parts" in capsys.readouterr().out


def test_bench_startup_chat_uses_the_kernels_generate_py_would(tmp_path):
    import kernels
    from bench import bench_startup
    make_chat_checkpoint(tmp_path / "model", seed=1, max_position_embeddings=512)
    save_random_heads(load_model(tmp_path / "model", "cpu", "float32")[0], tmp_path / "heads", num_heads=2, seed=1)
    kernels.set_backend("auto")
    args = bench_startup.parse_args(["--max-new-tokens", "2", "--", "--model", str(tmp_path / "model"), "--device",
                                     "cpu", "--kernels", "torch", "--medusa", str(tmp_path / "heads")])
    with contextlib.redirect_stdout(io.StringIO()):
        timings = bench_startup.follow_up_latencies(bench_startup.chat_args(args), 0, 1)
    assert len(timings) == 1 and kernels.get_backend() == "torch"


def test_compile_check_help_does_not_run_the_check(capsys):
    from kernels import compile_check
    with pytest.raises(SystemExit) as stop:
        compile_check.main(["--help"])
    assert stop.value.code == 0
    assert "Compile the intricate Triton kernels for a Hopper GPU" in capsys.readouterr().out
