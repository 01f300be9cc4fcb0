output "region" {
  value = var.region
}

output "cluster_name" {
  value = aws_eks_cluster.this.name
}

output "kubeconfig_command" {
  description = "Writes a kubeconfig entry for the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${aws_eks_cluster.this.name}"
}

output "artifacts_bucket" {
  description = "The chart's storage.bucket."
  value       = aws_s3_bucket.artifacts.bucket
}

output "irsa_role_arn" {
  description = "The chart's serviceAccount.annotations.\"eks.amazonaws.com/role-arn\"; annotate the KFP pipeline runner's ServiceAccount with it too."
  value       = aws_iam_role.workloads.arn
}

output "mlflow_db_endpoint" {
  description = "host:port of the MLflow PostgreSQL (null without create_rds)."
  value       = var.create_rds ? aws_db_instance.mlflow[0].endpoint : null
}

output "mlflow_db_secret_arn" {
  description = "Secrets Manager secret with the RDS master username/password (build the chart's DSN Secret from it)."
  value       = var.create_rds ? aws_db_instance.mlflow[0].master_user_secret[0].secret_arn : null
}

output "karpenter" {
  description = "Values for the Karpenter Helm install and infra/karpenter/ (null without enable_karpenter)."
  value = var.enable_karpenter ? {
    controller_role_arn = aws_iam_role.karpenter_controller[0].arn
    node_role_name      = aws_iam_role.karpenter_node[0].name
    interruption_queue  = aws_sqs_queue.karpenter[0].name
    namespace           = var.karpenter_namespace
  } : null
}

output "chart_values" {
  description = "The infrastructure part of the nemoforge chart's values: terraform output -raw chart_values > infra-values.yaml"
  value = yamlencode({
    storage = {
      bucket = aws_s3_bucket.artifacts.bucket
      region = var.region
    }
    serviceAccount = {
      annotations = { "eks.amazonaws.com/role-arn" = aws_iam_role.workloads.arn }
    }
  })
}
