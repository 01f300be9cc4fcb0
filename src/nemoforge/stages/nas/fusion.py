"""FFN Fusion (arXiv 2503.18908; Llama-Nemotron Ultra, arXiv 2505.00949 §2): runs of attention-free layers become
one wide FFN.

After Puzzle, runs of consecutive layers whose attention is ``no_op`` remain. Their FFNs depend on each other only
weakly, so a run of k FFNs is replaced by its parallel form on the run's input ``x``::

    y = x + sum_i FFN_i(norm_i(x))                                     (FFN Fusion §3, Fig. 8)

which is one SwiGLU FFN of summed width: RMSNorm_i(x) = w_i * n(x) with ``n(x) = x / rms(x)`` shared by every
layer (one ``rms_norm_eps``), so each per-channel weight ``w_i`` folds exactly into the columns of FFN_i's gate and
up projections (``W @ (w * n) = (W * w) @ n``); gate/up rows and down columns are concatenated. The fused block is a
standard nemotron-nas block: no-op attention, an RMSNorm of weight 1 and that FFN, its width written as ``ffn_mult``
where one reaches it, else as ``intermediate_size`` (``block_configs.ffn_config``). Layers of a fused run (the
empty ones inside it included: they are identities) are gone from ``block_configs``; the config's
``parent_layers`` says which parent layers each remaining layer carries (``[[0], [1, 2, 3], [4]]``).

Fusion is exact with respect to the parallel form; it changes the network with respect to the sequential original.
That change is scored as Puzzle scores blocks (replace-and-score KL on held-out text, ``stages/nas/scoring.py``):
each maximal run is replaced by its parallel form alone, the rest of the child kept, and KL(child || that model)
measured; runs are then fused cheapest first while the summed KL fits ``nas.ffn_fusion.kl_budget``.

Units: KL in nats per token. Shape legend: N sequences, T tokens, D hidden_size, I FFN width.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from nemoforge.models.block_configs import ffn_config, parent_layers
from nemoforge.models.hf.configuration_decilm import AttentionConfig, BlockConfig, DeciLMConfig
from nemoforge.models.hf.modeling_decilm import DeciLMDecoderLayer, DeciLMForCausalLM, DeciLMMLP
from nemoforge.stages.nas.scoring import ParentPass, parent_pass, score_layer

log = logging.getLogger(__name__)

NOTHING_TO_FUSE = "nothing to fuse"


@dataclass
class FusionRun:
    """One maximal run of consecutive attention-free layers ``start .. stop - 1`` with two or more FFNs.

    Attributes:
        start: first layer of the run (index in the unfused child).
        stop: one past its last layer.
        ffn_layers: the run's layers that have an FFN (the others are empty).
        widths: their FFN widths in channels.
        kl_div: replace-and-score KL(child || child with this run in parallel form), nats per token.
        fused: whether the run was fused (fits the budget).
        fused_layer: index of the fused block in the fused child (None when not fused).
    """

    start: int
    stop: int
    ffn_layers: list[int]
    widths: list[int]
    kl_div: float | None = None
    fused: bool = False
    fused_layer: int | None = None

    @property
    def fused_width(self) -> int:
        """Width of the fused FFN in channels: the sum of the run's widths."""
        return sum(self.widths)


def attention_free_runs(config: DeciLMConfig) -> list[FusionRun]:
    """Maximal runs of consecutive layers whose attention is ``no_op`` and that hold at least two FFNs.

    A run with one FFN has nothing to fuse; empty layers (no attention, no FFN) inside a run belong to it.
    """
    runs, start = [], None
    for i in range(config.num_hidden_layers + 1):
        attention_free = i < config.num_hidden_layers and config.block_configs[i].attention.no_op
        if attention_free and start is None:
            start = i
        elif not attention_free and start is not None:
            ffn_layers = [j for j in range(start, i) if not config.block_configs[j].ffn.no_op]
            if len(ffn_layers) >= 2:
                widths = [config.intermediate_size_of(j) for j in ffn_layers]
                runs.append(FusionRun(start, i, ffn_layers, widths))
            start = None
    return runs


