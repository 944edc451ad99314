"""Training: perturbed-prompt batches, CPC-SAM losses, the bi-level trainer, checkpoints, pretraining.

Modules (imported directly; this package file stays empty so that importing one module does not
pull in the others — DVC stages depend on exactly the files they use):

- `losses`: L_seg, Eq. 1 (task), Eq. 2 (entity), Eq. 3 (SAM), IoU-head loss
- `data`: training images/targets from the manifest, prompt providers, seeded batch streams
- `bilevel`: `Trainer` (bilevel | lora-only | full-finetune), checkpoint/resume, NaN stop
- `distributed`: the process group, rank slices and gradient all-reduces of multi-process training
- `recompute`: activation checkpointing of the image encoder (`train.grad_checkpointing`)
- `run`: building a trainer / the embedding cache from params.yaml sections
- `pretrain`: the stand-in SAM pretraining loop
- `embeddings`, `checkpoint`, `config`, `logging` (`MetricLogger`), `errors`
"""
