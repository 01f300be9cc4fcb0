"""One component per pipeline step; all logic is in ``nemoforge.runner``."""

# No `from __future__ import annotations` here: KFP reads the parameter types at definition time.


from collections.abc import Callable

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output


def parent(recipe_json: str, run_name: str, parent_model: Output[Model]):
    """Open the MLflow parent run; convert the parent LlamaForCausalLM once into the artifact store."""
    import json

    from nemoforge.config import Recipe
    from nemoforge.runner import prepare_parent_step, user_errors

    with user_errors():
        ref = prepare_parent_step(Recipe.model_validate_json(recipe_json), run_name)
    parent_model.metadata.update(ref)
    with open(parent_model.path, "w") as f:
        json.dump(ref, f)


def corpus(recipe_json: str, parent_model: Input[Model], corpus: Output[Dataset]):
    """Read or sample the text corpus, tokenize, pack and split it."""
    import json

    from nemoforge.config import Recipe
    from nemoforge.runner import prepare_corpus_step, user_errors

    with user_errors():
        ref = prepare_corpus_step(Recipe.model_validate_json(recipe_json), dict(parent_model.metadata))
    corpus.metadata.update(ref)
    with open(corpus.path, "w") as f:
        json.dump(ref, f)


def nas(recipe_json: str, run_name: str, parent_model: Input[Model], corpus: Input[Dataset], model: Output[Model]):
    """Puzzle architecture search: block library, BLD, replace-1-block scores, MIP, child export."""
    import json

    from nemoforge.config import Recipe
    from nemoforge.runner import execute_stage, user_errors

    inputs = {"parent": dict(parent_model.metadata), "corpus": dict(corpus.metadata)}
    with user_errors():
        _, ref = execute_stage("nas", Recipe.model_validate_json(recipe_json), run_name, inputs)
    model.metadata.update(ref)
    with open(model.path, "w") as f:
        json.dump(ref, f)


def distill(
    recipe_json: str,
    run_name: str,
    parent_model: Input[Model],
    student_model: Input[Model],
    corpus: Input[Dataset],
    model: Output[Model],
):
    """Global knowledge distillation of the child from the parent (hidden cosine + logits KL)."""
    import json

    from nemoforge.config import Recipe
    from nemoforge.runner import execute_stage, user_errors

    inputs = {
        "parent": dict(parent_model.metadata),
        "model": dict(student_model.metadata),
        "corpus": dict(corpus.metadata),
    }
    with user_errors():
        _, ref = execute_stage("distill", Recipe.model_validate_json(recipe_json), run_name, inputs)
    model.metadata.update(ref)
    with open(model.path, "w") as f:
        json.dump(ref, f)


def cpt(recipe_json: str, run_name: str, input_model: Input[Model], corpus: Input[Dataset], model: Output[Model]):
    """Continued pretraining (causal-LM cross-entropy) on the corpus."""
    import json

    from nemoforge.config import Recipe
    from nemoforge.runner import execute_stage, user_errors

    inputs = {"model": dict(input_model.metadata), "corpus": dict(corpus.metadata)}
    with user_errors():
        _, ref = execute_stage("cpt", Recipe.model_validate_json(recipe_json), run_name, inputs)
    model.metadata.update(ref)
    with open(model.path, "w") as f:
        json.dump(ref, f)


def sft(recipe_json: str, run_name: str, input_model: Input[Model], model: Output[Model]):
    """Reasoning-toggle SFT ("detailed thinking on|off"): CE on assistant tokens of packed on/off chats."""
    import json

    from nemoforge.config import Recipe
    from nemoforge.runner import execute_stage, user_errors

    with user_errors():
        _, ref = execute_stage("sft", Recipe.model_validate_json(recipe_json), run_name, {"model": dict(input_model.metadata)})
    model.metadata.update(ref)
    with open(model.path, "w") as f:
        json.dump(ref, f)


def rl(recipe_json: str, run_name: str, input_model: Input[Model], model: Output[Model]):
    """GRPO with verifiable rewards (math-verify accuracy, think format), then optional DPO."""
    import json

    from nemoforge.config import Recipe
    from nemoforge.runner import execute_stage, user_errors

    with user_errors():
        _, ref = execute_stage("rl", Recipe.model_validate_json(recipe_json), run_name, {"model": dict(input_model.metadata)})
    model.metadata.update(ref)
    with open(model.path, "w") as f:
        json.dump(ref, f)


