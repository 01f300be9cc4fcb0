"""serve stage: start vLLM's OpenAI server on the model, one chat per reasoning mode, stop it.

The reasoning toggle of Llama-Nemotron is the system prompt ``detailed thinking on|off`` (LN §3);
nothing model-side changes. The stage records each answer with its reasoning (vLLM's ``reasoning`` field under
``serve.reasoning_parser``, or ``<think>...</think>`` split out of the content without one), TTFT (streaming)
and decode tokens/s, and always stops the server.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from nemoforge.artifacts.digests import digest_path
from nemoforge.artifacts.store import ArtifactStore
from nemoforge.config import Recipe
from nemoforge.serving.client import chat
from nemoforge.serving.engine import vllm_version
from nemoforge.serving.server import VLLMServer
from nemoforge.stages.result import StageResult

REASONING_MODES = {"on": "detailed thinking on", "off": "detailed thinking off"}


def run(recipe: Recipe, *, model_uri: str, output_uri: str, store: ArtifactStore) -> StageResult:
    """Serve ``model_uri`` with vLLM, send one chat request per reasoning mode, stop the server.

    Args:
        recipe: uses ``recipe.serve`` (port, dtype, max_model_len, ...) and ``recipe.model.name``.
        model_uri: the exported checkpoint (store URI or local directory).
        output_uri: where ``responses.json`` and ``server.log`` go.
        store: the artifact store.

    Returns:
        metrics ``server_startup_s``, ``ttft_s_{on,off}``, ``output_tokens_per_s_{on,off}``,
        ``output_tokens_{on,off}``; outputs ``model`` (the served model, unchanged) and ``responses``.

    Raises:
        InputNotFoundError: ``model_uri`` does not exist.
        ServeError: the port is in use, vLLM is missing, or it cannot load the model (no process is left).
    """
    cfg = recipe.serve
    out = output_uri.rstrip("/")  # a full URI already: store.join would nest it under the root
    model_dir = store.fetch(model_uri)
    with tempfile.TemporaryDirectory(prefix="nemoforge-serve-") as tmp:
        log_path = Path(tmp) / "server.log"
        server = VLLMServer.for_recipe(model_dir, recipe, log_path=log_path)
        try:
            server.start()
            startup_s = server.wait_ready()
            responses = {
                mode: chat(server.base_url, server.served_model_name, cfg.prompt, system_prompt=system, max_tokens=cfg.max_tokens)
                for mode, system in REASONING_MODES.items()
            }
        finally:
            server.stop()
            if log_path.is_file():
                store.put(log_path, f"{out}/server.log")
    responses_uri = store.write_json(
        f"{out}/responses.json", {mode: r.to_json() for mode, r in responses.items()}
    )
    metrics = {"server_startup_s": startup_s}
    for mode, r in responses.items():
        metrics[f"ttft_s_{mode}"] = r.ttft_s
        metrics[f"output_tokens_per_s_{mode}"] = r.output_tokens_per_s
        metrics[f"output_tokens_{mode}"] = float(r.output_tokens)
        metrics[f"reasoning_chars_{mode}"] = float(len(r.reasoning))
    return StageResult(
        metrics=metrics,
        outputs={"model": model_uri, "responses": responses_uri},
        digests={"model": digest_path(model_dir)},
        tags={"served_model_name": server.served_model_name, "vllm_version": vllm_version(), "serve_dtype": cfg.dtype},
    )
