"""Child vs parent evaluation (LN §7.1), and the promotion-gate decision.

For each model (the child at ``model_uri`` and the parent): math on held-out problems with reasoning
on (``k`` samples at T 0.6 / top-p 0.95, mean pass@1) and reasoning off (greedy pass@1), toggle
compliance in both modes, IFEval prompt- and instruction-level strict accuracy when ``data.ifeval_uri``
is set (:mod:`nemoforge.stages.eval.ifeval`), decode tokens/s at batch 1, and for the child the
per-token KL(parent || child) on the held-out reference chats. Child metrics are plain names, the
parent's carry ``parent_``.

Written under ``output_uri``: ``comparison.md`` (the side-by-side table), ``report.json`` (metrics,
gate), ``samples/{child,parent}.json``. The stage does not touch the registry: it returns the gate
outcome in its tags and the runner registers the version and moves the aliases.

Shape legend: ``P`` problems, ``K`` samples per problem, ``B`` rows, ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nemoforge.artifacts import ArtifactStore, digest_path
from nemoforge.config import EvalConfig, Recipe
from nemoforge.data.reasoning import (
    SFT_HELDOUT_FRACTION,
    THINK_OPEN,
    ChatSample,
    encode_chat,
    load_chat_samples,
    math_problems,
    read_chat_samples,
    split_by_prompt,
    strip_thinking,
    toggle_compliant,
)
from nemoforge.errors import NemoforgeError
from nemoforge.models.generate import generate
from nemoforge.rewards import accuracy_reward
from nemoforge.stages.eval.gate import promotion_gate
from nemoforge.stages.eval.generation import generate_chats, left_pad, pad_id
from nemoforge.stages.eval.ifeval import (
    IFEvalPrompt,
    follow_strict,
    read_ifeval,
    sample_prompts,
    strict_accuracy,
    unavailable_instructions,
)
from nemoforge.stages.result import DatasetRef, StageResult
from nemoforge.training.losses import kl_div_BT
from nemoforge.training.runtime import compute_device
from nemoforge.training.stage import uri_under

TABLE_METRICS = (
    "math_pass1_on", "math_pass1_off", "toggle_on", "toggle_off", "ifeval_prompt_strict", "ifeval_instruction_strict",
    "decode_tokens_per_s", "kl_to_parent",
)


def mean_pass_at_1(correct_PK: Sequence[Sequence[float]]) -> float:
    """Mean over problems of the share of correct samples: the unbiased pass@1 from ``K`` samples (LN §7.1)."""
    return sum(sum(row) / len(row) for row in correct_PK) / len(correct_PK)


def eval_problems(recipe: Recipe, store: ArtifactStore) -> tuple[list[tuple[str, str]], list[ChatSample], str]:
    """Held-out ``(question, answer)`` problems, their reference chats (for KL), and the source name.

    ``data.math_eval_uri`` when set; otherwise the sft stage's held-out split of its own data.
    """
    n = recipe.eval.num_problems
    if recipe.data.math_eval_uri:
        samples = read_chat_samples(Path(store.fetch(recipe.data.math_eval_uri)), limit=2 * n)
        source = recipe.data.math_eval_uri
    else:
        all_samples = load_chat_samples(recipe.data.sft_uri, recipe.sft.num_samples, seed=recipe.seed, store=store)
        _, samples = split_by_prompt(all_samples, heldout_fraction=SFT_HELDOUT_FRACTION, seed=recipe.sft.seed)
        source = (recipe.data.sft_uri or f"generated://arithmetic?seed={recipe.seed}") + "#sft-heldout"
    problems = math_problems(samples)[:n]
    prompts = {q for q, _ in problems}
    chats = [s for s in samples if s.prompt in prompts]
    return problems, chats, source


def decode_tokens_per_s(model: torch.nn.Module, tokenizer: Any, num_tokens: int) -> float:
    """Greedy decode speed at batch 1 (no EOS stop), after one warm-up call (tokens/s)."""
    device = next(model.parameters()).device
    ids_1T = torch.tensor([tokenizer.encode("Count slowly from one to one hundred:", add_special_tokens=False)])
    generate(model, ids_1T.to(device), 4)
    started = time.perf_counter()
    out = generate(model, ids_1T.to(device), num_tokens)
    return (out.shape[1] - ids_1T.shape[1]) / (time.perf_counter() - started)


@torch.no_grad()
def kl_to_parent(model: torch.nn.Module, parent: torch.nn.Module, tokenizer: Any, chats: Sequence[ChatSample]) -> float:
    """Mean per-token KL(p_parent || q_child) over the held-out reference chats (nats/token)."""
    device = next(model.parameters()).device
    rows = [encode_chat(tokenizer, c, 512)[0] for c in chats]
    total, count = 0.0, 0
    for start in range(0, len(rows), 8):
        ids_BT, mask_BT = (t.to(device) for t in left_pad(rows[start : start + 8], pad_id(tokenizer)))
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        kw = {"attention_mask": mask_BT, "position_ids": pos_BT, "use_cache": False}
        kl_BT = kl_div_BT(parent(ids_BT, **kw).logits, model(ids_BT, **kw).logits)
        total += float((kl_BT * mask_BT).sum())
        count += int(mask_BT.sum())
    return total / max(count, 1)


def evaluate_model(
    model: torch.nn.Module, tokenizer: Any, problems: Sequence[tuple[str, str]], cfg: EvalConfig
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Math pass@1 on (sampled, k) and off (greedy), toggle compliance, decode tokens/s of one model."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    k = cfg.num_samples
    on_chats = [(q, "on") for q, _ in problems for _ in range(k)]
    on_replies = generate_chats(
        model, tokenizer, on_chats, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_p=cfg.top_p, batch_size=cfg.batch_size, generator=generator,
    )
    off_replies = generate_chats(
        model, tokenizer, [(q, "off") for q, _ in problems], max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )
    answers = [a for _, a in problems]
    on_correct = accuracy_reward(on_replies, answer=[a for a in answers for _ in range(k)])
    off_correct = accuracy_reward(off_replies, answer=answers)
    correct_PK = [[on_correct[i * k + j] or 0.0 for j in range(k)] for i in range(len(problems))]
    metrics = {
        "math_pass1_on": mean_pass_at_1(correct_PK),
        "math_pass1_off": mean_pass_at_1([[c or 0.0] for c in off_correct]),
        "toggle_on": sum(r.lstrip().startswith(THINK_OPEN) for r in on_replies) / len(on_replies),
        "toggle_off": sum(toggle_compliant(r, "off") for r in off_replies) / len(off_replies),
        "decode_tokens_per_s": decode_tokens_per_s(model, tokenizer, cfg.decode_tokens),
    }
    samples = [
        {"prompt": q, "reasoning": "on", "answer": a, "response": r, "correct": c}
        for (q, _), a, r, c in zip(on_chats, [a for a in answers for _ in range(k)], on_replies, on_correct, strict=True)
    ] + [
        {"prompt": q, "reasoning": "off", "answer": a, "response": r, "correct": c}
        for (q, a), r, c in zip(problems, off_replies, off_correct, strict=True)
    ]
    return metrics, samples


def ifeval_prompts(recipe: Recipe, store: ArtifactStore) -> tuple[list[IFEvalPrompt], list[str]]:
    """The IFEval sample (``eval.ifeval_num_prompts``, seeded by ``eval.seed``) and the instruction ids left out.

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
    prompts = sample_prompts(rows, recipe.eval.ifeval_num_prompts, seed=recipe.eval.seed, exclude=unchecked)
    if not prompts:
        raise NemoforgeError(
            f"{recipe.data.ifeval_uri}: no IFEval prompt is checkable here (missing checkers: {', '.join(unchecked)})"
        )
    return prompts, unchecked


