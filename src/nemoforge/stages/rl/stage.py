"""GRPO with verifiable rewards (LN §5), then an optional offline DPO/RPO pass (LN §6).

Each GRPO step (one call of the shared train loop's loss function): sample ``G`` responses for each of
``B`` prompts at temperature 1 (on/off prompts alternate, so the toggle stays trained), score them with
the reward functions (``nemoforge.rewards``: math-verify accuracy, think format), normalize the rewards
within each group (:func:`~nemoforge.stages.rl.losses.group_advantages`) and take one clipped-ratio
update. With one update per rollout the ratio is 1 at the update (TRL's ``num_iterations=1`` default):
the clipped loss then equals the plain policy gradient; LN used 2 updates per rollout.

Rows a reward cannot score (None, e.g. no gradable reference; the problem sets already drop those) are
unscorable: left out of their group's mean and std, advantage 0, and out of every reward mean; they are
counted in ``reward_unscorable_fraction`` (per step) and ``reward_unscorable_fraction_heldout``.
``frac_reward_zero_std`` (per step, TRL's name) is the share of groups that give no signal (all scorable
rewards equal, or fewer than two scorable). The k3 KL term (``rl.beta``) applies to every completion
token, those of zero-advantage groups and unscorable rows included (DeepSeekMath eq. 3, as TRL): such
groups add no policy-gradient term but are still pulled toward the reference
(:func:`~nemoforge.stages.rl.losses.clipped_policy_loss`).

Rollouts are sampled by ``rl.rollout_engine`` (:mod:`~nemoforge.stages.rl.rollout`): ``generate`` (the
default: ``nemoforge.models.generate``, the KV-cached decoder, on the global torch RNG), ``vllm`` (a
``vllm.LLM`` colocated in this process, started on an export of the policy after pass-rate filtering;
before each rollout the policy's weights are pushed into it, and each request's seed is drawn from the
global torch RNG, so a resumed run draws the same seeds) or ``auto`` (vllm when importable). The engine
used is the stage run's ``rollout_engine`` tag. Held-out reward and pass-rate filtering always use
``generate``.
Prompts whose pass rate (over ``filter_samples`` samples) is at least ``filter_max_pass_rate`` are
dropped first (LN §5). The held-out "after" figures score the weights as exported (rounded to the recipe's
dtype: :func:`~nemoforge.stages.training.round_to_dtype`), as "before" scores sft's export; held-out and
pass-rate replies are generated with the rollouts' numerics (:func:`rollout_numerics`). Written under
``output_uri``: ``checkpoints/step-N/``, ``checkpoints-preference/step-N/``, ``model/``, ``plots/``, ``samples/heldout_{before,after}.json``.

Data-parallel like sft under torchrun (a TrainJob worker, ``--stage rl``): every rank loads the model, measures
the held-out "before" figures and filters the prompts, then trains on rank 0's kept prompts: each GRPO update
gives every rank its ``B / N`` prompt groups (:func:`make_grpo_loss`: rollouts by ``generate`` on each rank, the
loss a token mean over the global batch), each preference update its ``B / N`` pairs (:func:`preference_phase`).
Rank 0 alone measures after, exports and writes.

Shape legend: ``B`` prompts, ``G`` generations per prompt, ``N = B * G`` sequences, ``T`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from nemoforge.artifacts.store import ArtifactStore
from nemoforge.artifacts.uris import join_uri
from nemoforge.config import Recipe, RLConfig
from nemoforge.data.reasoning import (
    ChatSample,
    Reasoning,
    encode_chat,
    encode_prompt,
    math_problems,
    read_chat_samples,
    read_preference_pairs,
)
from nemoforge.data.sft_split import SFTSplit, generated_name, read_sft_split
from nemoforge.engines import GENERATE_TAG, resolve_engine
from nemoforge.errors import NemoforgeError
from nemoforge.models.generate import generate_ids, pad_id
from nemoforge.rewards import combined_rewards
from nemoforge.runtime import compute_device, recipe_dtype, seed_for
from nemoforge.stages.chat import generate_chats
from nemoforge.stages.result import DatasetRef, StageResult
from nemoforge.stages.rl.losses import clipped_policy_loss, dpo_loss, group_advantages, token_logps
from nemoforge.stages.rl.rollout import VLLMRollouts
from nemoforge.stages.training import (
    checkpoint_uploader,
    export_model,
    fetch_latest_checkpoint,
    plot_history,
    round_to_dtype,
)
from nemoforge.stats import paired_mean_difference
from nemoforge.training.distributed import (
    broadcast_from_main,
    init_from_env,
    is_main_process,
    mean_over_job,
    rank,
    world_size,
)
from nemoforge.training.loop import LogFn, TrainState, epoch_batches, train, uses_bf16_autocast

Problem = tuple[str, str, Reasoning]
"""``(question, reference answer, reasoning mode)``."""


def _with_modes(problems: Sequence[tuple[str, str]], modes: Sequence[Reasoning]) -> list[Problem]:
    return [(q, a, modes[i % len(modes)]) for i, (q, a) in enumerate(problems)]


def rl_problems(
    recipe: Recipe, split: SFTSplit, store: ArtifactStore | None
) -> tuple[list[Problem], list[Problem], str]:
    """Training and held-out prompts with references, and the source name.

    Both come from sft's source (``split.source``: ``data.sft_uri``'s rows after the ones sft read, or
    arithmetic generated from rl's own stream, ``rl.prompts``, at sft's ``data.arithmetic`` difficulty), with every
    prompt sft saw (its training and held-out split, which eval grades) left out; held-out prompts come from
    ``data.math_eval_uri`` when set, else from the pool after the training prompts. Training and held-out
    prompts never share a question. Training prompts take the ``rl.train_modes`` in turn; each held-out problem
    is asked in both modes ("on", then "off"), so every mode's held-out gain rests on all
    ``rl.num_heldout_prompts`` problems.

    Args:
        recipe: the resolved recipe (``rl`` section, ``data.math_eval_uri``, ``seed``: stream ``rl.prompts``).
        split: sft's data split (:func:`~nemoforge.data.sft_split.read_sft_split` of sft's ``data`` output).
        store: reads ``data.math_eval_uri`` and sft's source file when they are store URIs.
    """
    cfg = recipe.rl
    need = cfg.num_prompts + (0 if recipe.data.math_eval_uri else cfg.num_heldout_prompts)
    taken = split.prompts
    num_read = 2 * need + split.source.num_samples  # room for the prompts left out (a file: sft's first rows)
    seed = seed_for(recipe, "rl.prompts")
    samples = split.source.samples(num_read, seed=seed, store=store)
    pool = [(q, a) for q, a in math_problems(samples).problems if q not in taken]
    if recipe.data.math_eval_uri:
        eval_path = Path(store.fetch(recipe.data.math_eval_uri))
        heldout = math_problems(read_chat_samples(eval_path, limit=2 * cfg.num_heldout_prompts)).problems
        heldout_questions = {q for q, _ in heldout}
        train_problems = [p for p in pool if p[0] not in heldout_questions][: cfg.num_prompts]
    else:
        train_problems, heldout = pool[: cfg.num_prompts], pool[cfg.num_prompts : need]
    if len(train_problems) < cfg.batch_size or not heldout:
        raise NemoforgeError(
            f"rl needs at least rl.batch_size={cfg.batch_size} prompts with reference answers and one held-out "
            f"prompt; the data gave {len(train_problems)} and {len(heldout)}"
        )
    source = split.source.sft_uri or generated_name(split.source.arithmetic, seed)
    heldout_both = [(q, a, mode) for q, a in heldout[: cfg.num_heldout_prompts] for mode in ("on", "off")]
    return _with_modes(train_problems, cfg.train_modes), heldout_both, source


def score(
    weights: dict[str, float], completions: Sequence[str], problems: Sequence[Problem]
) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """:func:`~nemoforge.rewards.combined_rewards` of the completions to ``problems`` (None: unscorable)."""
    return combined_rewards(
        weights, completions, answer=[p[1] for p in problems], reasoning=[p[2] for p in problems]
    )


def _mean_scorable(values: Sequence[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None


def reward_metrics(
    total: Sequence[float | None], parts: dict[str, list[float | None]], *, total_name: str, suffix: str = ""
) -> dict[str, float]:
    """Reward means over the scorable rows only, and the share of unscorable rows.

    Returns:
        ``{total_name: mean total, "reward_<name>" + suffix: mean of each reward over the rows it scored,
        "reward_unscorable_fraction" + suffix: share of rows whose total is None}``; a mean over no row is
        left out, never reported as 0.
    """
    means = {total_name: _mean_scorable(total)}
    means |= {f"reward_{name}{suffix}": _mean_scorable(values) for name, values in parts.items()}
    metrics = {k: v for k, v in means.items() if v is not None}
    metrics[f"reward_unscorable_fraction{suffix}"] = sum(t is None for t in total) / len(total)
    return metrics


def heldout_reward(
    model: torch.nn.Module, tokenizer: Any, problems: Sequence[Problem], cfg: RLConfig
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean reward (and each part) of greedy replies to the held-out prompts, over scorable replies.

    Returns:
        ``({"reward_heldout", "reward_<name>_heldout", "reward_unscorable_fraction_heldout"}, samples)``
        (:func:`reward_metrics`); a sample's ``reward`` (the weighted total) is None when it is unscorable, its
        ``rewards`` are each reward's value (None where that reward does not apply).
    """
    replies = generate_chats(
        model, tokenizer, [(q, r) for q, _, r in problems], max_new_tokens=cfg.max_new_tokens,
        desc="rl: held-out, greedy",
    )
    total, parts = score(cfg.reward_weights, replies, problems)
    metrics = reward_metrics(total, parts, total_name="reward_heldout", suffix="_heldout")
    samples = [
        {"prompt": q, "answer": a, "reasoning": r, "response": t, "reward": s,
         "rewards": {name: values[i] for name, values in parts.items()}}
        for i, ((q, a, r), t, s) in enumerate(zip(problems, replies, total, strict=True))
    ]
    return metrics, samples


