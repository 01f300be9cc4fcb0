"""Render the nemoforge chart offline and validate every object it produces.

No helm binary and no cluster: ``helm-python-sdk`` (Helm v4's Go SDK behind ctypes) renders the
chart and enforces ``values.schema.json`` exactly as ``helm install`` does; Kubernetes core objects
are checked with ``kubernetes-validate`` in strict mode (unknown fields are errors); custom
resources (KServe InferenceService, Trainer TrainJob, Karpenter NodePool/EC2NodeClass) are checked
against the ``openAPIV3Schema`` of their CRD's served version, made strict the way the API server's
strict field validation is (a field not in the schema is an error).

    python charts/validate.py -f charts/nemoforge/ci/full-values.yaml
    python charts/validate.py -f my-values.yaml --set serving.enabled=true --namespace kubeflow --show
    python charts/validate.py --manifests infra/karpenter/*.yaml --crd-schema karpenter.k8s.aws/v1/EC2NodeClass=\
../shared/schemas/crds/karpenter-v1.14.1/karpenter.k8s.aws_ec2nodeclasses.yaml

Needs: pip install helm-python-sdk kubernetes-validate jsonschema pyyaml
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
CHART_DIR = REPO / "charts" / "nemoforge"
CRD_DIR = REPO.parent / "shared" / "schemas" / "crds"
# The chart's kubeVersion floor and the newest release kubernetes-validate knows.
KUBE_VERSIONS = ("1.29", "1.37")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the KServe CRD is 1.9 MB of YAML


def render(
    values: dict[str, Any] | None = None,
    *,
    chart_dir: Path = CHART_DIR,
    name: str = "nemoforge",
    namespace: str = "kubeflow",
    upgrade: bool = False,
) -> dict[str, str]:
    """Render the chart as ``helm install`` (or ``helm upgrade``) would; template path -> text.

    Raises:
        helm_python.HelmValuesError: the values break ``values.schema.json`` (message names the key).
        helm_python.HelmRenderError: a template failed (``required``/``fail`` messages included).
    """
    import helm_python as helm

    with helm.Chart.load(str(chart_dir)) as chart:
        return chart.render(
            values or {}, name=name, namespace=namespace, is_install=not upgrade, is_upgrade=upgrade
        )


def objects(manifests: dict[str, str] | Iterable[str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in rendered templates or YAML texts (NOTES.txt and empty documents skipped)."""
    texts = (
        [text for path, text in manifests.items() if not path.endswith("NOTES.txt")]
        if isinstance(manifests, dict)
        else list(manifests)
    )
    return [doc for text in texts for doc in yaml.load_all(text, Loader=_Loader) if doc]


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD schema where objects with declared properties reject undeclared ones.

    Structural CRD schemas leave ``additionalProperties`` unset and rely on the API server to
    prune or (with strict field validation) reject unknown fields; plain JSON Schema would accept
    them silently. Nodes marked ``x-kubernetes-preserve-unknown-fields`` stay open.
    """
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    # metadata is typed `object` in CRDs; the API server checks ObjectMeta itself.
    if "metadata" in schema.get("properties", {}):
        schema["properties"]["metadata"] = {"type": "object"}
    return schema


def load_crd(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(apiVersion, kind): strict openAPIV3Schema}`` for the served versions of one CRD file."""
    crd = yaml.load(path.read_text(), Loader=_Loader)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    return {
        (f"{group}/{version['name']}", kind): strict_schema(version["schema"]["openAPIV3Schema"])
        for version in crd["spec"]["versions"]
        if version.get("served")
    }


