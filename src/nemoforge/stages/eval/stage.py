"""Child vs parent evaluation (LN §7.1) with 95% confidence intervals, and the promotion-gate decision.

For each model (the child at ``model_uri`` and the parent): math on held-out problems with reasoning
on (``k`` samples at T 0.6 / top-p 0.95, mean pass@1) and reasoning off (greedy pass@1), toggle
compliance in both modes, IFEval prompt- and instruction-level strict accuracy when ``data.ifeval_uri``
is set (:mod:`nemoforge.stages.eval.ifeval`), next-token top-1 accuracy and CE on the corpus's held-out
rows, which no stage trained on (:mod:`nemoforge.stages.eval.heldout`). Decode tokens/s of both at batch 1,
timed round-robin (:mod:`nemoforge.stages.eval.speed`); for the child, the per-token KL(parent || child)
on the held-out reference chats.

Intervals (:mod:`nemoforge.stats`, seeded by the stream ``eval.bootstrap``): every rate ``<m>`` gets
``<m>_ci_low``/``<m>_ci_high``, a Wilson interval clustered by problem (``k`` samples), prompt (IFEval
instructions) or held-out row (tokens), plain Wilson with one trial per cluster; ``lm_loss`` a normal
interval on its clustered standard error; ``retention_<m>`` (child / parent) a paired bootstrap over the
clusters; ``speedup`` (ratio of median tokens/s) a paired bootstrap over timing rounds. The parent's
figures carry ``parent_``. A value that is infinite (a retention over a parent at 0) is left out of the
metrics and shown as ``inf`` in the table.

Written under ``output_uri``: ``comparison.md`` (the side-by-side table), ``report.json`` (metrics,
gate, champion baseline), ``samples/{child,parent}.json``. The stage does not touch the registry: it returns
the gate outcome and the eval-settings digest in its tags, and the runner registers the version and moves
the aliases.

Shape legend: ``P`` problems, ``K`` samples per problem, ``B`` rows, ``T`` tokens, ``V`` vocabulary,
``C`` clusters.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemoforge.artifacts.digests import digest_path
from nemoforge.artifacts.store import ArtifactStore
from nemoforge.artifacts.uris import join_uri
from nemoforge.config import EvalConfig, Recipe
from nemoforge.data.corpus import load_corpus
from nemoforge.data.packing import token_digest
from nemoforge.data.reasoning import (
    ChatSample,
    Reasoning,
    answer_part,
    encode_chat,
    encode_prompt,
    math_problems,
    read_chat_samples,
    toggle_compliant,
)
from nemoforge.data.sft_split import read_sft_split
from nemoforge.engines import (
    GENERATE_TAG,
    INSTALL_HINT,
    Engine,
    VLLMEngine,
    free_memory,
    resolve_engine,
    vllm_importable,
)
from nemoforge.errors import NemoforgeError
from nemoforge.models.generate import left_pad, pad_id
from nemoforge.planning import GPU_MEMORY_UTILIZATION
from nemoforge.rewards import accuracy_reward
from nemoforge.runtime import compute_device, recipe_dtype, seed_for
from nemoforge.stages.chat import generate_chats
from nemoforge.stages.eval.gate import champion_baseline, promotion_gate
from nemoforge.stages.eval.heldout import next_token_scores
from nemoforge.stages.eval.ifeval import (
    IFEvalPrompt,
    follow_strict,
    read_ifeval,
    sample_prompts,
    unavailable_instructions,
)
from nemoforge.stages.eval.speed import DecodeTiming, time_decode_round_robin
from nemoforge.stages.result import DatasetRef, StageResult
from nemoforge.stats import (
    Tally,
    clustered_mean_interval,
    clustered_wilson_interval,
    paired_bootstrap_median_ratio,
    paired_bootstrap_ratio,
    ratio,
)
from nemoforge.training.losses import kl_div_BT

TABLE_METRICS = (
    "math_pass1_on", "math_pass1_off", "toggle_on", "toggle_off", "ifeval_prompt_strict", "ifeval_instruction_strict",
    "lm_top1", "lm_loss", "decode_tokens_per_s", "kl_to_parent",
)


@dataclass(frozen=True)
class Measurement:
    """One model's eval results, kept per cluster (the unit of the intervals).

    Attributes:
        rates: per rate metric (``math_pass1_on``, ``toggle_on``, ``lm_top1``, ...) its :class:`Tally`.
        lm_loss: summed CE (nats) and tokens per held-out row, as a :class:`Tally`; None without a corpus.
        samples: the graded replies (``samples/<model>.json``).
    """

    rates: dict[str, Tally]
    lm_loss: Tally | None
    samples: list[dict[str, Any]]

    def point(self) -> dict[str, float]:
        """The point estimates: each rate, and ``lm_loss`` (nats/token) when measured."""
        return {name: t.rate for name, t in self.rates.items()} | ({"lm_loss": self.lm_loss.rate} if self.lm_loss else {})


def eval_problems(
    recipe: Recipe, store: ArtifactStore, data_uri: str | None
) -> tuple[list[tuple[str, str]], list[ChatSample], str, int]:
    """Held-out ``(question, answer)`` problems, their reference chats (for KL), the source URI, and how many
    problems were dropped because their reference answer does not parse.

    ``data.math_eval_uri`` when set; otherwise the held-out chats of sft's split at ``data_uri`` (sft's ``data``
    output, :mod:`~nemoforge.data.sft_split`).

    Raises:
        NemoforgeError: neither is given (the recipe's validation refuses that earlier), or ``data_uri`` is not
            sft's split.
    """
    n = recipe.eval.num_problems
    if recipe.data.math_eval_uri:
        samples = read_chat_samples(Path(store.fetch(recipe.data.math_eval_uri)), limit=2 * n)
        source = recipe.data.math_eval_uri
    elif data_uri is not None:
        samples = read_sft_split(store, data_uri).heldout
        source = join_uri(data_uri, "heldout.jsonl")
    else:
        raise NemoforgeError(
            "eval has no math problems: set data.math_eval_uri, or enable sft (eval grades its held-out split)"
        )
    problem_set = math_problems(samples)
    problems = problem_set.problems[:n]
    prompts = {q for q, _ in problems}
    chats = [s for s in samples if s.prompt in prompts]
    return problems, chats, source, problem_set.num_unparseable


KL_BATCH = 8
"""Reference chats per forward pass of the KL."""


def _kl_batches(tokenizer: Any, chats: Sequence[ChatSample], device: torch.device):
    rows = [encode_chat(tokenizer, c, 512)[0] for c in chats]
    for start in range(0, len(rows), KL_BATCH):
        ids_BT, mask_BT = (t.to(device) for t in left_pad(rows[start : start + KL_BATCH], pad_id(tokenizer)))
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        yield ids_BT, mask_BT, {"attention_mask": mask_BT, "position_ids": pos_BT, "use_cache": False}


@torch.no_grad()
def save_parent_logprobs(parent: torch.nn.Module, tokenizer: Any, chats: Sequence[ChatSample], out_dir: Path) -> None:
    """The parent's next-token log-probabilities on the reference chats, one fp32 file per batch in ``out_dir``:
    the parent's half of :func:`kl_to_parent`, so that the child loads after the parent is gone."""
    device = next(parent.parameters()).device
    for i, (ids_BT, _, kw) in enumerate(_kl_batches(tokenizer, chats, device)):
        torch.save(torch.log_softmax(parent(ids_BT, **kw).logits.float(), dim=-1).cpu(), out_dir / f"{i}.pt")


@torch.no_grad()
def kl_to_parent(model: torch.nn.Module, tokenizer: Any, chats: Sequence[ChatSample], parent_dir: Path) -> float:
    """Mean per-token KL(p_parent || q_child) over the held-out reference chats (nats/token), against the parent's
    log-probabilities saved by :func:`save_parent_logprobs`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, (ids_BT, mask_BT, kw) in enumerate(_kl_batches(tokenizer, chats, device)):
        parent_logprobs_BTV = torch.load(parent_dir / f"{i}.pt").to(device)
        kl_BT = kl_div_BT(parent_logprobs_BTV, model(ids_BT, **kw).logits)  # log_softmax of log-probs: themselves
        total += float((kl_BT * mask_BT).sum())
        count += int(mask_BT.sum())
    return total / max(count, 1)


Reply = Callable[..., list[str]]
"""``reply(prompts, reasoning, *, n, max_new_tokens, temperature, top_p, seed, desc)``: ``n`` reply texts per
prompt (prompt-major) under the toggle system prompt; temperature 0 is greedy. Built by :func:`decoder_reply`
or :func:`vllm_reply`."""


def decoder_reply(model: torch.nn.Module, tokenizer: Any, batch_size: int) -> Reply:
    """Replies by our KV-cached decoder (:func:`~nemoforge.stages.chat.generate_chats`); sampled calls draw from
    a generator seeded with ``seed``, so every model measured with the same seed gets the same random numbers."""

    def reply(prompts: Sequence[str], reasoning: Reasoning, *, n: int = 1, max_new_tokens: int,
              temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, desc: str | None = None) -> list[str]:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        return generate_chats(
            model, tokenizer, [(p, reasoning) for p in prompts for _ in range(n)], max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, batch_size=batch_size, generator=generator, desc=desc,
        )  # fmt: skip

    return reply


def vllm_reply(engine: VLLMEngine, tokenizer: Any) -> Reply:
    """Replies by a vLLM engine: the same prompt ids and decoding of the new ids as :func:`decoder_reply`, greedy
    at temperature 0; sampled calls pass ``seed`` to vLLM (its own RNG: not the decoder's random numbers)."""

    def reply(prompts: Sequence[str], reasoning: Reasoning, *, n: int = 1, max_new_tokens: int,
              temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, desc: str | None = None) -> list[str]:
        new_ids = engine.generate(
            [encode_prompt(tokenizer, p, reasoning) for p in prompts], n=n, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p if temperature else 1.0, seed=seed if temperature else None,
        )  # fmt: skip
        return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]

    return reply


def _graded(correct: float | None) -> float:
    """A reward of a problem whose reference parses (``math_problems`` drops the rest): never None."""
    if correct is None:
        raise AssertionError("an eval problem has an ungradable reference: math_problems should have dropped it")
    return correct


def evaluate_model(
    reply: Reply, problems: Sequence[tuple[str, str]], cfg: EvalConfig, *, seed: int
) -> tuple[dict[str, Tally], list[dict[str, Any]]]:
    """Math pass@1 on (sampled, k) and off (greedy) and toggle compliance of one model, per problem.

    The on-mode samples are drawn with ``seed`` (:data:`Reply`): every model evaluated with the same seed (child,
    parent, champion) gets the same random numbers.

    Returns:
        ``({"math_pass1_on", "math_pass1_off", "toggle_on", "toggle_off"}: Tally per problem, samples)``: on-mode
        tallies count ``k`` samples per problem, off-mode ones 1.
    """
    k = cfg.num_samples
    questions = [q for q, _ in problems]
    on_replies = reply(
        questions, "on", n=k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        seed=seed, desc="eval: math, reasoning on",
    )  # fmt: skip
    off_replies = reply(questions, "off", max_new_tokens=cfg.max_new_tokens, desc="eval: math, reasoning off")
    on_chats = [(q, "on") for q in questions for _ in range(k)]
    answers = [a for _, a in problems]
    on_correct = accuracy_reward(on_replies, answer=[a for a in answers for _ in range(k)])
    off_correct = accuracy_reward(off_replies, answer=answers)
    num = len(problems)
    rates = {
        "math_pass1_on": Tally([sum(_graded(c) for c in on_correct[i * k : (i + 1) * k]) for i in range(num)], [k] * num),
        "math_pass1_off": Tally([_graded(c) for c in off_correct], [1] * num),
        "toggle_on": Tally([sum(toggle_compliant(r, "on") for r in on_replies[i * k : (i + 1) * k]) for i in range(num)], [k] * num),
        "toggle_off": Tally([float(toggle_compliant(r, "off")) for r in off_replies], [1] * num),
    }
    samples = [
        {"prompt": q, "reasoning": "on", "answer": a, "response": r, "correct": c}
        for (q, _), a, r, c in zip(on_chats, [a for a in answers for _ in range(k)], on_replies, on_correct, strict=True)
    ] + [
        {"prompt": q, "reasoning": "off", "answer": a, "response": r, "correct": c}
        for (q, a), r, c in zip(problems, off_replies, off_correct, strict=True)
    ]
    return rates, samples


def ifeval_prompts(recipe: Recipe, store: ArtifactStore) -> tuple[list[IFEvalPrompt], list[str]]:
    """The IFEval sample (``eval.ifeval_num_prompts``, stream ``eval.ifeval_prompts``) and the instruction ids left
    out.

    Prompts whose checker cannot run here (:func:`~nemoforge.stages.eval.ifeval.unavailable_instructions`)
    are left out before sampling. ``([], [])`` when ``data.ifeval_uri`` is not set.

    Raises:
        InputNotFoundError: ``data.ifeval_uri`` does not exist.
        NemoforgeError: it is not IFEval JSONL, or no prompt is left to check.
    """
    if not recipe.data.ifeval_uri:
        return [], []
    rows = read_ifeval(Path(store.fetch(recipe.data.ifeval_uri)))
    unchecked = unavailable_instructions(rows)
    seed = seed_for(recipe, "eval.ifeval_prompts")
    prompts = sample_prompts(rows, recipe.eval.ifeval_num_prompts, seed=seed, exclude=unchecked)
    if not prompts:
        raise NemoforgeError(
            f"{recipe.data.ifeval_uri}: no IFEval prompt is checkable here (missing checkers: {', '.join(unchecked)})"
        )
    return prompts, unchecked


def evaluate_ifeval(
    reply: Reply, prompts: Sequence[IFEvalPrompt], cfg: EvalConfig, *, seed: int
) -> tuple[dict[str, Tally], list[dict[str, Any]]]:
    """IFEval strict accuracy of one model: a reply per prompt in ``cfg.ifeval_reasoning`` mode, then the checks.

    Off: greedy. On: sampled at ``cfg.temperature`` / ``cfg.top_p`` with ``seed`` (:data:`Reply`), and the
    answer part is checked (a reply cut off inside its think block has none and follows nothing).

    Returns:
        ``({"ifeval_prompt_strict", "ifeval_instruction_strict"}: Tally per prompt, samples)`` (IFEval §3: a
        prompt counts when all its instructions are followed; instructions count one by one): one sample per
        prompt with the response, the instruction ids and whether each was followed.
    """
    sampled = cfg.ifeval_reasoning == "on"
    replies = reply(
        [p.prompt for p in prompts], cfg.ifeval_reasoning, max_new_tokens=cfg.ifeval_max_new_tokens,
        temperature=cfg.temperature if sampled else 0.0, top_p=cfg.top_p if sampled else 1.0, seed=seed,
        desc="eval: IFEval",
    )  # fmt: skip
    answers = [(answer_part(r) or "") if sampled else r for r in replies]
    followed = [follow_strict(p, a) for p, a in zip(prompts, answers, strict=True)]
    samples = [
        {"task": "ifeval", "key": p.key, "prompt": p.prompt, "reasoning": cfg.ifeval_reasoning, "response": r,
         "instruction_id_list": list(p.instruction_id_list), "followed": f}
        for p, r, f in zip(prompts, replies, followed, strict=True)
    ]
    rates = {
        "ifeval_prompt_strict": Tally([float(all(f)) for f in followed], [1] * len(followed)),
        "ifeval_instruction_strict": Tally([float(sum(f)) for f in followed], [len(f) for f in followed]),
    }
    return rates, samples


def heldout_rows(corpus_uri: str, cfg: EvalConfig, store: ArtifactStore) -> tuple[torch.Tensor, str]:
    """The first ``cfg.lm_num_sequences`` held-out rows of the corpus at ``corpus_uri`` and their source URI.

    Raises:
        InputNotFoundError: the corpus or one of its files does not exist.
        NemoforgeError: its token ids do not match its digest.
    """
    corpus = load_corpus(Path(store.fetch(corpus_uri)))
    return corpus.heldout_ids_NT[: cfg.lm_num_sequences], corpus.source_uri


@dataclass(frozen=True)
class EvalSetup:
    """What every model's evaluation shares: the data, the tokenizer and where generation runs.

    Attributes:
        engine: ``vllm`` or ``generate`` (:func:`eval_engine`).
        tensor_parallel_size: GPUs a vLLM engine shards the model over (1 on the CPU).
        max_model_len: longest prompt + reply (tokens) a vLLM engine reserves for.
    """

    recipe: Recipe
    tokenizer: Any
    problems: Sequence[tuple[str, str]]
    if_prompts: Sequence[IFEvalPrompt]
    heldout_NT: torch.Tensor | None
    engine: Engine
    tensor_parallel_size: int
    max_model_len: int
    device: torch.device


def eval_engine(recipe: Recipe) -> tuple[Engine, int]:
    """``eval.engine`` resolved (``auto``: vLLM when importable and a CUDA device is present) and the tensor-parallel
    size of a vLLM engine (``resources.eval.gpu_count`` on CUDA, 1 on the CPU).

    Raises:
        NemoforgeError: ``resources.eval.gpu_count`` > 1 but generation would run on our one-device decoder, which
            cannot use the other GPUs (one line naming the fix); ``eval.engine=vllm`` and vLLM cannot be imported.
    """
    gpus = recipe.resources.eval.gpu_count
    if gpus > 1:
        why = (
            "eval.engine=generate" if recipe.eval.engine == "generate"
            else "vLLM cannot be imported" if not vllm_importable()
            else "no CUDA device is visible" if not torch.cuda.is_available() else None
        )  # fmt: skip
        if why:
            raise NemoforgeError(
                f"resources.eval.gpu_count={gpus} but eval would generate with nemoforge's one-device decoder ({why}): "
                f"{INSTALL_HINT} with eval.engine auto or vllm, or set resources.eval.gpu_count=1"
            )
    engine = resolve_engine(recipe.eval.engine, field="eval.engine", auto_needs_cuda=True)
    return engine, max(gpus, 1) if torch.cuda.is_available() else 1


def measure(
    model_dir: str | Path, setup: EvalSetup, after: Callable[[torch.nn.Module], None] | None = None
) -> Measurement:
    """Everything but speed and KL for the model at ``model_dir``: math, toggle, IFEval (when prompts), held-out LM
    quality; ``after(model)`` then runs on the loaded model (KL, timing) before it is freed.

    The model's whole evaluation runs before this returns, and it leaves nothing of the model in memory: a vLLM
    engine is shut down before the torch model loads (held-out scores, ``after``), and that is deleted with the
    CUDA cache emptied. ``recipe.eval`` sets it; sampling draws from the streams ``eval.math`` and ``eval.ifeval``,
    the same for every model measured.
    """
    from nemoforge.models import convert

    recipe, cfg, tokenizer = setup.recipe, setup.recipe.eval, setup.tokenizer
    model = None

    def load() -> torch.nn.Module:
        return convert.load_causal_lm(model_dir, dtype=recipe_dtype(recipe)).to(setup.device).eval()

    def replies(reply: Reply) -> tuple[dict[str, Tally], list[dict[str, Any]]]:
        rates, samples = evaluate_model(reply, setup.problems, cfg, seed=seed_for(recipe, "eval.math"))
        if setup.if_prompts:
            if_rates, if_samples = evaluate_ifeval(reply, setup.if_prompts, cfg, seed=seed_for(recipe, "eval.ifeval"))
            rates |= if_rates
            samples += if_samples
        return rates, samples

    if setup.engine == "vllm":
        with VLLMEngine(
            model_dir, eos_token_id=tokenizer.eos_token_id, dtype=recipe.dtype, max_model_len=setup.max_model_len,
            seed=seed_for(recipe, "eval.vllm"), tensor_parallel_size=setup.tensor_parallel_size,
        ) as engine:  # fmt: skip
            rates, samples = replies(vllm_reply(engine, tokenizer))
    else:
        model = load()
        rates, samples = replies(decoder_reply(model, tokenizer, cfg.batch_size))
    lm_loss = None
    if setup.heldout_NT is not None or after is not None:
        model = model or load()
        if setup.heldout_NT is not None:
            scores = next_token_scores(model, setup.heldout_NT, batch_size=cfg.batch_size)
            rates["lm_top1"] = Tally(scores.correct_N, scores.tokens_N)
            lm_loss = Tally(scores.ce_sum_N, scores.tokens_N)
        if after is not None:
            after(model)
    del model
    free_memory()
    return Measurement(rates, lm_loss, samples)


def both_fit(model_dir: str | Path, parent_dir: str | Path, device: torch.device) -> bool:
    """Whether child and parent fit on ``device`` at once, for the round-robin speed phase: always on the CPU;
    on CUDA when their safetensors take at most :data:`~nemoforge.planning.GPU_MEMORY_UTILIZATION` of the GPU."""
    if device.type != "cuda":
        return True
    weights = sum(f.stat().st_size for d in (model_dir, parent_dir) for f in Path(d).glob("*.safetensors"))
    return weights <= GPU_MEMORY_UTILIZATION * torch.cuda.get_device_properties(device).total_memory


def time_decode(
    model_dir: str | Path, parent_dir: str | Path, setup: EvalSetup, *, fit: bool,
    timed: dict[str, DecodeTiming],
) -> dict[str, DecodeTiming]:
    """Decode speed of child and parent (:mod:`~nemoforge.stages.eval.speed`).

    Round-robin timing needs both models resident at once, so when they ``fit`` (the small recipes) both are
    loaded for this phase only, after the quality phases; otherwise each was timed alone in its own phase
    (``timed``, filled by :func:`measure`'s ``after``), and that is returned as is.
    """
    if not fit:
        return timed
    from nemoforge.models import convert

    dtype = recipe_dtype(setup.recipe)
    models = {label: convert.load_causal_lm(d, dtype=dtype).to(setup.device).eval()
              for label, d in (("child", model_dir), ("parent", parent_dir))}  # fmt: skip
    cfg = setup.recipe.eval
    timing = time_decode_round_robin(models, setup.tokenizer, num_tokens=cfg.decode_tokens, repeats=cfg.decode_repeats)
    del models
    free_memory()
    return timing


def max_model_len(tokenizer: Any, problems: Sequence[tuple[str, str]], if_prompts: Sequence[IFEvalPrompt], cfg: EvalConfig) -> int:
    """Longest prompt (either toggle mode) plus the longer of the two reply budgets, in tokens."""
    prompts = [q for q, _ in problems] + [p.prompt for p in if_prompts]
    longest = max(len(encode_prompt(tokenizer, p, r)) for p in prompts for r in ("on", "off"))
    return longest + max(cfg.max_new_tokens, cfg.ifeval_max_new_tokens)


def compare(child: Measurement, parent: Measurement, timing: dict[str, DecodeTiming], seed: int) -> dict[str, float]:
    """Child and parent figures with their 95% intervals, retention per rate and the decode speedup.

    Returns:
        ``<m>``, ``<m>_ci_low``, ``<m>_ci_high`` for each rate and ``lm_loss``, the same with ``parent_``;
        ``retention_<m>`` (+ interval) per rate; ``decode_tokens_per_s`` (median over rounds) with
        ``decode_tokens_per_s_min``/``_max``, the same with ``parent_``; ``speedup`` (+ interval). Values may
        be ``inf`` (a retention over a parent at 0).
    """
    out: dict[str, float] = {}
    for name, tally in child.rates.items():
        for prefix, t in (("", tally), ("parent_", parent.rates[name])):
            low, high = clustered_wilson_interval(t.successes_C, t.trials_C)
            out |= {f"{prefix}{name}": t.rate, f"{prefix}{name}_ci_low": low, f"{prefix}{name}_ci_high": high}
        low, high = paired_bootstrap_ratio(tally.successes_C, parent.rates[name].successes_C, seed=seed)
        kept = ratio(tally.rate, parent.rates[name].rate)
        out |= {f"retention_{name}": kept, f"retention_{name}_ci_low": low, f"retention_{name}_ci_high": high}
    for prefix, m in (("", child), ("parent_", parent)):
        if m.lm_loss is not None:
            low, high = clustered_mean_interval(m.lm_loss.successes_C, m.lm_loss.trials_C)
            out |= {f"{prefix}lm_loss": m.lm_loss.rate, f"{prefix}lm_loss_ci_low": low, f"{prefix}lm_loss_ci_high": high}
    for prefix, t in (("", timing["child"]), ("parent_", timing["parent"])):
        name = f"{prefix}decode_tokens_per_s"
        out |= {name: t.median, f"{name}_min": t.min, f"{name}_max": t.max}
    low, high = paired_bootstrap_median_ratio(
        timing["child"].tokens_per_s_R, timing["parent"].tokens_per_s_R, seed=seed
    )
    out |= {"speedup": timing["child"].median / timing["parent"].median, "speedup_ci_low": low, "speedup_ci_high": high}
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _interval(figures: dict[str, float], name: str) -> str:
    for low, high in (("_ci_low", "_ci_high"), ("_min", "_max")):
        if f"{name}{low}" in figures:
            return f"[{_fmt(figures[name + low])}, {_fmt(figures[name + high])}]"
    return "-"


def comparison_table(figures: dict[str, float]) -> str:
    """Markdown table: one row per metric, child | parent | child - parent | intervals | child/parent.

    Args:
        figures: :func:`compare`'s output (plus ``kl_to_parent`` and ``parent_kl_to_parent``).

    Returns:
        The table and a note on the intervals: 95% CI for rates and ``lm_loss``, min to max over the timing
        rounds for ``decode_tokens_per_s``; child/parent is ``retention_<m>`` (``speedup`` for decoding).
    """
    lines = [
        "| metric | child | parent | child - parent | child interval | parent interval | child/parent [95% CI] |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in TABLE_METRICS:
        c, p = figures.get(name), figures.get(f"parent_{name}")
        if c is None or p is None:
            continue
        ratio_name = "speedup" if name == "decode_tokens_per_s" else f"retention_{name}"
        kept = f"{_fmt(figures[ratio_name])} {_interval(figures, ratio_name)}" if ratio_name in figures else "-"
        lines.append(
            f"| {name} | {c:.4g} | {p:.4g} | {c - p:+.4g} | {_interval(figures, name)} "
            f"| {_interval(figures, f'parent_{name}')} | {kept} |"
        )
    note = (
        "\nIntervals: 95% CI (rates: Wilson, clustered by problem, prompt or held-out row; lm_loss: normal on the "
        "clustered standard error; child/parent: paired bootstrap); decode_tokens_per_s: median, min to max over "
        "round-robin rounds, speedup = ratio of medians with a paired bootstrap over rounds.\n"
    )
    return "\n".join(lines) + "\n" + note


def eval_settings_digest(recipe: Recipe, problems_digest: str, heldout_digest: str | None, ifeval_digest: str | None) -> str:
    """sha256 of what the eval figures depend on: the ``eval`` section without its gate, ``dtype``, the ``seed``
    (its sampling and bootstrap streams), and the digests of the problem set, the held-out rows and the IFEval
    prompts. Champion metrics recorded under another digest are not compared with
    (:func:`~nemoforge.stages.eval.gate.champion_baseline`)."""
    payload = {
        "eval": recipe.eval.model_dump(mode="json", exclude={"gate"}),
        "dtype": recipe.dtype,
        "seed": recipe.seed,
        "problems": problems_digest,
        "heldout": heldout_digest,
        "ifeval": ifeval_digest,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()




def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer at ``model_dir``; a nemotron-nas export's config read by our class (``AutoTokenizer`` would
    otherwise ask interactively whether to run the export's Python files)."""
    from transformers import AutoTokenizer

    from nemoforge.models.hf.configuration_decilm import DeciLMConfig

    is_nas = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") == "nemotron-nas"
    return AutoTokenizer.from_pretrained(model_dir, config=DeciLMConfig.from_pretrained(model_dir) if is_nas else None)


def run(
    recipe: Recipe,
    *,
    model_uri: str,
    parent_uri: str,
    output_uri: str,
    store: ArtifactStore,
    corpus_uri: str | None = None,
    data_uri: str | None = None,
    champion: dict[str, Any] | None = None,
) -> StageResult:
    """Evaluate the child at ``model_uri`` and the parent at ``parent_uri`` side by side; decide the gate.

    Args:
        recipe: the resolved recipe (``eval`` section with its ``gate``; ``data.math_eval_uri`` and
            ``data.ifeval_uri``; ``dtype`` of both models).
        model_uri: the model to evaluate (rl's export).
        parent_uri: the parent (same evaluation, ``parent_`` metrics).
        output_uri: where the table, the report and the samples go.
        store: the artifact store.
        corpus_uri: the corpus step's output, whose held-out rows give ``lm_top1`` and ``lm_loss``; None: not
            measured (a gate naming ``lm_top1`` then fails).
        data_uri: sft's ``data`` output, whose held-out chats are the math problems when ``data.math_eval_uri``
            is not set (:func:`eval_problems`).
        champion: the current champion (``version``, ``model_uri``, ``metrics``, ``eval_settings``), as the
            runner reads it from the MLflow registry (:func:`nemoforge.runner.register.champion_record`); None:
            no champion yet.

    Returns:
        metrics (see the module docstring and :func:`compare`): ``math_pass1_on``, ``math_pass1_off``,
        ``toggle_on``, ``toggle_off``, ``lm_top1`` (shares in [0, 1]), ``lm_loss`` (nats/token),
        ``decode_tokens_per_s``, ``kl_to_parent``, with ``data.ifeval_uri`` also ``ifeval_prompt_strict`` and
        ``ifeval_instruction_strict``; intervals, ``parent_`` figures, ``retention_<m>``, ``speedup``,
        ``gate_passed`` (0/1). Outputs ``model`` (= ``model_uri``), ``comparison``, ``report``, ``samples``,
        ``registration`` (where the runner records the registry version). Tags ``gate`` (passed/failed),
        ``gate_checks`` (every check), ``gate_failed`` (the failed ones, or ``none``), ``eval_settings``
        (digest), ``eval_problems``, ``eval_problems_unparseable`` (and ``ifeval_prompts``, ``ifeval_unchecked``, ``lm_heldout_rows``).

    Raises:
        InputNotFoundError: an input URI does not exist.
        NemoforgeError: ``data.ifeval_uri`` is not IFEval JSONL or leaves no checkable prompt; the corpus
            does not match its digest; no math problems (:func:`eval_problems`).
    """
    cfg = recipe.eval
    engine, tensor_parallel_size = eval_engine(recipe)  # before anything loads: refuses GPUs it cannot use
    device = compute_device()
    model_dir, parent_dir = store.fetch(model_uri), store.fetch(parent_uri)
    tokenizer = load_tokenizer(model_dir)
    problems, chats, source, num_unparseable = eval_problems(recipe, store, data_uri)
    if_prompts, if_unchecked = ifeval_prompts(recipe, store)
    heldout_NT, heldout_source = heldout_rows(corpus_uri, cfg, store) if corpus_uri else (None, None)
    setup = EvalSetup(
        recipe, tokenizer, problems, if_prompts, heldout_NT, engine, tensor_parallel_size,
        max_model_len(tokenizer, problems, if_prompts, cfg), device,
    )  # fmt: skip

    # One model in memory at a time: the parent first (its log-probs on the reference chats saved for the KL),
    # then the child. Speed is timed round-robin with both loaded afterwards when both fit, else alone per phase.
    fit = both_fit(model_dir, parent_dir, device)
    timed: dict[str, DecodeTiming] = {}
    kl: dict[str, float] = {}

    def after(label: str, then: Callable[[torch.nn.Module], None]) -> Callable[[torch.nn.Module], None]:
        def run_after(m: torch.nn.Module) -> None:
            then(m)
            if not fit:
                timed.update(time_decode_round_robin(
                    {label: m}, tokenizer, num_tokens=cfg.decode_tokens, repeats=cfg.decode_repeats
                ))  # fmt: skip

        return run_after

    with tempfile.TemporaryDirectory(prefix="nemoforge-eval-kl-") as kl_tmp:
        parent_logprobs = Path(kl_tmp)
        parent_measured = measure(
            parent_dir, setup, after("parent", lambda m: save_parent_logprobs(m, tokenizer, chats, parent_logprobs))
        )
        child = measure(
            model_dir, setup,
            after("child", lambda m: kl.update(child=kl_to_parent(m, tokenizer, chats, parent_logprobs))),
        )  # fmt: skip
    timing = time_decode(model_dir, parent_dir, setup, fit=fit, timed=timed)
    figures = compare(child, parent_measured, timing, seed_for(recipe, "eval.bootstrap"))
    figures |= {"kl_to_parent": kl["child"], "parent_kl_to_parent": 0.0}

    problems_digest = hashlib.sha256(json.dumps(problems).encode()).hexdigest()
    heldout_digest = token_digest(heldout_NT) if heldout_NT is not None else None
    if_rows = [[p.key, p.prompt, p.instruction_id_list, p.kwargs] for p in if_prompts]
    if_digest = hashlib.sha256(json.dumps(if_rows, sort_keys=True).encode()).hexdigest() if if_prompts else None
    settings = eval_settings_digest(recipe, problems_digest, heldout_digest, if_digest)

    def measure_champion(uri: str) -> dict[str, float]:
        return measure(store.fetch(uri), setup).point()

    baseline = champion_baseline(champion, settings, store, measure_champion)
    outcome = promotion_gate(figures, cfg.gate, baseline)
    metrics = {k: v for k, v in figures.items() if math.isfinite(v)} | {"gate_passed": float(outcome.passed)}

    outputs = {
        "model": model_uri,
        "comparison": join_uri(output_uri, "comparison.md"),
        "report": join_uri(output_uri, "report.json"),
        "samples": join_uri(output_uri, "samples"),
        "registration": join_uri(output_uri, "registration.json"),
    }
    with tempfile.TemporaryDirectory(prefix="nemoforge-eval-") as tmp:
        work = Path(tmp)
        (work / "comparison.md").write_text(comparison_table(figures))
        store.put(work / "comparison.md", outputs["comparison"])
        for name, rows in (("child", child.samples), ("parent", parent_measured.samples)):
            (work / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
            store.put(work / f"{name}.json", join_uri(outputs["samples"], f"{name}.json"))
    report = {
        "metrics": {k: (v if math.isfinite(v) else None) for k, v in figures.items()} | {"gate_passed": metrics["gate_passed"]},
        "decode_tokens_per_s_rounds": {label: t.tokens_per_s_R for label, t in timing.items()},
        "gate": {"passed": outcome.passed, "checks": outcome.checks, "failed": outcome.failed},
        "eval_settings": settings,
        "champion": None if baseline is None else {
            "version": baseline.version, "metrics": baseline.metrics, "note": baseline.note,
        },
    }
    store.write_json(outputs["report"], report)
    datasets = [DatasetRef("eval-math", source, problems_digest, len(problems), "validation")]
    tags = {
        "device": str(device),
        "eval_engine": GENERATE_TAG if engine == "generate" else "vllm",
        "eval_tensor_parallel_size": str(tensor_parallel_size if engine == "vllm" else 1),
        "decode_timing": "round_robin" if fit else "sequential",
        "gate": "passed" if outcome.passed else "failed",
        "gate_checks": "; ".join(outcome.checks),
        "gate_failed": "; ".join(outcome.failed) or "none",
        "eval_settings": settings,
        "eval_problems": str(len(problems)),
        "eval_problems_unparseable": str(num_unparseable),
    }
    if heldout_NT is not None:
        datasets.append(DatasetRef("eval-heldout-text", heldout_source, heldout_digest, len(heldout_NT), "validation"))
        tags["lm_heldout_rows"] = str(len(heldout_NT))
    if if_prompts:
        datasets.append(DatasetRef("eval-ifeval", recipe.data.ifeval_uri, if_digest, len(if_prompts), "validation"))
        tags |= {"ifeval_prompts": str(len(if_prompts)), "ifeval_unchecked": ", ".join(if_unchecked) or "none"}
    return StageResult(
        metrics=metrics,
        outputs=outputs,
        digests={"model": digest_path(model_dir)},
        datasets=datasets,
        tags=tags,
    )
