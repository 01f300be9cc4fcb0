"""``nemoforge serve``: a model (a directory, a store URI or a registry alias) behind vLLM's OpenAI server
until Ctrl-C or SIGTERM, or its KServe/Deployment manifests (--emit)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from nemoforge.config import load_recipe
from nemoforge.errors import NemoforgeError


def cmd_serve(args: argparse.Namespace) -> int:
    from nemoforge.artifacts import store_for
    from nemoforge.serving import manifests
    from nemoforge.serving.server import VLLMServer
    from nemoforge.signals import interrupt_on_signals

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    recipe = load_recipe(args.recipe, args.overrides)
    model_uri = args.model_uri
    if model_uri.startswith("models:/"):
        from nemoforge import lineage
        from nemoforge.preflight import resolve_recipe

        workdir = args.workdir.expanduser().resolve()
        resolved = resolve_recipe(recipe, workdir)  # the artifact root: the recipe's, else <workdir>/artifacts
        tracking_uri = args.tracking_uri or recipe.tracking.mlflow_uri
        if tracking_uri is None:
            if not (workdir / "mlflow.db").is_file():  # opening it would create an empty registry
                raise NemoforgeError(
                    f"{model_uri}: no registry under --workdir {args.workdir} (no mlflow.db): run "
                    f"`nemoforge run RECIPE --workdir {args.workdir}` first, or pass --tracking-uri"
                )
            tracking_uri = resolved.tracking.mlflow_uri
        registry = lineage.Registry(tracking_uri, resolved.storage.artifact_root)
        model_uri = registry.registered_model_source(model_uri)
    if args.emit:
        from nemoforge_components.images import image_ref

        if args.emit == "kserve":
            objects = [manifests.inferenceservice(recipe, model_uri, image=image_ref("serve"))]
        else:
            objects = manifests.deployment(recipe, model_uri, image=image_ref("serve"))
        text = manifests.to_yaml(objects)
        if args.output:
            args.output.write_text(text)
            print(f"wrote {', '.join(o['kind'] for o in objects)} to {args.output}", file=sys.stderr)
        else:
            print(text, end="")
        return 0
    model_dir = store_for(recipe, model_uri).fetch(model_uri)
    log_path = args.workdir.expanduser().resolve() / "serve" / f"server-{int(time.time())}.log"
    server = VLLMServer.for_recipe(model_dir, recipe, log_path=log_path, port=args.port)
    server.check()  # the model and the port first: the parser check takes ~7 s
    if recipe.serve.reasoning_parser:
        from nemoforge.serving.engine import check_reasoning_parser

        check_reasoning_parser(recipe.serve.reasoning_parser, str(model_dir))
    # SIGTERM (Kubernetes, systemd) stops it as Ctrl-C does: vLLM runs in its own session, so only we can stop it.
    with interrupt_on_signals():
        try:
            server.start()  # checks first (checkpoint, remote code, port, vLLM): a refusal is one line
            print(f"starting vLLM on {model_dir} (log: {log_path})", file=sys.stderr, flush=True)
            ready_s = server.wait_ready()
            print(
                f"serving {server.served_model_name} at {server.base_url}/v1 (ready in {ready_s:.0f} s); "
                "Ctrl-C or SIGTERM stops it",
                file=sys.stderr,
                flush=True,
            )
            code = server.process.wait()
            raise NemoforgeError(f"vLLM exited with code {code} (log: {log_path})")
        except KeyboardInterrupt:
            print("stopping vLLM", file=sys.stderr)
            return 0
        finally:
            server.stop()