class Validator:
    """Validates objects: core kinds with kubernetes-validate, custom resources with CRD schemas.

    CRD files are read lazily, the first time an object of their kind turns up.

    Args:
        crd_files: CRD YAML files, by ``(apiVersion, kind)``.
        kube_versions: Kubernetes versions every core object must validate against.
    """

    def __init__(
        self,
        crd_files: dict[tuple[str, str], Path],
        kube_versions: Iterable[str] = KUBE_VERSIONS,
    ) -> None:
        self.crd_files = crd_files
        self.kube_versions = tuple(kube_versions)
        self._schemas: dict[tuple[str, str], dict[str, Any]] = {}

    def crd_schema(self, api_version: str, kind: str) -> dict[str, Any] | None:
        key = (api_version, kind)
        if key not in self._schemas and key in self.crd_files:
            self._schemas.update(load_crd(self.crd_files[key]))
        return self._schemas.get(key)

    def errors(self, obj: dict[str, Any]) -> list[str]:
        """Problems with one object, each as ``Kind/name: path: message``; empty when valid."""
        import kubernetes_validate as kv

        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        schema = self.crd_schema(obj.get("apiVersion", ""), obj.get("kind", ""))
        if schema is not None:
            validator = jsonschema.Draft7Validator(schema)
            return [
                f"{where}: {'.'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}"
                for err in validator.iter_errors(obj)
            ]
        problems = []
        for version in self.kube_versions:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as err:
                path = ".".join(map(str, err.path)) or "<root>"
                problems.append(f"{where}: {path}: {err.message} (Kubernetes {version})")
            except kv.SchemaNotFoundError as err:
                problems.append(f"{where}: no schema: {err.message}; give its CRD")
                break
        return problems


def default_crd_files(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], Path]:
    """The CRDs in ``shared/schemas/crds``; Karpenter's EC2NodeClass from the v1.14.1 release.

    Its release schema keeps the structured ``spec.kubelet`` that v1.14.x clusters enforce
    (shared/schemas/SOURCE.md).
    """
    files = {
        ("serving.kserve.io/v1beta1", "InferenceService"): "serving.kserve.io_inferenceservices.yaml",
        ("serving.kserve.io/v1alpha1", "ServingRuntime"): "serving.kserve.io_servingruntimes.yaml",
        ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
        ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime"): "trainer.kubeflow.org_trainingruntimes.yaml",
        ("karpenter.sh/v1", "NodePool"): "karpenter.sh_nodepools.yaml",
        ("karpenter.k8s.aws/v1", "EC2NodeClass"): "karpenter-v1.14.1/karpenter.k8s.aws_ec2nodeclasses.yaml",
    }
    return {key: crd_dir / name for key, name in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-f", "--values", type=Path, action="append", default=[], help="values file (repeatable)"
    )
    parser.add_argument(
        "--manifests", type=Path, nargs="*", default=[], help="validate these YAML files, no render"
    )
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE as helm --set")
    parser.add_argument("--name", default="nemoforge", help="release name (%(default)s)")
    parser.add_argument("--namespace", default="kubeflow", help="release namespace (%(default)s)")
    parser.add_argument(
        "--kube-version", action="append", help=f"Kubernetes version(s) (default {KUBE_VERSIONS})"
    )
    parser.add_argument("--crd-dir", type=Path, default=CRD_DIR, help="CRD folder (%(default)s)")
    parser.add_argument(
        "--crd-schema",
        action="append",
        default=[],
        metavar="GROUP/VERSION/KIND=FILE",
        help="use this CRD file for a kind (repeatable)",
    )
    parser.add_argument("--show", action="store_true", help="print the rendered manifests")
    args = parser.parse_args(argv)

    if not args.crd_dir.is_dir():
        parser.error(
            f"--crd-dir {args.crd_dir}: no such folder; point it at the CRDs of shared/schemas/crds "
            "(the default is ../shared/schemas/crds beside the checkout)"
        )
    crd_files = default_crd_files(args.crd_dir)
    for spec in args.crd_schema:
        gvk, _, file = spec.partition("=")
        api_version, _, kind = gvk.rpartition("/")
        crd_files[(api_version, kind)] = Path(file)
    validator = Validator(crd_files, args.kube_version or KUBE_VERSIONS)

    if args.manifests:
        docs = objects([path.read_text() for path in args.manifests])
    else:
        import helm_python as helm

        values: dict[str, Any] = {}
        for path in args.values:
            values = _deep_merge(values, yaml.safe_load(path.read_text()) or {})
        for expression in args.sets:
            values = _deep_merge(values, helm.parse_set_string(expression))

        try:
            manifests = render(values, name=args.name, namespace=args.namespace)
        except helm.HelmError as err:  # schema violations and template failures, in Helm's words
            print(f"render failed: {err}", file=sys.stderr)
            return 1
        if args.show:
            for path in sorted(manifests):
                if manifests[path].strip():
                    print(f"# Source: {path}\n{manifests[path].strip()}\n---")
        docs = objects(manifests)

    problems = [problem for doc in docs for problem in validator.errors(doc)]
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"{len(docs)} objects, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge values files the way repeated ``-f`` does (maps merge, everything else replaces)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


if __name__ == "__main__":
    sys.exit(main())