def heldout_sampled_accuracy(
    model: torch.nn.Module, tokenizer: Any, problems: Sequence[Problem], cfg: RLConfig, *, seed: int
) -> list[dict[str, Any]]:
    """Sampled pass@1 per held-out prompt: accuracy averaged over ``cfg.heldout_samples`` replies at the rollout
    temperature and top-p (the expected reward GRPO raises, where greedy accuracy can move either way).

    The replies are drawn from a generator seeded with ``seed`` (the stage's ``rl.heldout_sampled`` stream), its
    own (the training rollouts' global RNG is untouched), so before and after share their random numbers.

    Returns:
        One row per prompt, shaped as :func:`heldout_reward`'s samples for :func:`heldout_gains`: ``prompt``,
        ``reasoning``, ``reward`` and ``rewards["accuracy"]`` (both the mean over the scorable replies; None when
        none was scorable), ``responses``.
    """
    k = cfg.heldout_samples
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    replies = generate_chats(
        model, tokenizer, [(q, r) for q, _, r in problems for _ in range(k)], max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.batch_size * cfg.num_generations,
        generator=generator, desc="rl: held-out, sampled",
    )
    _, parts = score({"accuracy": 1.0}, replies, [p for p in problems for _ in range(k)])
    rows = []
    for i, (q, _, r) in enumerate(problems):
        rate = _mean_scorable(parts["accuracy"][i * k : (i + 1) * k])
        rows.append({"prompt": q, "reasoning": r, "reward": rate, "rewards": {"accuracy": rate},
                     "responses": replies[i * k : (i + 1) * k]})
    return rows