def evaluate_ifeval(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[IFEvalPrompt], cfg: EvalConfig
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """IFEval strict accuracy of one model: a reply per prompt in ``cfg.ifeval_reasoning`` mode, then the checks.

    Off: greedy. On: sampled at ``cfg.temperature`` / ``cfg.top_p``, and the text after ``</think>`` is checked.

    Returns:
        ``({"ifeval_prompt_strict", "ifeval_instruction_strict"}, samples)``: one sample per prompt with the
        response, the instruction ids and whether each was followed.
    """
    sampled = cfg.ifeval_reasoning == "on"
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    replies = generate_chats(
        model, tokenizer, [(p.prompt, cfg.ifeval_reasoning) for p in prompts],
        max_new_tokens=cfg.ifeval_max_new_tokens, temperature=cfg.temperature if sampled else 0.0,
        top_p=cfg.top_p if sampled else 1.0, batch_size=cfg.batch_size, generator=generator,
    )
    answers = [strip_thinking(r) if sampled else r for r in replies]
    followed = [follow_strict(p, a) for p, a in zip(prompts, answers, strict=True)]
    samples = [
        {"task": "ifeval", "key": p.key, "prompt": p.prompt, "reasoning": cfg.ifeval_reasoning, "response": r,
         "instruction_id_list": list(p.instruction_id_list), "followed": f}
        for p, r, f in zip(prompts, replies, followed, strict=True)
    ]
    return strict_accuracy(followed), samples


def comparison_table(child: dict[str, float], parent: dict[str, float]) -> str:
    """Markdown table: one row per metric, child | parent | child - parent."""
    lines = ["| metric | child | parent | child - parent |", "| --- | ---: | ---: | ---: |"]
    for name in TABLE_METRICS:
        c, p = child.get(name), parent.get(name)
        if c is None or p is None:
            continue
        lines.append(f"| {name} | {c:.4g} | {p:.4g} | {c - p:+.4g} |")
    return "\n".join(lines) + "\n"


def champion_uri(store: ArtifactStore, model_name: str) -> str:
    """Where the runner keeps the current champion's record (version, metrics, model URI)."""
    return store.join("registry", model_name, "champion.json")


def run(recipe: Recipe, *, model_uri: str, parent_uri: str, output_uri: str, store: ArtifactStore) -> StageResult:
    """Evaluate the child at ``model_uri`` and the parent at ``parent_uri`` side by side; decide the gate.

    Args:
        recipe: the resolved recipe (``eval`` section with its ``gate``; ``data.math_eval_uri`` and
            ``data.ifeval_uri``; ``model.name`` for the champion record; ``dtype`` of both models).
        model_uri: the model to evaluate (rl's export).
        parent_uri: the parent (same evaluation, ``parent_`` metrics).
        output_uri: where the table, the report and the samples go.
        store: the artifact store.

    Returns:
        child metrics (``math_pass1_on``, ``math_pass1_off``, ``toggle_on``, ``toggle_off``,
        ``decode_tokens_per_s``, ``kl_to_parent``; with ``data.ifeval_uri`` also ``ifeval_prompt_strict``
        and ``ifeval_instruction_strict``, shares in [0, 1]), the same with ``parent_``, ``gate_passed``
        (0/1); outputs ``model`` (= ``model_uri``), ``comparison``, ``report``, ``samples``,
        ``registration`` (where the runner records the registry version); tags ``gate`` (passed/failed),
        ``gate_checks``, ``eval_problems`` (and ``ifeval_prompts``, ``ifeval_unchecked``).

    Raises:
        InputNotFoundError: an input URI does not exist.
        NemoforgeError: ``data.ifeval_uri`` is not IFEval JSONL or leaves no checkable prompt.
    """
    from transformers import AutoTokenizer

    from nemoforge.models.convert import load_causal_lm

    cfg = recipe.eval
    device = compute_device()
    model_dir, parent_dir = store.fetch(model_uri), store.fetch(parent_uri)
    dtype = getattr(torch, recipe.dtype)
    model = load_causal_lm(model_dir, dtype=dtype).to(device).eval()
    parent = load_causal_lm(parent_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, config=model.config)
    problems, chats, source = eval_problems(recipe, store)
    if_prompts, if_unchecked = ifeval_prompts(recipe, store)

    child_metrics, child_samples = evaluate_model(model, tokenizer, problems, cfg)
    child_metrics["kl_to_parent"] = kl_to_parent(model, parent, tokenizer, chats)
    parent_metrics, parent_samples = evaluate_model(parent, tokenizer, problems, cfg)
    parent_metrics["kl_to_parent"] = 0.0
    if if_prompts:
        for scores, rows, evaluated in (
            (child_metrics, child_samples, model), (parent_metrics, parent_samples, parent)
        ):
            if_metrics, if_samples = evaluate_ifeval(evaluated, tokenizer, if_prompts, cfg)
            scores.update(if_metrics)
            rows.extend(if_samples)

    champion = store.read_json(champion_uri(store, recipe.model.name)) if store.exists(
        champion_uri(store, recipe.model.name)
    ) else None
    outcome = promotion_gate(child_metrics, cfg.gate, champion)
    metrics = child_metrics | {f"parent_{k}": v for k, v in parent_metrics.items()}
    metrics["gate_passed"] = float(outcome.passed)
    table = comparison_table(child_metrics, parent_metrics)

    outputs = {
        "model": model_uri,
        "comparison": uri_under(output_uri, "comparison.md"),
        "report": uri_under(output_uri, "report.json"),
        "samples": uri_under(output_uri, "samples"),
        "registration": uri_under(output_uri, "registration.json"),
    }
    with tempfile.TemporaryDirectory(prefix="nemoforge-eval-") as tmp:
        work = Path(tmp)
        (work / "comparison.md").write_text(table)
        store.put(work / "comparison.md", outputs["comparison"])
        for name, rows in (("child", child_samples), ("parent", parent_samples)):
            (work / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
            store.put(work / f"{name}.json", uri_under(outputs["samples"], f"{name}.json"))
    report = {"metrics": metrics, "gate": {"passed": outcome.passed, "checks": outcome.checks}, "champion": champion}
    store.write_json(outputs["report"], report)
    problems_digest = hashlib.sha256(json.dumps(problems).encode()).hexdigest()
    datasets = [DatasetRef("eval-math", source, problems_digest, len(problems), "validation")]
    tags = {
        "device": str(device),
        "gate": "passed" if outcome.passed else "failed",
        "gate_checks": "; ".join(outcome.checks),
        "eval_problems": str(len(problems)),
    }
    if if_prompts:
        if_rows = [[p.key, p.prompt, p.instruction_id_list, p.kwargs] for p in if_prompts]
        if_digest = hashlib.sha256(json.dumps(if_rows, sort_keys=True).encode()).hexdigest()
        datasets.append(DatasetRef("eval-ifeval", recipe.data.ifeval_uri, if_digest, len(if_prompts), "validation"))
        tags |= {"ifeval_prompts": str(len(if_prompts)), "ifeval_unchecked": ", ".join(if_unchecked) or "none"}
    return StageResult(
        metrics=metrics,
        outputs=outputs,
        digests={"model": digest_path(model_dir)},
        datasets=datasets,
        tags=tags,
    )
