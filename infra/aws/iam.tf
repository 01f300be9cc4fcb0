# IRSA role for nemoforge's pods (chart ServiceAccount, KFP pipeline runner): read/write the
# artifacts bucket and use its KMS key, nothing else. The chart's serviceAccount.annotations
# carry its ARN (output irsa_role_arn); annotate the pipeline runner's ServiceAccount the same way.
locals {
  workload_subjects = [for sa in var.workload_service_accounts : "system:serviceaccount:${sa}"]
}

data "aws_iam_policy_document" "workloads_assume" {
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.eks.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = local.workload_subjects
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "workloads" {
  statement {
    sid       = "ListArtifactsBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.artifacts.arn]
  }

  statement {
    sid = "ReadWriteArtifacts"
    actions = [
      "s3:GetObject", "s3:GetObjectVersion", "s3:PutObject", "s3:DeleteObject",
      "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.artifacts.arn}/*"]
  }

  statement {
    sid       = "ArtifactsKey"
    actions   = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [aws_kms_key.artifacts.arn]
  }
}

resource "aws_iam_role" "workloads" {
  name               = "${var.cluster_name}-workloads"
  assume_role_policy = data.aws_iam_policy_document.workloads_assume.json
}

resource "aws_iam_role_policy" "workloads" {
  name   = "artifacts-bucket"
  role   = aws_iam_role.workloads.id
  policy = data.aws_iam_policy_document.workloads.json
}
