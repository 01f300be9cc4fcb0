# `terraform test` plans the whole configuration against a mocked AWS provider (real provider
# schema, no AWS account, no network): expressions, for_each/count logic and variable
# validations are evaluated for real. Run from infra/aws: terraform init -backend=false && terraform test
mock_provider "aws" {
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
  mock_data "aws_availability_zones" {
    defaults = { names = ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"] }
  }
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\"Version\":\"2012-10-17\",\"Statement\":[]}" }
  }
}

# Known at plan time, so the chart_values output can be checked.
override_resource {
  target          = aws_iam_role.workloads
  override_during = plan
  values = {
    arn = "arn:aws:iam::123456789012:role/nemoforge-workloads"
  }
}

run "defaults" {
  command = plan

  assert {
    condition     = length(aws_subnet.private) == 3 && length(aws_subnet.public) == 3
    error_message = "one public and one private subnet per availability zone"
  }
  assert {
    condition     = aws_subnet.private[0].tags["karpenter.sh/discovery"] == "nemoforge"
    error_message = "private subnets carry the Karpenter discovery tag"
  }
  assert {
    condition     = aws_s3_bucket.artifacts.bucket == "nemoforge-artifacts-123456789012-us-east-1"
    error_message = "artifacts bucket name"
  }
  assert {
    condition     = aws_s3_bucket_versioning.this["artifacts"].versioning_configuration[0].status == "Enabled"
    error_message = "artifacts bucket is versioned"
  }
  assert {
    condition     = one(aws_s3_bucket_server_side_encryption_configuration.artifacts.rule).apply_server_side_encryption_by_default[0].sse_algorithm == "aws:kms"
    error_message = "artifacts bucket is KMS-encrypted"
  }
  assert {
    condition     = length(aws_s3_bucket_lifecycle_configuration.artifacts.rule) == 3
    error_message = "artifacts bucket lifecycle rules"
  }
  assert {
    condition     = length(aws_eks_node_group.gpu) == 0 && length(aws_iam_role.karpenter_controller) == 1
    error_message = "by default GPU nodes come from Karpenter, not managed node groups"
  }
  assert {
    condition     = length(aws_cloudwatch_event_rule.karpenter) == 4
    error_message = "Karpenter interruption events"
  }
  assert {
    condition     = length(aws_db_instance.mlflow) == 1 && aws_db_instance.mlflow[0].manage_master_user_password
    error_message = "RDS for MLflow with a Secrets Manager-managed password"
  }
  assert {
    condition = yamldecode(output.chart_values) == {
      storage        = { bucket = "nemoforge-artifacts-123456789012-us-east-1", region = "us-east-1" }
      serviceAccount = { annotations = { "eks.amazonaws.com/role-arn" = "arn:aws:iam::123456789012:role/nemoforge-workloads" } }
    }
    error_message = "chart_values feeds the bucket, region and IRSA role to the chart"
  }
}

run "gpu_node_groups_without_karpenter_or_rds" {
  command = plan

  variables {
    enable_karpenter = false
    create_rds       = false
    gpu_node_groups = {
      h100 = { instance_types = ["p5.48xlarge"], gpu_product = "NVIDIA-H100-80GB-HBM3", min_size = 0, max_size = 2, desired_size = 1 }
      h200 = { instance_types = ["p5e.48xlarge"], gpu_product = "NVIDIA-H200", min_size = 0, max_size = 2, desired_size = 0 }
    }
  }

  assert {
    condition = alltrue([for g in aws_eks_node_group.gpu : (
      one(g.taint).key == "nvidia.com/gpu" && one(g.taint).value == "present" && one(g.taint).effect == "NO_SCHEDULE"
    )])
    error_message = "every GPU node group is tainted nvidia.com/gpu=present:NoSchedule"
  }
  assert {
    condition     = aws_eks_node_group.gpu["h200"].labels["nvidia.com/gpu.product"] == "NVIDIA-H200"
    error_message = "GPU node groups carry the label the recipes select on"
  }
  assert {
    condition     = aws_eks_node_group.gpu["h100"].ami_type == "AL2023_x86_64_NVIDIA"
    error_message = "GPU node groups use the NVIDIA AMI"
  }
  assert {
    condition     = length(aws_iam_role.karpenter_controller) == 0 && length(aws_db_instance.mlflow) == 0
    error_message = "Karpenter and RDS are off"
  }
  assert {
    condition     = output.mlflow_db_endpoint == null && output.karpenter == null
    error_message = "outputs are null when their parts are off"
  }
}

run "rejects_a_bad_service_account" {
  command = plan

  variables {
    workload_service_accounts = ["nemoforge"]
  }

  expect_failures = [var.workload_service_accounts]
}