def eval(recipe_json: str, run_name: str, input_model: Input[Model], parent_model: Input[Model], model: Output[Model]):
    """Child vs parent evaluation; registers the model version (challenger; champion when the gate passes)."""
    import json

    from nemoforge.config import Recipe
    from nemoforge.runner import execute_stage, register_evaluated_model, user_errors

    recipe = Recipe.model_validate_json(recipe_json)
    inputs = {"model": dict(input_model.metadata), "parent": dict(parent_model.metadata)}
    with user_errors():
        result, _ = execute_stage("eval", recipe, run_name, inputs)
        ref = register_evaluated_model(recipe, run_name, result, inputs)
    model.metadata.update(ref)
    with open(model.path, "w") as f:
        json.dump(ref, f)


def serve(recipe_json: str, run_name: str, input_model: Input[Model], responses: Output[Artifact]):
    """Serve the final model with vLLM's OpenAI server, one chat per reasoning mode (TTFT, tokens/s), stop it."""
    import json

    from nemoforge.config import Recipe
    from nemoforge.runner import execute_stage, user_errors

    with user_errors():
        result, _ = execute_stage(
            "serve", Recipe.model_validate_json(recipe_json), run_name, {"model": dict(input_model.metadata)}
        )
    ref = {"uri": result.outputs["responses"], **{k: v for k, v in result.metrics.items() if k.startswith("ttft")}}
    responses.metadata.update(ref)
    with open(responses.path, "w") as f:
        json.dump(ref, f)


def distill_trainjob(
    recipe_json: str,
    run_name: str,
    image: str,
    parent_model: Input[Model],
    student_model: Input[Model],
    corpus: Input[Dataset],
    model: Output[Model],
):
    """distill on several GPUs/nodes: a Kubeflow Trainer TrainJob (torchrun) that this task creates and waits for."""
    import json

    from nemoforge.cluster.launcher import launch_stage
    from nemoforge.config import Recipe
    from nemoforge.runner import user_errors

    inputs = {
        "parent": dict(parent_model.metadata),
        "model": dict(student_model.metadata),
        "corpus": dict(corpus.metadata),
    }
    with user_errors():
        ref = launch_stage("distill", Recipe.model_validate_json(recipe_json), run_name, inputs, image)
    model.metadata.update(ref)
    with open(model.path, "w") as f:
        json.dump(ref, f)


def cpt_trainjob(
    recipe_json: str, run_name: str, image: str, input_model: Input[Model], corpus: Input[Dataset], model: Output[Model]
):
    """cpt on several GPUs/nodes: a Kubeflow Trainer TrainJob (torchrun) that this task creates and waits for."""
    import json

    from nemoforge.cluster.launcher import launch_stage
    from nemoforge.config import Recipe
    from nemoforge.runner import user_errors

    inputs = {"model": dict(input_model.metadata), "corpus": dict(corpus.metadata)}
    with user_errors():
        ref = launch_stage("cpt", Recipe.model_validate_json(recipe_json), run_name, inputs, image)
    model.metadata.update(ref)
    with open(model.path, "w") as f:
        json.dump(ref, f)


def finalize(recipe_json: str, run_name: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: close the MLflow parent run as FINISHED or FAILED."""
    from nemoforge.config import Recipe
    from nemoforge.runner import finalize_run

    finalize_run(Recipe.model_validate_json(recipe_json), run_name, status.state == "SUCCEEDED")


COMPONENT_FUNCS: dict[str, Callable] = {
    "parent": parent,
    "corpus": corpus,
    "nas": nas,
    "distill": distill,
    "cpt": cpt,
    "sft": sft,
    "rl": rl,
    "eval": eval,
    "serve": serve,
    "distill_trainjob": distill_trainjob,
    "cpt_trainjob": cpt_trainjob,
    "finalize": finalize,
}


def make_components(base_image: str) -> dict[str, Callable]:
    """The components bound to ``base_image`` (which must hold nemoforge; no pip install at run time)."""
    return {
        name: dsl.component(func, base_image=base_image, install_kfp_package=False)
        for name, func in COMPONENT_FUNCS.items()
    }