def parallel_run(layers: Sequence[DeciLMDecoderLayer], hidden_NTD: torch.Tensor) -> torch.Tensor:
    """The parallel form of a run of attention-free layers: ``x + sum_i FFN_i(norm_i(x))``, (N, T, D) -> (N, T, D)."""
    out_NTD = hidden_NTD
    for layer in layers:
        if layer.mlp is not None:
            out_NTD = out_NTD + layer.mlp(layer.post_attention_layernorm(hidden_NTD))
    return out_NTD


@torch.no_grad()
def fuse_mlps(layers: Sequence[DeciLMDecoderLayer], config: DeciLMConfig) -> DeciLMMLP:
    """One SwiGLU FFN equal to ``sum_i FFN_i(norm_i(x))`` behind an RMSNorm of weight 1.

    Per layer i with RMSNorm weight ``w_i`` (D,), gate/up ``(I_i, D)`` and down ``(D, I_i)``: the fused gate/up are
    ``cat_i(W_i * w_i[None, :])`` of shape ``(sum I_i, D)``, the fused down ``cat_i(W_down_i, dim=1)`` of shape
    ``(D, sum I_i)``; gate/up biases are concatenated, down biases summed (FFN Fusion Fig. 8).
    """
    kept = [layer for layer in layers if layer.mlp is not None]
    fused = DeciLMMLP(config, sum(layer.mlp.intermediate_size for layer in kept))
    ref = kept[0].mlp.gate_proj.weight
    fused.to(device=ref.device, dtype=ref.dtype)
    for name in ("gate_proj", "up_proj"):
        dst = getattr(fused, name)
        dst.weight.copy_(
            torch.cat(
                [getattr(l.mlp, name).weight * l.post_attention_layernorm.weight[None, :] for l in kept]
            )
        )
        if dst.bias is not None:
            dst.bias.copy_(torch.cat([getattr(l.mlp, name).bias for l in kept]))
    fused.down_proj.weight.copy_(torch.cat([l.mlp.down_proj.weight for l in kept], dim=1))
    if fused.down_proj.bias is not None:
        fused.down_proj.bias.copy_(torch.stack([l.mlp.down_proj.bias for l in kept]).sum(0))
    return fused


@torch.no_grad()
def fuse_runs(model: DeciLMForCausalLM, runs: Sequence[FusionRun]) -> DeciLMForCausalLM:
    """A new model with each run replaced by one fused block (``fused_layer`` is set on each run).

    Its config records ``parent_layers`` (``block_configs.parent_layers``): per layer, the parent layers it carries,
    so that distillation can pair a fused block's output with the parent's output after the run's last layer.

    Raises:
        ValueError: runs overlap, or a run holds a layer with attention.
    """
    config = model.config
    runs = sorted(runs, key=lambda r: r.start)
    for a, b in zip(runs, runs[1:], strict=False):
        if b.start < a.stop:
            raise ValueError(f"fusion runs {a.start}..{a.stop - 1} and {b.start}..{b.stop - 1} overlap")
    blocks: list[BlockConfig] = []
    sources: list[int | FusionRun] = []  # per new layer: the old layer it copies, or the run it fuses
    i = 0
    while i < config.num_hidden_layers:
        run = next((r for r in runs if r.start == i), None)
        if run is None:
            blocks.append(copy.deepcopy(config.block_configs[i]))
            sources.append(i)
            i += 1
            continue
        if any(not config.block_configs[j].attention.no_op for j in range(run.start, run.stop)):
            raise ValueError(f"fusion run {run.start}..{run.stop - 1} holds a layer with attention")
        run.fused_layer = len(blocks)
        blocks.append(
            BlockConfig(AttentionConfig(no_op=True), ffn_config(run.fused_width, config.hidden_size))
        )
        sources.append(run)
        i = run.stop
    carried = parent_layers(config)  # composes with an earlier fusion
    config_dict = config.to_dict()
    config_dict.update(
        block_configs=[b.to_dict() for b in blocks],
        num_hidden_layers=len(blocks),
        parent_layers=[
            carried[source]
            if isinstance(source, int)
            else [j for i in range(source.start, source.stop) for j in carried[i]]
            for source in sources
        ],
    )
    new_config = DeciLMConfig.from_dict(config_dict)
    fused = DeciLMForCausalLM(new_config).to(device=model.device, dtype=model.dtype)
    fused.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    fused.model.norm.load_state_dict(model.model.norm.state_dict())
    if not new_config.tie_word_embeddings:
        fused.lm_head.load_state_dict(model.lm_head.state_dict())
    for j, source in enumerate(sources):
        layer = fused.model.layers[j]
        if isinstance(source, int):
            layer.load_state_dict(model.model.layers[source].state_dict())
        else:
            layer.post_attention_layernorm.weight.fill_(1.0)
            layer.mlp.load_state_dict(
                fuse_mlps(model.model.layers[source.start : source.stop], new_config).state_dict()
            )
    fused.generation_config = copy.deepcopy(model.generation_config)
    return fused.eval()


