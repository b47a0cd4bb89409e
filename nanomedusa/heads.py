"""Medusa heads: K small networks on the base model's last hidden state, each guessing a future token.

With the base model's next token at position t+1, head k (0-based) predicts the token at t+k+2.
Each head is `num_layers` ResBlocks (x + SiLU(Wx + b)) and then a vocabulary projection:

    hidden [N, dim] --ResBlock x L--> [N, dim] --vocab proj--> logits [N, vocab]

The ResBlocks start at zero, and each vocab projection starts as a copy of the base lm_head, so an
untrained head guesses what the base model would say next (a reasonable start for training).

`shared_lm_head=True` keeps no vocab projection of its own and reuses the base lm_head: K times
fewer parameters (for a 49k-vocab, 576-wide model: 0.3M per head instead of 28.6M), at the cost of
capacity, since each head can then only reshape the hidden state.

Heads that read their path (`reads_path`, `train.py --reads-path`): head k also reads the tokens between
h_t and its target, t+1 .. t+k+1 (the root, then the tree's own guesses above the node it extends):

    x = hidden + P_k [e(x_{t+1}); ..; e(x_{t+k+1})]      e = the base model's token embedding, P_k [dim, (k+1) dim]

so a tree node's children depend on the node's own token, not only on its depth and rank (path_tree.py
proposes such trees depth by depth). Medusa's heads cannot tell "Paris" from "London" at depth 1 when they
guess depth 2; these can. P_k starts at zero: such heads start as the plain heads they extend.

Checkpoints are a directory with `config.json` and `medusa_lm_head.safetensors`, with the tensor
names the reference implementation's training writes (FasterDecoding/Medusa: `{i}.{j}.linear.weight`
/ `.bias` for ResBlock j of head i, `{i}.{L}.weight` for its vocab projection), which TensorRT-LLM and
TGI read too. Published checkpoints (`medusa_lm_head.safetensors` or `.pt`) load as they are, in that
spelling or with the `medusa_head.` prefix of the reference's whole-model state dicts (this project's
first heads, the shipped ones among them, were saved so). Our config.json may add
`medusa_choices` (the tree the heads run with), `rank_accuracy` (their held-out rank accuracies, both from
tree_tuning.py), `medusa_temperatures` (one per head, from calibration.py; 1.0 when absent) and
`reads_path` (with P_k stored as `medusa_path.{k}.weight`; the reference implementation has no such heads), and
`held_out` (the `eval_fraction`, `seed`, `chat_format` and `split` of the split train.py held out: tree tuning and
calibration split alike by default and say when theirs differs).
Heads from joint training (Medusa-2) may also ship a LoRA adapter for the backbone (adapter.py):
`load_heads_and_adapter` loads such heads for a model and merges it in.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kernels.medusa_heads import MAX_TOPK, medusa_topk

from .adapter import apply_adapter, has_adapter
from .errors import NanoMedusaError
from .files import read_utf8, write_atomically, write_text_atomically
from .loading import same_checkpoint
from .tree import PRESETS, parse_tree

WEIGHT_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")


@dataclass
class HeadsConfig:
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    shared_lm_head: bool = False
    base_model: str = ""
    medusa_choices: list | None = None  # the tree these heads were tuned for, if any
    lora: dict | None = None  # {"rank", "alpha"} of a backbone adapter shipped beside them (adapter.py)
    rank_accuracy: list | None = None  # [K][topk] share of head k's rank-i guesses that were right (tree_tuning.py)
    medusa_temperatures: list | None = None  # [K] head k's probabilities are softmax(logits / T_k) (calibration.py)
    reads_path: bool = False  # head k also reads the embeddings of tokens t+1 .. t+k+1 (module docstring)
    # how train.py split and rendered their data ({"eval_fraction", "seed", "chat_format", "split"}): tree tuning and
    # calibration must measure on the same held-out conversations (training/data.py `held_out_split_notes`)
    held_out: dict | None = None

    def __post_init__(self):
        # (load() checks a config.json's values first, naming the file; this catches heads built in code)
        for name, value, least in (("num_heads", self.num_heads, 1), ("num_layers", self.num_layers, 0)):
            if type(value) is not int or value < least:
                raise NanoMedusaError(f"Medusa heads need {name} to be a whole number of at least {least}, not "
                                      f"{value!r}.")
        temperatures = self.medusa_temperatures
        if temperatures is not None and (len(temperatures) != self.num_heads or not all(t > 0 for t in temperatures)):
            raise NanoMedusaError(f"medusa_temperatures must be {self.num_heads} positive numbers, one per head, not "
                                  f"{temperatures!r}; fit them with python -m nanomedusa.calibration.")

    def rank_accuracies(self) -> list[list[float]]:
        """[K][topk] the measured rank accuracies (tree_tuning.py --write stores them), else a generic decay."""
        K = self.num_heads
        return (self.rank_accuracy or [])[:K] or [[0.6 ** (k + 1) * 0.5 ** i for i in range(10)] for k in range(K)]

    def temperatures(self) -> list[float]:
        """One temperature per head: the fitted ones, else 1.0 (uncalibrated)."""
        return self.medusa_temperatures or [1.0] * self.num_heads

    def to_json(self) -> dict:
        # Reference field names first, so the reference implementation reads our configs too.
        return {"medusa_num_heads": self.num_heads, "medusa_num_layers": self.num_layers,
                "base_model_name_or_path": self.base_model, **asdict(self)}


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)  # x + SiLU(0) = x: the block starts as the identity
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + F.silu(self.linear(x))


_STACK_SERIALS = itertools.count()  # numbers each set of stacked copies of heads' weights (copies_serial)


def _same_layout(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None and b is None or (a is not None and b is not None and
                                       (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device))


class MedusaHeads(nn.Module):
    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        D, V = config.hidden_size, config.vocab_size

        def head():
            vocab = [] if config.shared_lm_head else [nn.Linear(D, V, bias=False)]
            return nn.Sequential(*[ResBlock(D) for _ in range(config.num_layers)], *vocab)

        self.medusa_head = nn.ModuleList(head() for _ in range(config.num_heads))
        self.medusa_path = None
        if config.reads_path:
            self.medusa_path = nn.ModuleList(nn.Linear((k + 1) * D, D, bias=False) for k in range(config.num_heads))
            for proj in self.medusa_path:
                nn.init.zeros_(proj.weight)  # the heads start as the plain heads they extend
        self._stacked = None  # inference copies of the weights, stacked per head for the fused kernel
        self._stacked_key = None  # the weights_key they were copied at
        self._stacked_serial = None  # see copies_serial
        self.register_load_state_dict_post_hook(MedusaHeads._weights_loaded)
        self._temperatures = None  # (key, tensor [K] float32), key = (device, temperatures): see `_temperature_tensor`

    @classmethod
    def from_base(cls, model, num_heads=4, num_layers=1, shared_lm_head=False, base_model="", reads_path=False):
        """Fresh heads for `model`: zero ResBlocks, vocab projections copied from its lm_head."""
        c = model.config
        heads = cls(HeadsConfig(num_heads, num_layers, c.dim, c.vocab_size, shared_lm_head, base_model,
                                reads_path=reads_path))
        heads.to(device=model.device, dtype=model.dtype)
        if not shared_lm_head:
            with torch.no_grad():
                for head in heads.medusa_head:
                    head[-1].weight.copy_(model.lm_head.weight)
        return heads

    def with_path_reading(self) -> "MedusaHeads":
        """These heads, made to read their path (`reads_path`) with P_k = 0: they guess as before until trained."""
        if self.medusa_path is None:
            p = next(self.parameters(), None)  # (heads without ResBlocks sharing the lm_head hold none)
            grown = MedusaHeads(replace(self.config, reads_path=True))
            grown = grown if p is None else grown.to(device=p.device, dtype=p.dtype)
            grown.medusa_head.load_state_dict(self.medusa_head.state_dict())
            return grown.train(self.training)
        return self

    def head_input(self, k: int, hidden, path=None):
        """hidden [..., dim], path [..., >= k+1, dim] (embeddings of tokens t+1.., see `path_ids`) -> what head k
        reads [..., dim]: hidden itself, or for heads that read their path hidden + P_k [path_0; ..; path_k]."""
        if self.medusa_path is None:
            return hidden
        if path is None:
            raise NanoMedusaError("these heads read the tokens before their target (reads_path); pass their "
                                  "embeddings as path.")
        return hidden + self.medusa_path[k](path[..., : k + 1, :].flatten(-2))

    def head_logits(self, k: int, hidden, lm_head_weight=None, path=None):
        """hidden [..., dim] (path [..., K, dim] for heads that read it) -> head k's logits [..., vocab] (float32)."""
        return self.logits_of_input(k, self.head_input(k, hidden, path), lm_head_weight)

    def logits_of_input(self, k: int, x, lm_head_weight=None):
        """Head k on what it reads, x [..., dim] (`head_input`'s) -> its logits [..., vocab] (float32)."""
        self._check_lm_head(lm_head_weight)
        x = self.medusa_head[k][: self.config.num_layers](x)
        vocab = lm_head_weight if self.config.shared_lm_head else self.medusa_head[k][-1].weight
        return F.linear(x, vocab).float()

    def forward(self, hidden, lm_head_weight=None, path=None):
        """hidden [..., dim] (path [..., K, dim] for heads that read it) -> logits [K, ..., vocab] (float32);
        differentiable, used for training."""
        return torch.stack([self.head_logits(k, hidden, lm_head_weight, path) for k in range(self.config.num_heads)])

    def _check_lm_head(self, lm_head_weight) -> None:
        if self.config.shared_lm_head and lm_head_weight is None:
            raise NanoMedusaError("these heads share the base model's lm_head (shared_lm_head): pass its weight, "
                                  "model.lm_head.weight, as lm_head_weight.")

    def weights_key(self) -> tuple:
        """Changes when a weight is written in place, as an optimizer step writes it (each in-place write bumps a
        tensor's version), or replaced (.to() moves it). Weights made under torch.inference_mode keep no version;
        load_state_dict on the heads, the way to change those, marks the copies below stale itself
        (`_weights_loaded`). Writes through `.data` (`p.data.copy_(...)`) bump no version either: change weights
        with load_state_dict, or in place under torch.no_grad(), for the kernels to see them."""
        return tuple((p.data_ptr(), None if p.is_inference() else p._version) for p in self.parameters())

    def stacked_weights(self, lm_head_weight=None):
        """(res_weight [K, L, D, D], res_bias [K, L, D], vocab [K, V, D] or shared [V, D]) for the kernels: copies
        made once and refreshed in place when the weights change (`weights_key`), so that a CUDA graph captured
        on them reads the new weights; made anew (with a new `copies_serial`) when the weights' dtype or device
        changed."""
        self._check_lm_head(lm_head_weight)
        key = self.weights_key()
        if not key and lm_head_weight is not None:  # no parameters: zero-size copies made like the lm_head
            key = (lm_head_weight.dtype, lm_head_weight.device)
        if self._stacked is None or self._stacked_key != key:
            fresh = self._stack(lm_head_weight)
            if self._stacked is not None and all(_same_layout(old, new) for old, new in zip(self._stacked, fresh)):
                with torch.inference_mode():  # (copies made while decoding are inference tensors)
                    for old, new in zip(self._stacked, fresh):
                        if old is not None:
                            old.copy_(new)
            else:
                self._stacked, self._stacked_serial = fresh, next(_STACK_SERIALS)
            self._stacked_key = key
        w, b, vocab = self._stacked
        return w, b, lm_head_weight if vocab is None else vocab

    def copies_serial(self, lm_head_weight=None) -> int:
        """The number of the stacked copies the kernels read (made now if need be), which no other copies ever
        had: the decoder's CUDA graphs over these heads read those copies' memory, so it keys them."""
        self.stacked_weights(lm_head_weight)
        return self._stacked_serial

    def _stack(self, lm_head_weight) -> tuple:
        L, D = self.config.num_layers, self.config.hidden_size
        p = next(self.parameters(), lm_head_weight)
        with torch.no_grad():
            if L:
                w = torch.stack([torch.stack([h[j].linear.weight for j in range(L)]) for h in self.medusa_head])
                b = torch.stack([torch.stack([h[j].linear.bias for j in range(L)]) for h in self.medusa_head])
            else:
                w = p.new_zeros(self.config.num_heads, 0, D, D)
                b = p.new_zeros(self.config.num_heads, 0, D)
            vocab = None if self.config.shared_lm_head else torch.stack([h[-1].weight for h in self.medusa_head])
        return w, b, vocab

    @staticmethod
    def _weights_loaded(module, incompatible_keys) -> None:
        module._stacked_key = None  # refresh the copies, even of weights that keep no version

    @torch.no_grad()
    def topk(self, hidden, topk: int, lm_head_weight=None):
        """hidden [N, dim] -> each head's top-k token ids [K, N, topk] (fused kernel on CUDA)."""
        self._check_reads_hidden_only()
        return medusa_topk(hidden, *self.stacked_weights(lm_head_weight), topk)

    @torch.no_grad()
    def head_topk(self, k: int, x, topk: int, lm_head_weight=None, logprobs: bool = False):
        """Head k alone on its inputs x [N, dim] (`head_input`'s) -> its top-k ids [N, topk] (and, with logprobs,
        their calibrated log-probabilities [N, topk] float32): the fused kernel on one head's weights."""
        w, b, vocab = self.stacked_weights(lm_head_weight)
        vocab = vocab if vocab.dim() == 2 else vocab[k: k + 1]
        if not logprobs:
            return medusa_topk(x, w[k: k + 1], b[k: k + 1], vocab, topk)[0]
        ids, lps = medusa_topk(x, w[k: k + 1], b[k: k + 1], vocab, topk, self._temperature_tensor(x.device)[k: k + 1])
        return ids[0], lps[0]

    def _check_reads_hidden_only(self) -> None:
        """All heads at once on h_t alone is what Medusa's heads do; heads that read their path cannot guess so."""
        if self.medusa_path is not None:
            raise NanoMedusaError("these heads read the tokens before their target (reads_path): their guesses "
                                  "depend on the tree's path; propose with nanomedusa.path_tree, depth by depth.")

    def _temperature_tensor(self, device) -> torch.Tensor:
        """The heads' temperatures [K] float32 on `device`, made on the first call: a step's eager warm-up runs
        before its CUDA graph is captured, which then reads this tensor."""
        key = (device, tuple(self.config.temperatures()))
        if self._temperatures is None or self._temperatures[0] != key:
            self._temperatures = key, torch.tensor(key[1], dtype=torch.float32, device=device)  # [K]
        return self._temperatures[1]

    @torch.no_grad()
    def topk_logprobs(self, hidden, topk: int, lm_head_weight=None):
        """hidden [N, dim] -> each head's top-k token ids [K, N, topk] and their calibrated log-probabilities
        [K, N, topk] float32, log softmax(logits / T) with T the head's temperature (best first; dynamic_tree.py
        scores its nodes with them). On CUDA the fused kernel gathers each row's log-partition in the same
        pass as its top-k, without making the [K, N, vocab] logits."""
        self._check_reads_hidden_only()
        return medusa_topk(hidden, *self.stacked_weights(lm_head_weight), topk,
                           self._temperature_tensor(hidden.device))

    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.medusa_head.state_dict().items()}
        if self.medusa_path is not None:
            state |= {f"medusa_path.{k}": v.detach().contiguous() for k, v in self.medusa_path.state_dict().items()}
        # Each file replaced whole: a run killed mid-save (training saves every --save-every steps) keeps the last
        # heads.
        write_atomically(out_dir / WEIGHT_FILES[0], lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        write_text_atomically(out_dir / "config.json", json.dumps(self.config.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, model_config, device=None, dtype=None) -> "MedusaHeads":
        """Load our checkpoints or the reference implementation's, checked against the base model."""
        path = Path(path)
        if not path.is_dir():
            raise NanoMedusaError(f"Medusa heads directory {path} does not exist; pass the directory that holds "
                                  f"config.json and medusa_lm_head.safetensors to --medusa.")
        raw = read_heads_config(path)
        weights_file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weights_file is None:
            raise NanoMedusaError(f"{path} has none of {', '.join(WEIGHT_FILES)}, so it is not a Medusa heads "
                                  f"checkpoint; pass the directory that holds the heads' weights file.")
        state = _read_weights(weights_file)
        path_state = {k.removeprefix("medusa_path."): state.pop(k) for k in list(state) if k.startswith("medusa_path.")}
        if raw.get("reads_path") and not path_state:
            raise NanoMedusaError(f"{path}/config.json says reads_path but {weights_file.name} has no medusa_path "
                                  f"tensors; re-export the heads, or set reads_path to false.")
        num_heads = raw.get("medusa_num_heads", raw.get("num_heads"))
        num_layers = raw.get("medusa_num_layers", raw.get("num_layers", 1))
        if num_heads is None:
            raise NanoMedusaError(f"{path}/config.json lacks medusa_num_heads; add it (the number of heads).")
        for name, value, minimum in (("medusa_num_heads", num_heads, 1), ("medusa_num_layers", num_layers, 0)):
            if type(value) is not int or value < minimum:
                raise NanoMedusaError(f"{path}/config.json's {name} is {value!r}; it must be an integer of at least "
                                      f"{minimum}: fix the config.")
        # (the reference's configs do not say shared_lm_head; ours do, so a file emptied by accident still fails)
        weightless = num_layers == 0 and raw.get("shared_lm_head") is not False
        num_heads = _heads_in_file(state, num_heads, weightless, path, weights_file)
        # The reference's configs do not say whether the vocab projection is shared: the tensors do.
        shared = f"{num_layers}.weight" not in {k.split(".", 1)[1] for k in state if k.startswith("0.")}
        if num_layers and "0.0.linear.weight" not in state:
            raise NanoMedusaError(f"{weights_file} has no ResBlock 0.0.linear.weight but config.json says "
                                  f"medusa_num_layers {num_layers}; fix medusa_num_layers.")
        if num_layers and state["0.0.linear.weight"].dim() != 2:
            shape = list(state["0.0.linear.weight"].shape)
            raise NanoMedusaError(f"{weights_file}'s 0.0.linear.weight has shape {shape}, not [hidden, hidden]; "
                                  f"re-download or re-train the heads.")
        # [hidden, hidden] ResBlocks, else the [vocab, hidden] projection, else (the lm_head's) the model's own
        hidden = (state["0.0.linear.weight"].shape[1] if num_layers else
                  model_config.dim if shared else state["0.0.weight"].shape[-1])
        config = HeadsConfig(num_heads, num_layers, hidden, model_config.vocab_size, shared,
                             raw.get("base_model_name_or_path", ""), _medusa_choices(raw, path), raw.get("lora"),
                             _rank_accuracy(raw, num_heads, path), _temperatures(raw, num_heads, path),
                             bool(path_state), held_out_record(raw))
        if hidden != model_config.dim:
            raise NanoMedusaError(f"the heads in {path} expect hidden size {hidden} but the model has "
                                  f"{model_config.dim}; use heads trained for this model.")
        if not shared and state[f"0.{num_layers}.weight"].shape[0] != model_config.vocab_size:
            raise NanoMedusaError(f"the heads in {path} predict {state[f'0.{num_layers}.weight'].shape[0]} tokens but "
                                  f"the model's vocabulary has {model_config.vocab_size}; use heads trained for this "
                                  f"model.")
        heads = cls(config)
        try:
            heads.medusa_head.load_state_dict(state, strict=True)
            if path_state:
                heads.medusa_path.load_state_dict(path_state, strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise NanoMedusaError(f"the tensors in {weights_file} do not match its config.json ({first}); "
                                  f"fix medusa_num_heads/medusa_num_layers.") from None
        return heads.to(device=device, dtype=dtype).eval()


def path_ids(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """tokens [B, T] -> [B, T, K]: at t, the tokens t+1 .. t+K (0 past the end), the path that heads which read it
    see at position t when every guess above their target is right (training, tuning and calibration)."""
    B, T = tokens.shape
    padded = torch.cat([tokens, tokens.new_zeros(B, num_heads)], dim=1)  # [B, T + K]
    return torch.stack([padded[:, j + 1: j + 1 + T] for j in range(num_heads)], dim=-1)


def load_heads_and_adapter(heads_dir: str | Path, model, say: Callable[[str], object] = print) -> MedusaHeads:
    """The heads in HEADS_DIR for `model` (on its device, in its dtype), with the LoRA adapter shipped beside
    them, if any, merged into `model`'s weights in place: Medusa-2 heads read the backbone they were trained
    with, the base model plus that adapter. `say` gets the adapter's one-line description."""
    heads = MedusaHeads.load(heads_dir, model.config, device=model.device, dtype=model.dtype)
    if has_adapter(heads_dir):
        say(apply_adapter(model, heads_dir))
    return heads


def read_heads_config(path: Path) -> dict:
    """The heads' config.json as it is on disk (MedusaHeads.load checks its values)."""
    try:
        raw = json.loads(read_utf8(path / "config.json"))
        if not isinstance(raw, dict):
            raise ValueError
    except (OSError, ValueError):  # ValueError: not JSON, or not a JSON object (read_utf8 names a non-UTF-8 byte)
        raise NanoMedusaError(f"{path}/config.json is missing or not a JSON object; a Medusa heads directory "
                              f"needs one with medusa_num_heads and medusa_num_layers.") from None
    return raw


def recorded_held_out(heads_dir: str | Path) -> dict | None:
    """How train.py split the heads' data (their config's held_out), read before the heads themselves load: training
    that continues from them splits its data alike (training/data.py `held_out_split`)."""
    return held_out_record(read_heads_config(Path(heads_dir)))


def held_out_record(raw: dict) -> dict | None:
    """The held_out record of a heads' config.json as read (`read_heads_config`), if it has one."""
    return raw.get("held_out") if isinstance(raw.get("held_out"), dict) else None


def base_model_note(heads_dir: str | Path, base_model: str, ckpt_dir: str | Path) -> str | None:
    """A note when the heads name, as the model they were trained on, a local checkpoint other than the one loaded
    (after full joint training: train.py's OUT/model, which must be served with them). Heads read their own model's
    hidden states, so on another they guess worse: greedy and lossless decoding keep their text, only slower. A base
    model that is no local checkpoint (a hub id, a label) is not compared: a name cannot tell two models apart."""
    base = Path(base_model) if base_model else None
    if base is None or not (base / "config.json").is_file() or same_checkpoint(base, ckpt_dir):
        return None
    return (f"the heads in {heads_dir} were trained on the model in {base}, and this run loads {ckpt_dir}; on a model "
            f"other than their own they guess worse (decoding is slower): pass --model {base}")


def _heads_in_file(state: dict[str, torch.Tensor], configured: int, weightless: bool, path: Path,
                   weights_file: Path) -> int:
    """How many heads the weights hold, which wins over config.json: some published reference checkpoints
    disagree with their own config (Vicuna-7B's says 2 heads, its file holds 4). Heads without ResBlocks that
    share the lm_head (`weightless`) hold no tensors at all: config.json alone counts them."""
    heads = {key.split(".", 1)[0] for key in state}
    # A stray tensor or a missing head is a damaged file, not a config.json the user could fix.
    if stray := sorted(key for key in state if not key.split(".", 1)[0].isdigit()):
        raise NanoMedusaError(f"{weights_file}'s tensor {stray[0]} belongs to no head (names start with the head's "
                              f"number); re-download or re-train the heads.")
    held = max((int(k) + 1 for k in heads), default=0)
    if missing := sorted(set(range(held)) - {int(k) for k in heads}):
        raise NanoMedusaError(f"{weights_file} has no tensors of head {missing[0]} (it has heads up to {held - 1}); "
                              f"re-download or re-train the heads.")
    tensors = [{key.split(".", 1)[-1] for key in state if key.split(".", 1)[0] == str(k)} for k in range(held)]
    if any(t != tensors[0] for t in tensors):
        k = next(k for k, t in enumerate(tensors) if t != tensors[0])
        odd = sorted(tensors[0] ^ tensors[k])[0]
        raise NanoMedusaError(f"{weights_file}'s heads 0 and {k} hold different tensors ({odd} is in one only); "
                              f"re-download or re-train the heads.")
    if held == 0 and weightless:
        return configured
    if held == 0:
        raise NanoMedusaError(f"{weights_file} holds no tensors; re-download or re-train the heads.")
    if held != configured:
        print(f"[note] {path}/config.json says medusa_num_heads {configured} but {weights_file.name} holds {held} "
              f"heads; loading the {held} heads the file holds.", file=sys.stderr)
    return held


def _temperatures(raw: dict, num_heads: int, path: Path) -> list[float] | None:
    """config.json's medusa_temperatures for the heads loaded: the first num_heads of them (tree_tuning.py
    --trim drops the deepest heads from the weights), or None when it has none."""
    temperatures = raw.get("medusa_temperatures")
    if temperatures is None:
        return None
    if (not isinstance(temperatures, list) or len(temperatures) < num_heads
            or not all(type(t) in (int, float) and t > 0 for t in temperatures)):
        raise NanoMedusaError(f"{path}/config.json's medusa_temperatures must be {num_heads} positive numbers, one "
                              f"per head; remove them from config.json, then fit them again with python -m "
                              f"nanomedusa.calibration --write.")
    return [float(t) for t in temperatures[:num_heads]]


def _rank_accuracy(raw: dict, num_heads: int, path: Path) -> list[list[float]] | None:
    """config.json's rank_accuracy for the heads loaded: its first num_heads rows (as `_temperatures`), or None
    when it has none. Each row is one head's share of right guesses per rank, numbers from 0 to 1."""
    rows = raw.get("rank_accuracy")
    if rows is None:
        return None
    if (not isinstance(rows, list) or len(rows) < num_heads
            or not all(isinstance(row, list) and 0 < len(row) <= MAX_TOPK and len(row) == len(rows[0])
                       and all(type(a) in (int, float) and 0 <= a <= 1 for a in row) for row in rows[:num_heads])):
        raise NanoMedusaError(f"{path}/config.json's rank_accuracy must be {num_heads} rows, one per head, of 1 to "
                              f"{MAX_TOPK} numbers from 0 to 1 each, all rows as long; remove it from config.json, "
                              f"then measure it again with python -m nanomedusa.tree_tuning --write.")
    return rows[:num_heads]


def _medusa_choices(raw: dict, path: Path) -> list[list[int]] | None:
    """config.json's medusa_choices (the heads' own tree: a list of paths, or a preset's name) as checked paths,
    or None when it has none (or an empty list)."""
    choices = raw.get("medusa_choices")
    if choices is None or choices == []:
        return None
    fix = (f"give it as a list of paths such as [[0], [0, 0], [1]] or a preset's name ({', '.join(PRESETS)}), or "
           f"remove it")
    if isinstance(choices, str) and choices not in PRESETS:
        raise NanoMedusaError(f"{path}/config.json's medusa_choices {choices!r} is no preset; {fix}.")
    try:
        return parse_tree(choices)
    except NanoMedusaError as e:  # (its advice is --tree's: keep the reason alone)
        reason = str(e).split("; ")[0]
        raise NanoMedusaError(f"{path}/config.json's medusa_choices is not a tree ({reason[0].lower()}{reason[1:]}); "
                              f"{fix}.") from None


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """Tensors keyed `{head}.{layer}....`, whichever of the reference's spellings the file uses."""
    try:
        state = (load_file(str(file)) if file.suffix == ".safetensors"
                 else torch.load(file, map_location="cpu", weights_only=True))
    except Exception as e:
        raise NanoMedusaError(f"{file} could not be read ({e.__class__.__name__}); re-download or re-train the "
                              f"heads.") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise NanoMedusaError(f"{file} does not hold named tensors (a state dict); re-download or re-train the heads.")
    return {k.removeprefix("medusa_head."): v for k, v in state.items()}
