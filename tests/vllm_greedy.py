"""Greedy decoding through stock vLLM, and parity with ours (recipe.md §3.7 step 5), for the tests.

The engine runs in a child process (``_vllm_greedy_main.py`` beside this file), so the caller never imports
vLLM and gets all of its memory back when the call returns.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nemoforge.errors import NemoforgeError
from nemoforge.models.convert import load_causal_lm
from nemoforge.models.generate import generate
from nemoforge.models.remote_code import verify_remote_code
from nemoforge.serving.engine import vllm_env, vllm_python

_CHILD = Path(__file__).with_name("_vllm_greedy_main.py")


@dataclass(frozen=True)
class GreedyOutput:
    """Per prompt: the new token ids and the logprob of each (nats)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


def vllm_greedy(
    model_dir: str | Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    dtype: str = "float32",
    max_model_len: int = 512,
    timeout_s: float = 900,
) -> GreedyOutput:
    """Greedy-decode ``max_new_tokens`` tokens (EOS ignored) after each prompt with vLLM's ``LLM``.

    Args:
        model_dir: a checkpoint directory (a nemotron-nas export is loaded with trust_remote_code).
        prompts: token ids per prompt.
        max_new_tokens: tokens generated per prompt.
        dtype: ``float32`` for parity checks (bf16 rounding changes argmax ties), ``bfloat16`` for speed.
        max_model_len: context length the engine reserves for.
        timeout_s: seconds before the child is killed.

    Raises:
        NemoforgeError: the checkpoint's Python files are not the ones this nemoforge ships (checked before vLLM
            runs them), or vLLM failed to load or run the model; the message carries its last log lines.
    """
    verify_remote_code(model_dir)
    with tempfile.TemporaryDirectory(prefix="nemoforge-greedy-") as tmp:
        request, result = Path(tmp, "request.json"), Path(tmp, "result.json")
        request.write_text(
            json.dumps(
                {
                    "model": str(model_dir),
                    "dtype": dtype,
                    "max_model_len": max_model_len,
                    "max_new_tokens": max_new_tokens,
                    "prompts": [list(map(int, p)) for p in prompts],
                }
            )
        )
        proc = subprocess.run(
            [vllm_python(), str(_CHILD), str(request), str(result)],
            capture_output=True,
            text=True,
            env=vllm_env(),
            timeout=timeout_s,
            cwd=tmp,
        )
        if proc.returncode != 0 or not result.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise NemoforgeError(f"vLLM could not decode with {model_dir} (exit {proc.returncode}):\n{tail}")
        data = json.loads(result.read_text())
    return GreedyOutput(tokens=data["tokens"], logprobs=data["logprobs"])


@dataclass(frozen=True)
class ParityReport:
    """Greedy tokens per prompt from nemoforge's model and vLLM; ``matches`` counts equal sequences."""

    ours: list[list[int]]
    vllm: list[list[int]]

    @property
    def matches(self) -> int:
        return sum(a == b for a, b in zip(self.ours, self.vllm, strict=True))

    def first_mismatch(self) -> str | None:
        for k, (a, b) in enumerate(zip(self.ours, self.vllm, strict=True)):
            if a != b:
                pos = next(i for i, (x, y) in enumerate(zip(a + [None], b + [None], strict=False)) if x != y)
                return f"prompt {k}: token {pos}: ours {a[pos : pos + 4]} vs vLLM {b[pos : pos + 4]}"
        return None


def greedy_parity(
    export_dir: Path, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, dtype: str = "float32"
) -> ParityReport:
    """Greedy-decode ``prompts`` with our ``DeciLMForCausalLM`` and with vLLM on the same export (EOS ignored)."""
    torch_dtype = getattr(torch, dtype)
    model = load_causal_lm(export_dir, dtype=torch_dtype)
    ours = []
    for ids in prompts:
        ids_BT = torch.tensor([list(ids)], dtype=torch.long)
        out_BT = generate(model, ids_BT, max_new_tokens, temperature=0.0, eos_token_id=None)
        ours.append(out_BT[0, len(ids) :].tolist())
    del model
    return ParityReport(ours=ours, vllm=vllm_greedy(export_dir, prompts, max_new_tokens, dtype=dtype).tokens)