def heldout_gains(
    samples_before: Sequence[dict[str, Any]], samples_after: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """After minus before on the same held-out prompts, with 95% intervals clustered by question.

    Paired per held-out row (:func:`~nemoforge.stats.paired_mean_difference`): the same prompt in the same
    reasoning mode, greedy reply before and after training. Rows that share a question (a problem asked in
    both reasoning modes, or repeated in a ``data.math_eval_uri`` file) form one cluster, as their replies
    are not independent; :func:`rl_problems` alternates the modes over distinct questions, so there a
    cluster is one row unless the file repeats a question. A row whose value is None (unscorable) before or
    after is left out of that pair, so a gain is over the rows scored both times and may differ from
    ``<name>_after - <name>_before`` when the scorable rows differ; a gain over no row is left out, as the
    reward means are.

    Args:
        samples_before: :func:`heldout_reward`'s samples before training.
        samples_after: its samples after, same prompts in the same order.

    Returns:
        ``reward_heldout_gain`` (weighted total reward) and, when ``accuracy`` is one of the rewards,
        ``accuracy_heldout_gain`` (its 0/1 part: held-out accuracy after minus before) and the same per
        reasoning mode, ``accuracy_heldout_on_gain`` and ``accuracy_heldout_off_gain`` (a gain in one mode can
        hide a loss in the other), each with ``_ci_low`` and ``_ci_high``.
    """
    def accuracy(mode: str | None):
        return lambda s: s["rewards"].get("accuracy") if mode in (None, s["reasoning"]) else None

    values = {
        "reward_heldout": lambda sample: sample["reward"],
        "accuracy_heldout": accuracy(None),
        "accuracy_heldout_on": accuracy("on"),
        "accuracy_heldout_off": accuracy("off"),
    }
    metrics: dict[str, float] = {}
    for name, value in values.items():
        pairs = [
            (value(b), value(a), b["prompt"])
            for b, a in zip(samples_before, samples_after, strict=True)
            if value(b) is not None and value(a) is not None
        ]
        if pairs:
            before_N, after_N, question_N = zip(*pairs, strict=True)
            gain = paired_mean_difference(before_N, after_N, clusters_N=question_N)
            metrics |= {
                f"{name}_gain": gain.point, f"{name}_gain_ci_low": gain.low, f"{name}_gain_ci_high": gain.high
            }
    return metrics


def sampled_metrics(rows_before: Sequence[dict[str, Any]], rows_after: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``accuracy_heldout_sampled[_on|_off]_{before,after}`` and their gains with 95% intervals
    (:func:`heldout_gains` on :func:`heldout_sampled_accuracy`'s rows)."""
    metrics: dict[str, float] = {}
    for when, rows in (("before", rows_before), ("after", rows_after)):
        for mode in (None, "on", "off"):
            rate = _mean_scorable([r["reward"] for r in rows if mode in (None, r["reasoning"])])
            if rate is not None:
                metrics[f"accuracy_heldout_sampled{'_' + mode if mode else ''}_{when}"] = rate
    gains = heldout_gains(rows_before, rows_after)
    return metrics | {
        k.replace("accuracy_heldout", "accuracy_heldout_sampled"): v
        for k, v in gains.items() if k.startswith("accuracy_heldout")
    }


def filter_by_pass_rate(
    model: torch.nn.Module, tokenizer: Any, problems: list[Problem], cfg: RLConfig
) -> tuple[list[Problem], float]:
    """Drop prompts answered correctly in at least ``filter_max_pass_rate`` of ``filter_samples`` samples (LN §5).

    The pass rate is over the samples that accuracy could score; a prompt with none is dropped (no signal).

    Returns:
        The kept prompts (at least ``batch_size``: the hardest are kept when too many pass) and the mean pass rate.
    """
    if cfg.filter_samples == 0:
        return problems, float("nan")
    chats = [(q, r) for q, _, r in problems for _ in range(cfg.filter_samples)]
    replies = generate_chats(
        model, tokenizer, chats, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        desc="rl: pass-rate filter",
    )
    _, parts = score({"accuracy": 1.0}, replies, [p for p in problems for _ in range(cfg.filter_samples)])
    acc, k = parts["accuracy"], cfg.filter_samples
    rates = [_mean_scorable(acc[i * k : (i + 1) * k]) for i in range(len(problems))]
    rated = [(rate, p) for rate, p in zip(rates, problems, strict=True) if rate is not None]
    kept = [p for rate, p in rated if rate < cfg.filter_max_pass_rate]
    if len(kept) < cfg.batch_size:
        kept = [p for _, p in sorted(rated, key=lambda x: x[0])[: cfg.batch_size]]
    return kept, (sum(rate for rate, _ in rated) / len(rated) if rated else float("nan"))


def rollout_batch(
    tokenizer: Any, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompt + right-padded completion rows: ``(ids_NT, attention_mask_NT, completion_mask_NC)``.

    ``completion_mask_NC`` covers the last ``C`` columns (the completions' width, at least 1) and marks the
    completion tokens among them, aligned with :func:`~nemoforge.stages.rl.losses.token_logps` called with
    ``num_last=C``.
    """
    pad = pad_id(tokenizer)
    width_p = max(len(p) for p in prompt_ids)
    width_c = max(1, max(len(c) for c in completion_ids))
    ids, attn, comp = [], [], []
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        lp, lc = width_p - len(p), width_c - len(c)
        ids.append([pad] * lp + list(p) + list(c) + [pad] * lc)
        attn.append([0] * lp + [1] * (len(p) + len(c)) + [0] * lc)
        comp.append([1] * len(c) + [0] * lc)
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(comp, dtype=torch.bool)


def make_grpo_loss(
    problems: Sequence[Problem],
    tokenizer: Any,
    cfg: RLConfig,
    ref_model: torch.nn.Module | None,
    rollouts: VLLMRollouts | None = None,
):
    """The train loop's loss function for GRPO: ``loss_fn(model, prompt_index_b1) -> (loss, metrics)``.

    ``rollouts``: a vLLM engine that samples the completions (given the policy's weights first); None:
    ``generate_ids``.

    Data-parallel under torchrun (the loop gives each rank ``b = B / N`` of the ``B`` prompts of an update): a
    rank samples the ``G`` completions of each of its prompts, so a group is never split and its rewards and
    advantages are the single-process ones for the same completions. The policy-gradient loss is the token mean
    over the completion tokens of the whole global batch: a rank divides its token sums by the mean count over
    the ranks (:func:`~nemoforge.training.distributed.mean_over_job`, a collective), so the engine's average of
    the ranks' gradients is the single-process gradient on the same rollouts. This holds per micro-batch; with
    several micro-batches per rank (DeepSpeed ``gradient_accumulation_steps`` > 1) the update averages their
    global token means. Each rank samples with its own generator, seeded from one draw of the shared RNG plus its
    rank (the ranks' RNGs stay in step and resume together); a single process samples from the global RNG. The
    logged reward means and ``completion_tokens`` are the ranks' means of their own (equal-sized) shares.
    """
    prompt_ids = [encode_prompt(tokenizer, q, r) for q, _, r in problems]

    def loss_fn(model: torch.nn.Module, index_B1: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(model.parameters()).device
        chosen = [problems[i] for i in index_B1[:, 0].tolist() for _ in range(cfg.num_generations)]
        p_ids = [prompt_ids[i] for i in index_B1[:, 0].tolist() for _ in range(cfg.num_generations)]
        # sampled with the global torch RNG, which the train loop checkpoints: a resumed run samples the same
        if rollouts is not None:
            rollouts.push_weights(model)
            c_ids = rollouts.generate(
                [prompt_ids[i] for i in index_B1[:, 0].tolist()], n=cfg.num_generations,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                seed=int(torch.randint(0, 2**31 - 1, ()).item()),
            )
        else:
            generator = None
            if world_size() > 1:
                seed = int(torch.randint(0, 2**31 - 1, ()).item()) + rank()
                generator = torch.Generator(device).manual_seed(seed)
            c_ids = generate_ids(
                model, tokenizer, p_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, batch_size=len(p_ids), generator=generator,
            )
        completions = [tokenizer.decode(c, skip_special_tokens=True) for c in c_ids]
        rewards, parts = score(cfg.reward_weights, completions, chosen)
        rewards_N = torch.tensor([float("nan") if r is None else r for r in rewards])
        advantages_N, zero_std_P = group_advantages(rewards_N, cfg.num_generations)
        advantages_N = advantages_N.to(device)
        ids_NT, attn_NT, comp_NC = (t.to(device) for t in rollout_batch(tokenizer, p_ids, c_ids))
        logp_NC = token_logps(model, ids_NT, attn_NT, num_last=comp_NC.shape[1])
        ref_logp_NC = None
        if cfg.beta > 0 and ref_model is not None:
            with torch.no_grad():
                ref_logp_NC = token_logps(ref_model, ids_NT, attn_NT, num_last=comp_NC.shape[1])
        loss, stats = clipped_policy_loss(
            logp_NC, logp_NC.detach(), advantages_N, comp_NC, epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high, ref_logp_NT=ref_logp_NC, beta=cfg.beta,
            num_tokens=mean_over_job(float(comp_NC.sum())),
        )
        metrics = {**reward_metrics(rewards, parts, total_name="reward_mean"), **stats}
        metrics["frac_reward_zero_std"] = zero_std_P.float().mean().item()
        metrics["completion_tokens"] = float(sum(len(c) for c in c_ids)) / len(c_ids)
        return loss, metrics

    return loss_fn


def response_logps(model: torch.nn.Module, ids_NT: torch.Tensor, mask_NT: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the response tokens of each right-padded row (``mask_NT``: 1 on response tokens)."""
    attn_NT = (ids_NT >= 0).long()
    logp_NT = token_logps(model, ids_NT.clamp(min=0), attn_NT)
    return (logp_NT * mask_NT[:, 1:].to(logp_NT.dtype)).sum(-1)


def preference_rows(
    tokenizer: Any, pairs: Sequence[tuple[str, str, str]], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected chats (reasoning off) as ``(ids_2PT, mask_2PT)``: rows 2i chosen, 2i+1 rejected.

    Padding is -1 in ids (attention 0); ``mask`` marks response tokens. A pair whose chosen or rejected
    response is cut away entirely by ``max_len`` (a prompt that long) is left out: it has no response to
    score (its per-token NLL would divide by zero).

    Raises:
        NemoforgeError: ``max_len`` leaves no pair a response.
    """
    rows = []
    for prompt, chosen, rejected in pairs:
        pair = [encode_chat(tokenizer, ChatSample(prompt, r, "off"), max_len) for r in (chosen, rejected)]
        if all(any(mask[1:]) for _, mask in pair):
            rows += pair
    if not rows:
        raise NemoforgeError(
            f"rl.preference.max_len_tokens={max_len} cuts every preference response away: raise it"
        )
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [-1] * (width - len(ids)) for ids, _ in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rows], dtype=torch.bool)
    return ids, mask


def _rl_names(by_name: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Metrics (or their histories) under rl's names: ``prefix`` + name, and no ``tokens_per_s`` (a batch holds
    prompts, not tokens)."""
    return {f"{prefix}{k}": v for k, v in by_name.items() if k != "tokens_per_s"}


def _history_names(on_log: LogFn | None, prefix: str) -> LogFn | None:
    """``on_log`` that logs under :func:`_rl_names`, so live points and the returned history share names."""
    if on_log is None:
        return None
    return lambda step, metrics: on_log(step, _rl_names(metrics, prefix))


def plot_rewards(history: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """PNG of the rollout rewards per GRPO step."""
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for name in sorted(n for n in history if n.startswith("reward_")):
        steps, values = zip(*history[name], strict=True)
        ax.plot(steps, values, label=name, linewidth=2 if name == "reward_mean" else 1)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.set_title("rl: rollout reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def run(
    recipe: Recipe,
    *,
    model_uri: str,
    data_uri: str,
    output_uri: str,
    store: ArtifactStore,
    on_log: LogFn | None = None,
) -> StageResult:
    """GRPO on math prompts with verifiable rewards, then (``rl.preference.enabled``) DPO on preference pairs.

    Args:
        recipe: the resolved recipe (``rl`` section; ``data.math_eval_uri``, ``data.preference_uri``; ``seed``;
            ``dtype``).
        model_uri: the model to train (sft's export).
        data_uri: sft's ``data`` output (:mod:`~nemoforge.data.sft_split`): the prompts kept apart, and the
            source the training prompts are drawn from (:func:`rl_problems`).
        output_uri: where checkpoints, the export, plots and samples go.
        store: the artifact store.
        on_log: called as ``on_log(step, metrics)`` while training, every ``rl.log_every_steps`` updates,
            under the history's names
            (the runner logs them to the stage's MLflow run); None: only the returned history.

    Returns:
        metrics ``reward_heldout_{before,after}`` (and per reward), ``reward_heldout_gain`` and
        ``accuracy_heldout_gain`` with their ``_ci_low``/``_ci_high`` (:func:`heldout_gains`),
        ``pass_rate_filter``, ``num_prompts``, ``train_steps``, (``preference_loss_final``); per-step history (``reward_mean``, ``clip_fraction``,
        ``kl``, ``loss``, ...; ``preference/...``); outputs ``model``, ``checkpoints``, ``samples``.

    Raises:
        InputNotFoundError: an input URI does not exist.
        NemoforgeError: not enough prompts, ``data_uri`` is not sft's split, or training diverged.
    """
    from transformers import AutoTokenizer

    from nemoforge.models.convert import load_causal_lm

    cfg = recipe.rl
    init_from_env()  # under torchrun: first, so that "cuda" is this rank's GPU
    device = compute_device()
    model_dir = store.fetch(model_uri)
    model = load_causal_lm(model_dir, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, config=model.config)
    ref_model = None
    if cfg.beta > 0 or cfg.preference.enabled:
        ref_model = load_causal_lm(model_dir, dtype=torch.float32).to(device).eval().requires_grad_(False)

    train_problems, heldout_problems, source = rl_problems(recipe, read_sft_split(store, data_uri), store)
    torch.manual_seed(seed_for(recipe, "rl.filter"))  # the pass-rate filter samples from the global RNG
    sampled_seed = seed_for(recipe, "rl.heldout_sampled")
    with rollout_numerics(device, cfg):
        before, samples_before = heldout_reward(model, tokenizer, heldout_problems, cfg)
        sampled_before = (
            heldout_sampled_accuracy(model, tokenizer, heldout_problems, cfg, seed=sampled_seed)
            if cfg.heldout_samples else []
        )
        kept, pass_rate = filter_by_pass_rate(model, tokenizer, train_problems, cfg)
    kept = broadcast_from_main(kept)  # every rank trains on rank 0's prompts, whatever its sampling numerics

    checkpoints_uri = join_uri(output_uri, "checkpoints")
    pref_checkpoints_uri = join_uri(output_uri, "checkpoints-preference")
    history: dict[str, list[tuple[int, float]]] = {}
    metrics: dict[str, float] = {}
    engine = resolve_engine(cfg.rollout_engine, field="rl.rollout_engine", num_ranks=world_size())
    with tempfile.TemporaryDirectory(prefix="nemoforge-rl-") as tmp:
        work = Path(tmp)
        grpo = grpo_phase(
            model, tokenizer, kept, ref_model, recipe, engine,
            store=store, checkpoints_uri=checkpoints_uri, work=work, on_log=on_log,
        )
        state, engine_tags = grpo.state, grpo.engine_tags
        history |= _rl_names(state.history, "")
        metrics["train_steps"] = float(state.step)
        resumed = state.resumed_from_step

        if cfg.preference.enabled:
            pstate = preference_phase(
                model, ref_model, tokenizer, recipe,
                store=store, checkpoints_uri=pref_checkpoints_uri, work=work, on_log=on_log, device=device,
            )
            history |= _rl_names(pstate.history, "preference_")
            metrics["preference_loss_final"] = pstate.history["loss"][-1][1]
            metrics["preference_reward_accuracy_final"] = pstate.history["reward_accuracy"][-1][1]
            metrics["preference_steps"] = float(pstate.step)
        if not is_main_process():  # under torchrun, rank 0 measures, exports and writes; the others only train
            return StageResult(history=history, tags={"device": str(device)})

        # held-out "after" scores the weights that are exported (recipe dtype), as "before" scored sft's export
        round_to_dtype(model, recipe_dtype(recipe))
        with rollout_numerics(device, cfg):
            after, samples_after = heldout_reward(model, tokenizer, heldout_problems, cfg)
            sampled = {"before": sampled_before}
            if cfg.heldout_samples:
                sampled["after"] = heldout_sampled_accuracy(
                    model, tokenizer, heldout_problems, cfg, seed=sampled_seed
                )
        exported = export_model(model, tokenizer, recipe, output_uri=output_uri, store=store, work=work)
        plots = {
            "reward_curve": join_uri(output_uri, "plots", "reward_curve.png"),
            "loss_curve": join_uri(output_uri, "plots", "loss_curve.png"),
        }
        store.put(plot_rewards(state.history, work / "reward_curve.png"), plots["reward_curve"])
        store.put(plot_history(state.history, work / "loss_curve.png", "rl: GRPO loss"), plots["loss_curve"])
        samples_uri = join_uri(output_uri, "samples")
        named_samples = {"heldout_before": samples_before, "heldout_after": samples_after}
        if cfg.heldout_samples:
            named_samples |= {"heldout_sampled_before": sampled["before"], "heldout_sampled_after": sampled["after"]}
        for name, rows in named_samples.items():
            (work / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
            store.put(work / f"{name}.json", join_uri(samples_uri, f"{name}.json"))

    metrics |= {f"{k}_before": v for k, v in before.items()} | {f"{k}_after": v for k, v in after.items()}
    metrics |= heldout_gains(samples_before, samples_after)
    if cfg.heldout_samples:
        metrics |= sampled_metrics(sampled["before"], sampled["after"])
    metrics |= {"pass_rate_filter": pass_rate, "num_prompts": float(len(kept))}
    metrics = {k: v for k, v in metrics.items() if v == v}  # drop NaN (no filtering)
    digest_rows = json.dumps([list(p) for p in kept]).encode()
    return StageResult(
        metrics=metrics,
        history=history,
        outputs={"model": exported.uri, "checkpoints": checkpoints_uri, "samples": samples_uri},
        digests={"model": exported.digest},
        plots=plots,
        datasets=[
            DatasetRef("rl-prompts", source, hashlib.sha256(digest_rows).hexdigest(), len(kept), "training"),
            DatasetRef(
                "rl-heldout", recipe.data.math_eval_uri or source,
                hashlib.sha256(json.dumps(heldout_problems).encode()).hexdigest(), len(heldout_problems), "validation",
            ),
        ],
        tags={"device": str(device), **engine_tags, "resumed_from_step": str(resumed)},
    )


def rollout_numerics(device: torch.device, cfg: RLConfig) -> torch.autocast:
    """The numerics the ``generate`` engine's rollouts run under (the train step's bf16 autocast when
    :func:`~nemoforge.training.loop.uses_bf16_autocast`), for the held-out and pass-rate replies.

    Measured on an H100 (2026-12-07): after GRPO under bf16 autocast, the same policy's greedy "on" replies in
    float32 made 53 arithmetic slips in 384 lines against 5 before rl, while its bf16 export sampled 0.89
    correct in eval; scoring before and after with the rollouts' numerics measures the policy GRPO trained.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16_autocast(device, cfg))


@dataclass(frozen=True)
class GRPOPhase:
    """What the GRPO phase hands on: the training run's final ``state``, and the ``engine_tags`` naming the
    rollout engine (``rollout_engine``, and ``rollout_engine_version`` for vLLM)."""

    state: TrainState
    engine_tags: dict[str, str]


def grpo_phase(
    model: torch.nn.Module,
    tokenizer: Any,
    kept: list[Problem],
    ref_model: torch.nn.Module | None,
    recipe: Recipe,
    engine: str,
    *,
    store: ArtifactStore,
    checkpoints_uri: str,
    work: Path,
    on_log: LogFn | None,
) -> GRPOPhase:
    """GRPO on the ``kept`` prompts (:func:`make_grpo_loss`, ``recipe.rl``), resumed from the newest checkpoint
    under ``checkpoints_uri``; rollouts by ``engine`` (``generate``, or ``vllm``: an engine started here and
    closed when training ends). Streams: ``rl.batches`` (prompt order), ``rl.train`` (the rollouts' global torch
    RNG), ``rl.vllm`` (the vLLM engine's own seed)."""
    cfg = recipe.rl
    fetch_latest_checkpoint(store, checkpoints_uri, work / "checkpoints")
    index_P1 = torch.arange(len(kept))[:, None]
    rollouts = None
    engine_tags = {"rollout_engine": GENERATE_TAG}
    if engine == "vllm":
        longest = max(len(encode_prompt(tokenizer, q, r)) for q, _, r in kept) + cfg.max_new_tokens
        max_model_len = -(-longest // 32) * 32
        rollouts = VLLMRollouts(model, tokenizer, max_model_len=max_model_len, seed=seed_for(recipe, "rl.vllm"))
        engine_tags = {"rollout_engine": "vllm", "rollout_engine_version": rollouts.version}
    try:
        state = train(
            model,
            make_grpo_loss(kept, tokenizer, cfg, ref_model, rollouts),
            epoch_batches(index_P1, cfg.batch_size, seed=seed_for(recipe, "rl.batches")),
            cfg,
            seed=seed_for(recipe, "rl.train"),
            checkpoint_dir=work / "checkpoints",
            desc="rl",
            on_log=_history_names(on_log, ""),
            on_checkpoint=checkpoint_uploader(store, checkpoints_uri, cfg.keep_checkpoints),
        )
    finally:
        if rollouts is not None:
            rollouts.close()
    return GRPOPhase(state, engine_tags)


def preference_phase(
    model: torch.nn.Module,
    ref_model: torch.nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    *,
    store: ArtifactStore,
    checkpoints_uri: str,
    work: Path,
    on_log: LogFn | None,
    device: torch.device,
) -> TrainState:
    """DPO on ``data.preference_uri``'s pairs (``rl.preference``), against the policy after GRPO as the reference
    (copied into ``ref_model``), resumed from the newest checkpoint under ``checkpoints_uri``.

    Data-parallel under torchrun as sft is (:func:`~nemoforge.training.loop.train`): every rank scores the
    reference once on all pairs, and trains on its ``B / N`` pairs of each global batch of ``B``. Each loss term
    (DPO, and RPO's NLL per response token) is a mean over pairs, never over tokens of several pairs, so the mean
    over equal shares that the engine's gradient averaging takes is the global batch's mean: ``N`` ranks give
    the single-process update.
    """
    pcfg = recipe.rl.preference
    pairs = read_preference_pairs(Path(store.fetch(recipe.data.preference_uri)), limit=pcfg.num_pairs)
    ids_2PT, mask_2PT = preference_rows(tokenizer, pairs, pcfg.max_len_tokens)
    ref_model.load_state_dict(model.state_dict())  # the reference is the policy after GRPO
    with torch.no_grad():
        ref_logps_2P = torch.cat(
            [response_logps(ref_model, ids_2PT[i : i + 8].to(device), mask_2PT[i : i + 8].to(device))
             for i in range(0, ids_2PT.shape[0], 8)]
        ).cpu()

    def pref_loss(m: torch.nn.Module, index_B1: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        rows = torch.stack([2 * index_B1[:, 0], 2 * index_B1[:, 0] + 1], 1).view(-1).cpu()
        logps_2B = response_logps(m, ids_2PT[rows].to(device), mask_2PT[rows].to(device))
        ref_2B = ref_logps_2P[rows].to(device)
        loss, stats = dpo_loss(logps_2B[0::2], logps_2B[1::2], ref_2B[0::2], ref_2B[1::2], beta=pcfg.beta)
        if pcfg.nll_weight > 0:  # RPO-style NLL on chosen, per token (Pang et al. 2024, arXiv 2404.19733)
            nll = -(logps_2B[0::2] / mask_2PT[rows][0::2, 1:].sum(-1).to(device)).mean()
            loss = loss + pcfg.nll_weight * nll
        return loss, stats

    fetch_latest_checkpoint(store, checkpoints_uri, work / "checkpoints-preference")
    pair_index_P1 = torch.arange(ids_2PT.shape[0] // 2)[:, None]
    return train(
        model,
        pref_loss,
        epoch_batches(pair_index_P1, pcfg.batch_size, seed=seed_for(recipe, "rl.preference.batches")),
        pcfg,
        seed=seed_for(recipe, "rl.preference.train"),
        checkpoint_dir=work / "checkpoints-preference",
        desc="rl/preference",
        on_log=_history_names(on_log, "preference_"),
        on_checkpoint=checkpoint_uploader(store, checkpoints_uri, pcfg.keep_checkpoints),
    )
