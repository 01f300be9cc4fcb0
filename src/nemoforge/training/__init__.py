"""The training layer shared by distill, cpt, sft and rl: it knows models and data, never a stage.

``loop``: :func:`~nemoforge.training.loop.train`, the one loop (metric window, logging, checkpoint cadence,
resume, progress) over an engine that :func:`~nemoforge.training.loop.parallelize` applies from outside the
model; ``engines``: one process, torch DDP (``zero``: DeepSpeed ZeRO); ``checkpoint``: the ``step-N/`` layout
(safetensors + weights-only ``state.pt``), save/load/resume; ``optim``: AdamW and the warmup + cosine schedule;
``deepspeed_config``: the DeepSpeed config, built from the recipe in one place (the TrainJob uses it);
``distributed``: the torchrun job (ranks, rank-sharded batches, collectives); ``losses``: GKD (hidden cosine +
KL) and causal-LM cross-entropy; ``evaluate``: held-out CE/perplexity and KL to a teacher; ``perf``/``flops``:
activation checkpointing, compile, document masking, MFU. A training stage's body around the loop (store I/O,
export, report) is :mod:`nemoforge.stages.training`; the compute device and the progress-bar switch are
:mod:`nemoforge.runtime`.
"""
