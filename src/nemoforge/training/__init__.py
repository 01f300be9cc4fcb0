"""The training layer shared by distill and cpt.

``loop``: :func:`~nemoforge.training.loop.train` (AdamW, warmup + cosine, clipping, checkpoint/resume);
``losses``: GKD (hidden cosine + KL) and causal-LM cross-entropy; ``evaluate``: held-out CE/perplexity
and KL to a teacher; ``stage``: a training stage's body around the loop (store I/O, export, report);
``runtime``: compute device and progress-bar switch; ``distributed``: the same loop on N torchrun ranks (DDP or
DeepSpeed ZeRO-3, rank-sharded batches, rank-0 consolidated checkpoints).
"""
