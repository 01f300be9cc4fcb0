"""Served child vs served parent through vLLM's OpenAI API: TTFT and output tokens/s at concurrency 1 and 8.

    python benchmarks/serve_throughput.py [--parent DIR --child DIR] [--max-tokens 64] [--requests 8]

Without --parent/--child it exports SmolLM2-135M-Instruct twice (nemoforge.models.examples): the
all-parent nemotron-nas checkpoint and a heterogeneous child (2 no-op attentions, 2 FFNs narrowed
1536 -> 1024, 1 no-op FFN; untrained, so only its speed means anything). Each model gets its own
server (bf16, --enforce-eager, VLLM_CPU_KVCACHE_SPACE=2); one warm-up request, then --requests
streaming chat requests per concurrency level, each with exactly --max-tokens output tokens
(ignore_eos). Writes benchmarks/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nemoforge.serving.client import chat
from nemoforge.serving.engine import vllm_version
from nemoforge.serving.server import VLLMServer, free_port

RESULTS = Path(__file__).parent / "results"
PROMPT = "Explain in a few sentences why the sky is blue."


def _exports(cache: Path) -> tuple[Path, Path]:
    from nemoforge.config import ParentModel
    from nemoforge.models.examples import export_parent_and_child
    from nemoforge.models.parent import prepare_parent

    return export_parent_and_child(prepare_parent(ParentModel(), cache / "parent"), cache / "serve-exports")


def measure(
    model_dir: Path, name: str, *, concurrencies: list[int], requests: int, max_tokens: int, dtype: str
) -> dict:
    """Start a server on ``model_dir``, send the requests, stop it; per concurrency the timing summary."""
    out: dict = {"model_dir": str(model_dir)}
    with tempfile.TemporaryDirectory() as tmp:
        server = VLLMServer(model_dir, port=free_port(), served_model_name=name, log_path=Path(tmp) / "server.log",
                            max_model_len=1024, dtype=dtype)  # fmt: skip
        with server:
            send = lambda _: chat(server.base_url, name, PROMPT, max_tokens=max_tokens,  # noqa: E731
                                  extra={"ignore_eos": True, "min_tokens": max_tokens})  # fmt: skip
            send(0)  # warm-up
            for concurrency in concurrencies:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    results = list(pool.map(send, range(requests)))
                wall_s = time.perf_counter() - t0
                ttfts = sorted(r.ttft_s for r in results)
                out[f"concurrency_{concurrency}"] = {
                    "requests": requests,
                    "output_tokens": sum(r.output_tokens for r in results),
                    "ttft_s_median": statistics.median(ttfts),
                    "ttft_s_max": ttfts[-1],
                    "output_tokens_per_s_per_request": statistics.mean(
                        r.output_tokens_per_s for r in results
                    ),
                    "output_tokens_per_s_aggregate": sum(r.output_tokens for r in results) / wall_s,
                    "wall_s": wall_s,
                }
                print(name, concurrency, json.dumps(out[f"concurrency_{concurrency}"]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parent", type=Path, help="all-parent export (default: built from SmolLM2)")
    parser.add_argument("--child", type=Path, help="child export (default: built from SmolLM2)")
    parser.add_argument("--cache", type=Path, default=Path(".cache"), help="where the default exports go")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_throughput.json")
    args = parser.parse_args()

    parent, child = (args.parent, args.child) if args.parent and args.child else _exports(args.cache)
    kwargs = {
        "concurrencies": args.concurrency,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "dtype": args.dtype,
    }
    report = {
        "benchmark": "serve_throughput",
        "command": "python benchmarks/serve_throughput.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in (("max_tokens", args.max_tokens), ("requests", args.requests))
        ),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "vllm": vllm_version()},
        "prompt": PROMPT,
        "models": {
            "parent": measure(parent, "parent", **kwargs),
            "child": measure(child, "child", **kwargs),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
