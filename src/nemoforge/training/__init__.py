"""The training layer shared by distill, cpt, sft and rl: it knows models and data, never a stage.

``loop``: :func:`~nemoforge.training.loop.train` (AdamW, warmup + cosine, clipping, checkpoint/resume);
``losses``: GKD (hidden cosine + KL) and causal-LM cross-entropy; ``evaluate``: held-out CE/perplexity
and KL to a teacher; ``distributed``: the same loop on N torchrun ranks (DDP or DeepSpeed ZeRO-3, rank-sharded
batches, rank-0 consolidated checkpoints). A training stage's body around the loop (store I/O, export, report)
is :mod:`nemoforge.stages.training`; the compute device and the progress-bar switch are :mod:`nemoforge.runtime`.
"""
