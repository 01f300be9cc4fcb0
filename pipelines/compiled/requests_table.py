"""Print, as a Markdown table, what each task of the checked-in compiled pipelines requests on the cluster.

    .venv/bin/python pipelines/compiled/requests_table.py            # every pipelines/compiled/*.yaml

Read from the compiled YAML (what KFP will create), plus, for launcher tasks, the TrainJob pods that the
launcher creates from the recipe (nemoforge.cluster.trainjob).
"""

from pathlib import Path

import yaml

from nemoforge.config import STAGES, load_recipe

HERE = Path(__file__).parent


def rows(path: Path):
    ir, *platform = yaml.safe_load_all(path.read_text())
    kube = platform[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if platform else {}
    recipe = load_recipe(path.stem)
    tasks, dags = {}, [ir["root"]["dag"]]  # the root DAG, the exit handler's, the condition's
    while dags:
        for name, task in dags.pop(0)["tasks"].items():
            component = ir["components"][task["componentRef"]["name"]]
            if "dag" in component:
                dags.append(component["dag"])
            else:
                tasks[name] = task
    order = ["check-inputs", "parent", "corpus", *STAGES, "finalize"]
    for name, task in sorted(tasks.items(), key=lambda item: order.index(item[0].removesuffix("-trainjob"))):
        component = ir["components"][task["componentRef"]["name"]]
        label = component["executorLabel"]
        res = ir["deploymentSpec"]["executors"][label]["container"]["resources"]
        k8s = kube.get(label, {})
        gpu = res.get("accelerator", {})
        selector = ",".join(f"{k}={v}" for k, v in k8s.get("nodeSelector", {}).get("labels", {}).items())
        tolerations = ",".join(f"{t['key']}:{t.get('effect', '')}" for t in k8s.get("tolerations", []))
        yield (path.stem, name, "1 pod", res["resourceCpuRequest"], res["resourceMemoryRequest"],
               f"{gpu['resourceCount']} x {gpu['resourceType']}" if gpu else "-", selector or "-", tolerations or "-",
               str(task.get("retryPolicy", {}).get("maxRetryCount", 0)))
        if name.endswith("-trainjob"):
            stage = getattr(recipe.resources, name.removesuffix("-trainjob"))
            yield (path.stem, f"↳ TrainJob `{name.removesuffix('-trainjob')}`",
                   f"{stage.num_nodes} pods x {max(stage.gpu_count, 1)} procs", stage.cpu, stage.memory,
                   f"{stage.gpu_count} x {stage.accelerator_type}" if stage.gpu_count else "-",
                   ",".join(f"{k}={v}" for k, v in stage.node_selector.items()) or "-",
                   ",".join(f"{t.key}:{t.effect or ''}" for t in stage.tolerations) or "-",
                   f"ZeRO-{stage.deepspeed.zero_stage}")


def main() -> None:
    print("| recipe | task | pods | CPU (req=limit) | memory (req=limit) | GPU per pod | node selector | tolerations | retries / ZeRO |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(HERE.glob("*.yaml")):
        for row in rows(path):
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
