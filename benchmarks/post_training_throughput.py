"""sft and GRPO throughput through the distributed path (the TrainJob worker's stage code under torchrun), per N.

    python benchmarks/post_training_throughput.py --nproc 1 2 4 8     # GPUs: SmolLM2-135M shape, bf16 autocast
    python benchmarks/post_training_throughput.py --smoke             # CPU, gloo, tiny shapes, N = 1 2: the mechanics

For each N of ``--nproc`` the driver starts ``torch.distributed.run --standalone --nproc_per_node N`` on this
file in ``--worker`` mode (:func:`scaling.run_under_torchrun`, shared with benchmarks/scaling.py) and reads rank
0's measurement. A worker runs what ``python -m nemoforge.cluster.worker --stage sft|rl`` runs once the
artifact store and MLflow bookkeeping are done (the worker itself needs a recipe, upstream artifacts and an MLflow
run; the stage functions below import neither mlflow nor kfp):

* sft: :func:`nemoforge.training.loop.train` on :class:`~nemoforge.stages.sft.stage.GlobalTokenMean` (the sft
  stage's objective: assistant-token CE averaged over the global batch), rows of generated arithmetic chats
  (:func:`~nemoforge.data.reasoning.arithmetic_samples`, encoded and packed one chat per row as the stage does:
  :func:`~nemoforge.data.reasoning.pack_chats`) cut at ``--seq`` tokens. tokens/s and MFU are the loop's own
  (padded row tokens of the global batch over the step's wall time; MFU per GPU from
  :func:`~nemoforge.training.flops.training_flops_per_token` against the device's dense bf16 peak, as
  benchmarks/train_throughput.py), the median over the timed steps.
* GRPO: :func:`~nemoforge.stages.rl.stage.grpo_phase` with the ``generate`` rollout engine (the default, and
  the one the stage uses under torchrun) on generated arithmetic prompts ("on" mode), the GPU recipe's rl
  settings (``beta`` 0.05: a frozen reference model; rewards accuracy 1 + format 1; temperature 1). Every rank
  samples ``G`` completions of its ``B / N`` prompts, then takes the update. The rollout is timed around the
  stage's ``generate_ids`` (CUDA-synchronized); the step's wall time is the loop's; update = step - rollout
  (rewards, policy and reference forward, backward, AdamW). rollout tokens/s = generated tokens of all ranks /
  rollout seconds; update tokens/s = the padded prompt + completion tokens the policy trains on, all ranks /
  update seconds. Seconds are the ranks' means, each figure the median over the timed steps.

The model is SmolLM2-135M-shaped (hidden 576, 30 layers, FFN 1536, 9 heads, 3 KV heads, vocab 49152, tied
embeddings), random init, float32 weights and AdamW state under bf16 autocast (the stages' numerics on CUDA). The
tokenizer is a byte-level BPE of 1024 tokens trained here on the generated chats (no download; SmolLM2's special
tokens and ChatML template): the random policy samples ids beyond it, which decode to nothing, so the rewards see
short strings; the rollout always runs the full ``--new-tokens`` (no EOS comes), which is the cost measured.

Weak scaling, as scaling.py: each rank gets ``--sft-rows`` rows and ``--prompts`` prompts per update, so the
global batches are ``N x`` those. Writes ``benchmarks/results/post_training_throughput.json``
(``...-smoke.json`` with ``--smoke``; ``--out`` elsewhere) after each N, with device, versions and command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from scaling import RESULTS, environment, run_under_torchrun, timed, worker_env  # benchmarks/ is sys.path[0]

FULL = {"hidden": 576, "layers": 30, "ffn": 1536, "heads": 9, "kv_heads": 3, "vocab": 49152}
SMOKE = {"hidden": 64, "layers": 2, "ffn": 256, "heads": 4, "kv_heads": 2, "vocab": 1024}
TOKENIZER_VOCAB = 1024
CHATML = (  # SmolLM2-135M-Instruct's chat template (tests/conftest.py holds the same for the test tokenizer)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOKE_PEAK_TFLOPS = 1.0  # a nominal CPU figure, so that the smoke exercises the MFU path


def chat_tokenizer(texts: list[str]):
    """A byte-level BPE of :data:`TOKENIZER_VOCAB` tokens trained on ``texts``, SmolLM2's specials (bos
    ``<|im_start|>`` = 1, eos and pad ``<|im_end|>`` = 2, unk ``<|endoftext|>`` = 0) and ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=CHATML,
    )  # fmt: skip


