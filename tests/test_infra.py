"""infra/: the Karpenter manifests validate against the Karpenter CRDs and agree with the chart and
the Terraform; the Terraform is formatted, valid and plans as intended (terraform test, mocked AWS).

The Terraform checks need the `terraform` binary and the hashicorp/aws provider in a local mirror
(NEMOFORGE_TF_PLUGIN_DIR, default /opt/tf-plugins): the provider registry is not reachable here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
TERRAFORM_DIR = INFRA / "aws"
KARPENTER_DIR = INFRA / "karpenter"
CRDS = REPO.parent / "shared" / "schemas" / "crds"
PLUGIN_DIR = Path(os.environ.get("NEMOFORGE_TF_PLUGIN_DIR", "/opt/tf-plugins"))
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}

_spec = importlib.util.spec_from_file_location("nemoforge_chart_validate", REPO / "charts" / "validate.py")
chart_validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chart_validate)


def karpenter_objects() -> list[dict[str, Any]]:
    return chart_validate.objects([p.read_text() for p in sorted(KARPENTER_DIR.glob("*.yaml"))])


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in karpenter_objects() if o["kind"] == kind]


# ------------------------------------------------------------------------------------ Karpenter
@pytest.mark.parametrize(
    "ec2nodeclass_crd",
    ["karpenter-v1.14.1/karpenter.k8s.aws_ec2nodeclasses.yaml", "karpenter.k8s.aws_ec2nodeclasses.yaml"],
)
def test_karpenter_manifests_validate_against_crds(ec2nodeclass_crd: str) -> None:
    pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    files = {
        ("karpenter.sh/v1", "NodePool"): CRDS / "karpenter.sh_nodepools.yaml",
        ("karpenter.k8s.aws/v1", "EC2NodeClass"): CRDS / ec2nodeclass_crd,
    }
    if not all(path.is_file() for path in files.values()):
        pytest.skip(f"Karpenter CRDs not found under {CRDS}")
    validator = chart_validate.Validator(files)
    objs = karpenter_objects()
    assert {o["kind"] for o in objs} == {"NodePool", "EC2NodeClass"}
    problems = [p for obj in objs for p in validator.errors(obj)]
    assert not problems, "\n".join(problems)
    bad = {**of_kind("EC2NodeClass")[0], "spec": {**of_kind("EC2NodeClass")[0]["spec"], "amiSelector": []}}
    assert any("'amiSelector' was unexpected" in p for p in validator.errors(bad))


def test_gpu_nodepools_cover_h100_and_h200_with_taint_and_product_label() -> None:
    pools = {p["metadata"]["name"]: p for p in of_kind("NodePool")}
    assert set(pools) == {"gpu-h100", "gpu-h200"}
    products = {
        name: p["spec"]["template"]["metadata"]["labels"]["nvidia.com/gpu.product"]
        for name, p in pools.items()
    }
    assert products == {"gpu-h100": "NVIDIA-H100-80GB-HBM3", "gpu-h200": "NVIDIA-H200"}
    instance_types = {
        name: next(
            r["values"]
            for r in p["spec"]["template"]["spec"]["requirements"]
            if r["key"] == "node.kubernetes.io/instance-type"
        )
        for name, p in pools.items()
    }
    assert instance_types == {"gpu-h100": ["p5.48xlarge"], "gpu-h200": ["p5e.48xlarge", "p5en.48xlarge"]}
    (nodeclass,) = of_kind("EC2NodeClass")
    for pool in pools.values():
        spec = pool["spec"]["template"]["spec"]
        assert spec["taints"] == [GPU_TAINT]
        assert spec["nodeClassRef"] == {
            "group": "karpenter.k8s.aws",
            "kind": "EC2NodeClass",
            "name": nodeclass["metadata"]["name"],
        }
        assert pool["spec"]["disruption"]["consolidationPolicy"] == "WhenEmpty"  # never evict a running job
        assert "nvidia.com/gpu" in pool["spec"]["limits"]


def test_nodeclass_matches_the_terraform_names() -> None:
    (nodeclass,) = of_kind("EC2NodeClass")
    spec = nodeclass["spec"]
    tf = "\n".join(p.read_text() for p in TERRAFORM_DIR.glob("*.tf"))
    # infra/aws names the role "${var.cluster_name}-karpenter-node" and tags subnets and the
    # cluster security group karpenter.sh/discovery = cluster_name (default "nemoforge").
    assert '"${var.cluster_name}-karpenter-node"' in tf and spec["role"] == "nemoforge-karpenter-node"
    assert tf.count('"karpenter.sh/discovery"') >= 2
    for terms in (spec["subnetSelectorTerms"], spec["securityGroupSelectorTerms"]):
        assert terms == [{"tags": {"karpenter.sh/discovery": "nemoforge"}}]
    assert spec["metadataOptions"]["httpTokens"] == "required"
    assert spec["metadataOptions"]["httpPutResponseHopLimit"] == 1  # pods use IRSA, not the node's role


def test_chart_serving_defaults_schedule_onto_the_gpu_pools() -> None:
    values = yaml.safe_load((REPO / "charts" / "nemoforge" / "values.yaml").read_text())
    labels = [p["spec"]["template"]["metadata"]["labels"] for p in of_kind("NodePool")]
    selector = values["serving"]["nodeSelector"]
    assert any(selector.items() <= pool_labels.items() for pool_labels in labels)
    assert {**GPU_TAINT, "operator": "Equal"} in values["serving"]["tolerations"]


# ------------------------------------------------------------------------------------ Terraform
def terraform(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["terraform", *args, "-no-color"],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


needs_terraform = pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not installed")


@needs_terraform
def test_terraform_fmt() -> None:
    result = terraform("fmt", "-check", "-recursive", "-diff", cwd=INFRA)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_terraform
@pytest.mark.skipif(
    not (PLUGIN_DIR / "registry.terraform.io" / "hashicorp" / "aws").is_dir(),
    reason=f"no hashicorp/aws provider mirror at {PLUGIN_DIR} (set NEMOFORGE_TF_PLUGIN_DIR)",
)
def test_terraform_validates_and_plans(tmp_path: Path) -> None:
    """`terraform test` validates the configuration, then runs tests/plan.tftest.hcl: plans against
    a mocked AWS provider (its real schema), asserting on the planned resources and outputs."""
    work = tmp_path / "aws"
    shutil.copytree(TERRAFORM_DIR, work, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    env = {
        **os.environ,
        "TF_DATA_DIR": str(tmp_path / ".terraform"),
        "TF_IN_AUTOMATION": "1",
        "CHECKPOINT_DISABLE": "1",
    }
    init = terraform("init", "-backend=false", "-input=false", f"-plugin-dir={PLUGIN_DIR}", cwd=work, env=env)
    assert init.returncode == 0, init.stdout + init.stderr
    test = terraform("test", cwd=work, env=env)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "3 passed, 0 failed" in test.stdout, test.stdout
