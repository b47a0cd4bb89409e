"""The benchmarks: every number this project reports, the scripts that measure them, and their results.

Run from the repository root (bench/ is a tool of the repository, not part of the installed package):

    python -m bench.decode             end-to-end decoding on a prompt set: our plain decoding, Medusa with each
                                       --heads and --tree, transformers' `generate`; with flags also the step
                                       time against tree size (--tree-sizes), sampling (--sampling) and the
                                       7B-shaped step times (on unless --skip-7b)
    python -m bench.tree_attention     the tree-attention kernel against the torch reference and SDPA, per
                                       layer of 7B and SmolLM2 shapes (--smoke: untimed, on CPU too)
    python -m bench.small_kernels      RMSNorm, acceptance, Medusa top-k and KV compaction against their
                                       references
    python -m bench.linear             the row-invariant linear kernel (--exact) against cuBLAS per matrix of
                                       7B and SmolLM2 shapes at 1, 16 and 64 rows (--sweep: its tile configs;
                                       --sweep-tree: tiles for the tree step with the decode step's bits)
    python -m bench.linear_tma         the linear kernel's tree-step tiles loaded by the TMA against per-thread
                                       loads, per matrix (Hopper)
    python -m bench.step_profile       a 7B-shaped decode and tree step: their times with cuBLAS, with the
                                       row-invariant kernels, with and without programmatic dependent launch,
                                       and each kernel's share of one step
    python -m bench.ab_steps           a code change's A/B: git revisions exported beside the working tree
                                       (`export`), their graphed steps timed in alternation on one machine (`run`)
    python -m bench.ab_decode          the same A/B end to end: bench.decode from each version's code, alternated
    python -m bench.body_chunks        the row-invariant tree attention's body chunking swept on graphed steps,
                                       beside a version of the code without it (an ab_steps export)
    python -m bench.dynamic_trees      static against dynamic trees (--tree dynamic) at equal node budgets:
                                       accepted length, step time, tokens/s, the choice's own time
    python -m bench.dynamic_trees_offline  the same comparison's accepted lengths exactly, by a greedy simulator
                                       on a CPU, and other node-scoring rules (no timing)
    python -m bench.proposal_cost      what a tree's proposal costs a step: static trees against dynamic trees
                                       over supersets of several sizes, and the kernels behind each
    python -m bench.prefill_memory     what the prefill graphs hold on the GPU, one prompt length after another,
                                       and their results against eager prefills
    python -m bench.sampling_cost      what lossless sampling's acceptance costs a step against typical
                                       acceptance, per tree size, and plain sampling's draw against argmax
    python -m bench.conditioned_heads_probe   heads fed the tokens before their target (the root, the tree's
                                       path) against the shipped ones: held-out accuracy, offline (CPU)
    python -m bench.feature_draft_probe  an EAGLE-style draft (one decoder layer over the base model's features)
                                       trained and measured like heads: held-out accuracy per depth (offline)
    python -m bench.path_trees_offline  path-reading heads' static trees against trees grown from their own
                                       guesses (EAGLE-2's expansion) at equal node counts: an exact greedy
                                       simulator (CPU)
    python bench/bench_startup.py      time to the first token of a fresh generate.py, and of a chat's
                                       follow-up turn
    bash bench/gpu_run.sh STAGE        the GPU runs behind the shipped checkpoints and the main tables, one
                                       stage per call (the kernels, the training stages, the tree-size sweep,
                                       the end-to-end benchmark, --exact: its text against plain greedy's and
                                       its cost); RESULTS.md's other sections quote their own commands

The modules, one job each:

    timer.py           the one timer every benchmark uses (median of CUDA-graph replays; why it measures so)
    report.py          progress lines, markdown tables, the run's metadata, the JSON results file (by default under
                       the git-ignored work/bench/, never over the records here)
    checks.py          the flag checks the benchmarks share (comma-separated lists, a GPU, the kind of heads)
    prompts.py         prompt sets: reading one (--num-prompts N: the first N of each file), decoding it with one
                       method, the totals
    checkpoints.py     the --heads checkpoints, the backbone each goes with, their trees
    decode.py          the end-to-end benchmark and the command line of all its parts
    steps.py           its step-time parts: the tree-size sweep and the 7B-shaped steps
    sampling.py        its sampling part
    tree_attention.py, small_kernels.py, linear.py   the kernel benchmarks (their checks: kernels/testing.py)

Results: RESULTS.md (the numbers and what they mean), results-*.json, step-times.json, dynamic-trees-*.json,
path-heads.json, path-trees-offline.json,
tree_attention.json,
linear.{json,txt}, linear-sweep.*, tree_attention-row-invariant.*, exact-*.txt, step-profile.*, bench_*.txt, startup.txt; the prompt sets: prompts-*.jsonl.
"""