def build_model(shape: dict, max_len_tokens: int, device: torch.device) -> torch.nn.Module:
    """A random-init (seed 0) all-parent ``DeciLMForCausalLM`` of ``shape`` in float32 on ``device`` (what the
    stages' ``load_causal_lm`` gives for a Llama checkpoint)."""
    from train_throughput import llama_config, parent_config

    from nemoforge.models.hf.modeling_decilm import DeciLMForCausalLM

    torch.manual_seed(0)
    with device:
        return DeciLMForCausalLM(parent_config(llama_config(shape, max_len_tokens)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sft(args: argparse.Namespace, shape: dict, tokenizer, samples, device: torch.device, num_ranks: int) -> dict:
    """sft's training loop and objective for warmup + steps updates of ``num_ranks x --sft-rows`` rows."""
    from nemoforge.config import TokenTrainConfig
    from nemoforge.data.reasoning import encode_chat, pack_chats, to_signed_ids
    from nemoforge.stages.sft.stage import GlobalTokenMean
    from nemoforge.training.flops import peak_flops_per_s, training_flops_per_token
    from nemoforge.training.loop import epoch_batches, train

    ids_NT, mask_NT = pack_chats(
        [encode_chat(tokenizer, s, args.seq) for s in samples], seq_len_tokens=args.seq, pad_token_id=tokenizer.pad_token_id, seed=0
    )
    global_rows = num_ranks * args.sft_rows
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops_per_s(device)
    cfg = TokenTrainConfig(
        steps=args.warmup + args.steps, batch_size=global_rows, lr=1e-5, warmup_steps=1,
        checkpoint_every_steps=10**9, peak_flops_per_s=peak,
    )  # fmt: skip
    model = build_model(shape, args.seq, device)
    flops_per_token = training_flops_per_token(model.config, ids_NT.shape[1])
    objective = GlobalTokenMean(epoch_batches(to_signed_ids(ids_NT, mask_NT), global_rows, seed=0))
    with tempfile.TemporaryDirectory(prefix="nemoforge-bench-sft-") as tmp:
        state = train(
            model, objective.loss, objective.batches, cfg, seed=0, checkpoint_dir=Path(tmp), desc="sft",
            flops_per_token=flops_per_token, peak_flops_per_s=peak,
        )  # fmt: skip
    tokens_per_s = timed(state.history, "tokens_per_s", args.warmup)
    mfu = timed(state.history, "mfu", args.warmup) if "mfu" in state.history else []
    return {
        "global_batch_rows": global_rows,
        "row_tokens": ids_NT.shape[1],
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_token": flops_per_token,
        "peak_flops_per_s": peak,
        "tokens_per_s": statistics.median(tokens_per_s),
        "tokens_per_s_per_gpu": statistics.median(tokens_per_s) / num_ranks,
        "mfu": statistics.median(mfu) if mfu else None,
        "step_s": statistics.median(global_rows * ids_NT.shape[1] / v for v in tokens_per_s),
        "tokens_per_s_all_steps": tokens_per_s,
        "loss_first": state.history["loss"][0][1],
        "loss_last": state.history["loss"][-1][1],
    }


def grpo(args: argparse.Namespace, shape: dict, tokenizer, problems, device: torch.device, num_ranks: int) -> dict:
    """rl's GRPO phase (``generate`` engine) for warmup + steps updates of ``num_ranks x --prompts`` prompts."""
    from nemoforge.artifacts.local import LocalStore
    from nemoforge.config import Recipe
    from nemoforge.stages.rl import stage
    from nemoforge.training.distributed import mean_over_job

    global_prompts = num_ranks * args.prompts
    recipe = Recipe(
        name="bench",
        rl={"steps": args.warmup + args.steps, "batch_size": global_prompts, "num_generations": args.generations,
            "max_new_tokens": args.new_tokens, "lr": 2e-5, "beta": 0.05, "warmup_steps": 1,
            "reward_weights": {"accuracy": 1.0, "format": 1.0}, "train_modes": ["on"],
            "checkpoint_every_steps": 10**9, "rollout_engine": "generate"},
    )  # fmt: skip
    max_len_tokens = max(len(stage.encode_prompt(tokenizer, q, r)) for q, _, r in problems) + args.new_tokens
    model = build_model(shape, max_len_tokens, device)
    ref_model = build_model(shape, max_len_tokens, device).eval().requires_grad_(False)

    rollouts: list[tuple[float, int, int]] = []  # per rollout on this rank: (s, generated tokens, update tokens)
    generate_ids = stage.generate_ids

    def timed_generate_ids(model, tokenizer, prompt_ids, **kwargs):
        _sync(device)
        started = time.perf_counter()
        completion_ids = generate_ids(model, tokenizer, prompt_ids, **kwargs)
        _sync(device)
        # rollout_batch pads every sequence to the longest prompt + the longest completion
        width = max(map(len, prompt_ids)) + max(map(len, completion_ids))
        rollouts.append((time.perf_counter() - started, sum(map(len, completion_ids)), len(prompt_ids) * width))
        return completion_ids

    stage.generate_ids = timed_generate_ids  # make_grpo_loss calls it through the module, as tests/rl_ranks.py
    try:
        with tempfile.TemporaryDirectory(prefix="nemoforge-bench-rl-") as tmp:
            store = LocalStore(str(Path(tmp) / "store"))
            phase = stage.grpo_phase(
                model, tokenizer, problems, ref_model, recipe, "generate", store=store,
                checkpoints_uri=str(Path(tmp) / "store" / "checkpoints"), work=Path(tmp) / "work", on_log=None,
            )  # fmt: skip
    finally:
        stage.generate_ids = generate_ids
    history = phase.state.history
    step_s = [global_prompts / v for v in timed(history, "tokens_per_s", args.warmup)]  # the loop counts B x 1 ids
    steps = []
    for (s, generated, trained), whole_s in zip(rollouts[args.warmup :], step_s, strict=True):
        rollout_s = mean_over_job(s)  # a collective: every rank, the same steps, in order
        update_s = whole_s - rollout_s
        steps.append({
            "step_s": whole_s, "rollout_s": rollout_s, "update_s": update_s,
            "rollout_tokens_per_s": mean_over_job(float(generated)) * num_ranks / rollout_s,
            "update_tokens_per_s": mean_over_job(float(trained)) * num_ranks / update_s,
        })  # fmt: skip
    median = {name: statistics.median(step[name] for step in steps) for name in steps[0]}
    return {
        "global_prompts": global_prompts,
        "generations": args.generations,
        "max_new_tokens": args.new_tokens,
        "rollout_engine": phase.engine_tags["rollout_engine"],
        "mean_completion_tokens": statistics.median(timed(history, "completion_tokens", args.warmup)),
        **median,
        "rollout_fraction": median["rollout_s"] / median["step_s"],
        "steps": steps,
    }


def worker(args: argparse.Namespace) -> None:
    """One rank: sft, then GRPO, on fresh models; rank 0 writes both measurements to ``args.out``."""
    from nemoforge.config import ArithmeticTask
    from nemoforge.data.reasoning import arithmetic_problems, arithmetic_samples
    from nemoforge.runtime import compute_device
    from nemoforge.training import distributed

    ctx = distributed.init_from_env()
    num_ranks = ctx.world_size if ctx else 1
    shape = SMOKE if args.smoke else FULL
    device = compute_device()
    task = ArithmeticTask()
    # sft chats of 30 operations (200-520 tokens, the assistant's from ~200 on: rows as wide as --seq 512, as a
    # long-trace sft batch); the smoke's of 2 (70-100 tokens); the default task's short prompts for GRPO
    samples = arithmetic_samples(64, seed=0, num_steps=2 if args.smoke else 30, max_operand=999)
    problems = [
        (q, a, "on")
        for q, _, a in arithmetic_problems(64, seed=1, num_steps=task.num_steps, max_operand=task.max_operand)
    ]
    tokenizer = chat_tokenizer([f"{s.prompt}\n{s.response}" for s in samples] + [q for q, _, _ in problems])
    record = {
        "engine": distributed.engine_kind() if ctx else "single-process",
        "sft": sft(args, shape, tokenizer, samples, device, num_ranks),
        "grpo": grpo(args, shape, tokenizer, problems, device, num_ranks),
        "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    if ctx is None or ctx.is_main:
        Path(args.out).write_text(json.dumps(record))
    distributed.barrier()
    distributed.shutdown()


def driver(args: argparse.Namespace) -> None:
    """Run the workers for each N; print and write the report."""
    out_path = Path(args.out) if args.out else RESULTS / (
        "post_training_throughput-smoke.json" if args.smoke else "post_training_throughput.json"
    )
    env = worker_env(smoke=args.smoke, engine=args.engine)
    report: dict = environment([sys.executable, *sys.argv]) | {
        "shape": SMOKE if args.smoke else FULL,
        "precision": "fp32 weights + AdamW state, bf16 autocast" if torch.cuda.is_available() else "fp32",
        "sft_rows_per_rank": args.sft_rows,
        "seq_tokens": args.seq,
        "grpo_prompts_per_rank": args.prompts,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "complete": False,
        "runs": [],
    }
    worker_argv = [
        "--seq", str(args.seq), "--sft-rows", str(args.sft_rows), "--prompts", str(args.prompts),
        "--generations", str(args.generations), "--new-tokens", str(args.new_tokens), "--steps", str(args.steps),
        "--warmup", str(args.warmup), *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []),
        *(["--smoke"] if args.smoke else []),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="nemoforge-post-training-") as tmp:
        for i, nproc in enumerate(args.nproc):
            run = run_under_torchrun(__file__, nproc, worker_argv, env, Path(tmp))
            if "error" not in run:
                s, g = run["sft"], run["grpo"]
                mfu = f"MFU {s['mfu']:.3f}" if s["mfu"] is not None else "no MFU (unknown peak)"
                print(f"N={nproc} sft: {s['tokens_per_s']:.0f} tokens/s ({s['tokens_per_s_per_gpu']:.0f}/GPU), {mfu}")
                print(f"N={nproc} GRPO: step {g['step_s']:.2f} s = rollout {g['rollout_s']:.2f} s "
                      f"({g['rollout_tokens_per_s']:.0f} tokens/s) + update {g['update_s']:.2f} s "
                      f"({g['update_tokens_per_s']:.0f} tokens/s)")  # fmt: skip
            report["runs"].append(run)
            report["complete"] = i == len(args.nproc) - 1 and all("error" not in r for r in report["runs"])
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    if not report["complete"]:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", help="process (GPU) counts, e.g. 1 2 4 8 (default 1)")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes (default N: 1 2)")
    parser.add_argument("--seq", type=int, help="sft tokens per row at most (default 512; smoke 96)")
    parser.add_argument("--sft-rows", type=int, help="sft rows per rank per update (default 16; smoke 2)")
    parser.add_argument("--prompts", type=int, help="GRPO prompts per rank per update (default 16; smoke 1)")
    parser.add_argument("--generations", type=int, help="GRPO completions per prompt, G (default 8; smoke 2)")
    parser.add_argument("--new-tokens", type=int, help="GRPO tokens generated per completion (default 128; smoke 8)")
    parser.add_argument("--steps", type=int, help="timed updates of each (default 5; smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed updates first (default 2; smoke 1)")
    parser.add_argument("--peak-tflops", type=float, help=f"device peak for the MFU (default: the GPU's dense bf16 "
                        f"peak; smoke {SMOKE_PEAK_TFLOPS}, a nominal CPU figure)")  # fmt: skip
    parser.add_argument("--engine", choices=("ddp", "deepspeed"), help="force the engine (default: auto)")
    parser.add_argument("--out", help="the report's path (default benchmarks/results/...); in --worker, rank 0's")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    smoke = {"nproc": [1, 2], "seq": 96, "sft_rows": 2, "prompts": 1, "generations": 2, "new_tokens": 8, "steps": 2,
             "warmup": 1, "peak_tflops": SMOKE_PEAK_TFLOPS}  # fmt: skip
    full = {"nproc": [1], "seq": 512, "sft_rows": 16, "prompts": 16, "generations": 8, "new_tokens": 128, "steps": 5,
            "warmup": 2, "peak_tflops": None}  # fmt: skip
    for name, value in (smoke if args.smoke else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