@torch.no_grad()
def score_runs(model: DeciLMForCausalLM, child: ParentPass, runs: Sequence[FusionRun]) -> None:
    """Set each run's ``kl_div``: KL(child || child with only that run in parallel form) on ``child``'s sequences.

    Replace-and-score as Puzzle §4.2: the run's parallel output on the child's own input to the run, then the
    child's layers after the run (``scoring.score_layer``).
    """
    for run in runs:
        out_NTD = parallel_run(model.model.layers[run.start : run.stop], child.hidden_NTD[run.start])
        ((run.kl_div, _),) = score_layer(model, child, run.stop - 1, [out_NTD])


def select_runs(runs: Sequence[FusionRun], kl_budget: float) -> list[FusionRun]:
    """Scored runs taken cheapest first while their summed KL stays within ``kl_budget`` (KL taken as additive,
    as Puzzle's MIP does); sets ``fused`` on each."""
    total = 0.0
    chosen = []
    for run in sorted(runs, key=lambda r: r.kl_div):
        if total + run.kl_div <= kl_budget:
            total += run.kl_div
            run.fused = True
            chosen.append(run)
    return chosen


@torch.no_grad()
def ffn_fusion(
    model: DeciLMForCausalLM, heldout_ids_NT: torch.Tensor, kl_budget: float
) -> tuple[DeciLMForCausalLM, dict]:
    """Find, score and fuse the attention-free runs of ``model`` that fit ``kl_budget`` (module docstring).

    Args:
        model: the child the MIP picked (any nemotron-nas model).
        heldout_ids_NT: held-out sequences for replace-and-score KL.
        kl_budget: most summed KL(child || fused) in nats per token (``nas.ffn_fusion.kl_budget``).

    Returns:
        ``(fused_model, report)``: ``model`` itself when nothing is fused. ``report`` is JSON-able: ``status``
        (``"fused"``, ``"nothing to fuse"`` or ``"no run fits the budget"``), ``kl_budget``, ``runs`` (per
        candidate: layers, ffn_layers, widths, fused_width, kl_div, fused, fused_layer), ``num_layers_before``,
        ``num_layers_after``, ``kl_div_fused_vs_child`` (measured on the same sequences; 0 when nothing fused).
    """
    runs = attention_free_runs(model.config)
    report = {
        "kl_budget": kl_budget,
        "num_layers_before": model.config.num_hidden_layers,
        "num_layers_after": model.config.num_hidden_layers,
        "kl_div_fused_vs_child": 0.0,
        "runs": [],
    }
    if not runs:
        log.info("nas: ffn_fusion: %s (no run of two or more attention-free FFN layers)", NOTHING_TO_FUSE)
        return model, {**report, "status": NOTHING_TO_FUSE}
    child = parent_pass(model, heldout_ids_NT)
    score_runs(model, child, runs)
    chosen = select_runs(runs, kl_budget)
    fused = fuse_runs(model, chosen) if chosen else model
    if chosen:
        report["kl_div_fused_vs_child"] = child.score(fused(heldout_ids_NT).logits)[0]
    report.update(
        status="fused" if chosen else "no run fits the budget",
        num_layers_after=fused.config.num_hidden_layers,
        runs=[
            {"layers": list(range(r.start, r.stop)), "fused_width": r.fused_width, **asdict(r)} for r in runs
        ],
    )
    log.info(
        "nas: ffn_fusion: fused %d of %d runs, %d -> %d layers, KL(child || fused) %.4f",
        len(chosen),
        len(runs),
        report["num_layers_before"],
        report["num_layers_after"],
        report["kl_div_fused_vs_child"],
    )
    return fused, report
