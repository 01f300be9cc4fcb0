"""One component per pipeline step; all logic is in ``nemoforge.runner`` (through :mod:`nemoforge_components.adapter`)."""

# No `from __future__ import annotations` here: KFP reads the parameter types at definition time.


from collections.abc import Callable

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output


def check_inputs(recipe_json: str, run_name: str, force: bool) -> str:
    """First task: "skip" when the input digests equal the registered champion's lineage (and not force), else "run"."""
    from nemoforge.config import Recipe
    from nemoforge.runner.execute import user_errors
    from nemoforge.runner.retrain import check_inputs_step

    with user_errors():
        return check_inputs_step(Recipe.model_validate_json(recipe_json), run_name, force)


def parent(recipe_json: str, run_name: str, parent_model: Output[Model]):
    """Open the MLflow parent run; convert the parent LlamaForCausalLM once into the artifact store."""
    from nemoforge_components.adapter import run_task

    run_task("parent", recipe_json, run_name, {}, {"parent": parent_model})


def corpus(recipe_json: str, run_name: str, parent_model: Input[Model], corpus: Output[Dataset]):
    """Read or sample the text corpus, tokenize, pack and split it."""
    from nemoforge_components.adapter import run_task

    run_task("corpus", recipe_json, run_name, {"parent": parent_model}, {"corpus": corpus})


def nas(recipe_json: str, run_name: str, parent_model: Input[Model], corpus: Input[Dataset], model: Output[Model]):
    """Puzzle architecture search: block library, BLD, replace-1-block scores, MIP, child export."""
    from nemoforge_components.adapter import run_task

    run_task("nas", recipe_json, run_name, {"parent": parent_model, "corpus": corpus}, {"model": model})


def distill(
    recipe_json: str,
    run_name: str,
    parent_model: Input[Model],
    student_model: Input[Model],
    corpus: Input[Dataset],
    model: Output[Model],
):
    """Global knowledge distillation of the child from the parent (hidden cosine + logits KL)."""
    from nemoforge_components.adapter import run_task

    inputs = {"parent": parent_model, "model": student_model, "corpus": corpus}
    run_task("distill", recipe_json, run_name, inputs, {"model": model})


def cpt(recipe_json: str, run_name: str, input_model: Input[Model], corpus: Input[Dataset], model: Output[Model]):
    """Continued pretraining (causal-LM cross-entropy) on the corpus."""
    from nemoforge_components.adapter import run_task

    run_task("cpt", recipe_json, run_name, {"model": input_model, "corpus": corpus}, {"model": model})


def sft(recipe_json: str, run_name: str, input_model: Input[Model], model: Output[Model], data: Output[Dataset]):
    """Reasoning-toggle SFT ("detailed thinking on|off"): CE on assistant tokens of packed on/off chats; hands on
    its data split (the prompts it saw, its held-out chats) to rl and eval."""
    from nemoforge_components.adapter import run_task

    run_task("sft", recipe_json, run_name, {"model": input_model}, {"model": model, "data": data})


def rl(recipe_json: str, run_name: str, input_model: Input[Model], sft_data: Input[Dataset], model: Output[Model]):
    """GRPO with verifiable rewards (math-verify accuracy, think format), then optional DPO."""
    from nemoforge_components.adapter import run_task

    run_task("rl", recipe_json, run_name, {"model": input_model, "data": sft_data}, {"model": model})


def eval(
    recipe_json: str,
    run_name: str,
    input_model: Input[Model],
    parent_model: Input[Model],
    corpus: Input[Dataset],
    model: Output[Model],
    sft_data: Input[Dataset] = None,
):
    """Child vs parent evaluation (problems: data.math_eval_uri or sft's held-out split; the corpus's held-out
    text); registers the version (champion on a pass)."""
    from nemoforge_components.adapter import run_task

    inputs = {"model": input_model, "parent": parent_model, "corpus": corpus, "data": sft_data}
    run_task("eval", recipe_json, run_name, inputs, {"model": model})


def serve(recipe_json: str, run_name: str, input_model: Input[Model], responses: Output[Artifact]):
    """Serve the final model with vLLM's OpenAI server, one chat per reasoning mode (TTFT, tokens/s), stop it."""
    from nemoforge_components.adapter import run_task

    run_task("serve", recipe_json, run_name, {"model": input_model}, {"responses": responses})


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
    from nemoforge_components.adapter import launch_task

    inputs = {"parent": parent_model, "model": student_model, "corpus": corpus}
    launch_task("distill", recipe_json, run_name, image, inputs, {"model": model})


def cpt_trainjob(
    recipe_json: str, run_name: str, image: str, input_model: Input[Model], corpus: Input[Dataset], model: Output[Model]
):
    """cpt on several GPUs/nodes: a Kubeflow Trainer TrainJob (torchrun) that this task creates and waits for."""
    from nemoforge_components.adapter import launch_task

    launch_task("cpt", recipe_json, run_name, image, {"model": input_model, "corpus": corpus}, {"model": model})


def sft_trainjob(
    recipe_json: str, run_name: str, image: str, input_model: Input[Model], model: Output[Model], data: Output[Dataset]
):
    """sft on several GPUs/nodes: a Kubeflow Trainer TrainJob (torchrun) that this task creates and waits for; hands
    on its data split like the sft task."""
    from nemoforge_components.adapter import launch_task

    launch_task("sft", recipe_json, run_name, image, {"model": input_model}, {"model": model, "data": data})


def rl_trainjob(
    recipe_json: str, run_name: str, image: str, input_model: Input[Model], sft_data: Input[Dataset], model: Output[Model]
):
    """rl on several GPUs/nodes: a Kubeflow Trainer TrainJob (torchrun) that this task creates and waits for; reads
    sft's model and data split like the rl task."""
    from nemoforge_components.adapter import launch_task

    launch_task("rl", recipe_json, run_name, image, {"model": input_model, "data": sft_data}, {"model": model})


def finalize(recipe_json: str, run_name: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: close the MLflow parent run as FINISHED or FAILED."""
    from nemoforge.config import Recipe
    from nemoforge.runner.execute import finalize_run

    finalize_run(Recipe.model_validate_json(recipe_json), run_name, status.state == "SUCCEEDED")


COMPONENT_FUNCS: dict[str, Callable] = {
    "check_inputs": check_inputs,
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
    "sft_trainjob": sft_trainjob,
    "rl_trainjob": rl_trainjob,
    "finalize": finalize,
}


def make_components(base_image: str) -> dict[str, Callable]:
    """The components bound to ``base_image`` (which must hold nemoforge; no pip install at run time)."""
    return {
        name: dsl.component(func, base_image=base_image, install_kfp_package=False)
        for name, func in COMPONENT_FUNCS.items()
    }
