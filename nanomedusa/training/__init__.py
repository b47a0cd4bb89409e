"""Training Medusa heads: self-distillation, warm-up (Medusa-1) and joint training (Medusa-2).

    data.py        conversation files -> token ids with answer-only labels, batches, the step sampler
    distill.py     the base model answers the prompts (self-distillation data)
    losses.py      shifted targets, per-head cross-entropy, top-1/top-5 counts
    medusa_lm.py   backbone + heads as one module (what DDP/FSDP wrap)
    hidden_cache.py the frozen backbone's hidden states on disk, for warm-up epochs after the first
    lora.py        LoRA adapters for joint training, merged into the weights at export
    distributed.py torchrun process groups, DDP (warm-up) and FSDP (joint)
    checkpoint.py  resumable training state and the exported heads/model directories
    trainer.py     TrainConfig and the training loop

`train.py` at the repository root is the command line for all of it.
"""

from .distill import DistillConfig, distill
from .trainer import TrainConfig, Trainer

__all__ = ["DistillConfig", "distill", "TrainConfig", "Trainer"]
