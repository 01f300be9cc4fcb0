variable "region" {
  description = "AWS region. Pick one with the GPU instances you need (p5 = H100, p5e/p5en = H200)."
  type        = string
  default     = "us-east-1"
}

variable "cluster_name" {
  description = "EKS cluster name; also the prefix of every resource name and the Karpenter discovery tag."
  type        = string
  default     = "nemoforge"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.cluster_name))
    error_message = "cluster_name: lowercase letters, digits and dashes, 2-31 characters, starting with a letter."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version (the chart needs >= 1.29)."
  type        = string
  default     = "1.33"
}

variable "vpc_cidr" {
  description = "VPC CIDR; split into one public /24 and one private /20 per availability zone."
  type        = string
  default     = "10.42.0.0/16"
}

variable "az_count" {
  description = "Number of availability zones to span (2-4)."
  type        = number
  default     = 3

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 4
    error_message = "az_count must be between 2 and 4."
  }
}

variable "api_allowed_cidrs" {
  description = "CIDRs allowed to reach the public Kubernetes API endpoint. Narrow this to your office/VPN."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "system_node_group" {
  description = "The CPU system node group: Kubeflow Pipelines, MLflow, Karpenter, the GPU operator, CPU pipeline steps."
  type = object({
    instance_types = list(string)
    min_size       = number
    max_size       = number
    desired_size   = number
    disk_size_gib  = number
  })
  default = {
    instance_types = ["m7i.2xlarge"]
    min_size       = 2
    max_size       = 6
    desired_size   = 3
    disk_size_gib  = 100
  }
}

variable "gpu_node_groups" {
  description = <<-EOT
    Fixed-size EKS managed GPU node groups (the alternative to the Karpenter NodePools in
    infra/karpenter/). Each gets the taint nvidia.com/gpu=present:NoSchedule and the label
    nvidia.com/gpu.product=<gpu_product>, the label the recipes' node selectors use.
    Example: { h100 = { instance_types = ["p5.48xlarge"], gpu_product = "NVIDIA-H100-80GB-HBM3",
    min_size = 0, max_size = 2, desired_size = 1 } }
  EOT
  type = map(object({
    instance_types = list(string)
    gpu_product    = string
    min_size       = number
    max_size       = number
    desired_size   = number
    capacity_type  = optional(string, "ON_DEMAND")
    disk_size_gib  = optional(number, 500)
  }))
  default = {}

  validation {
    condition     = alltrue([for g in values(var.gpu_node_groups) : contains(["ON_DEMAND", "SPOT", "CAPACITY_BLOCK"], g.capacity_type)])
    error_message = "gpu_node_groups[*].capacity_type must be ON_DEMAND, SPOT or CAPACITY_BLOCK."
  }
}

variable "enable_karpenter" {
  description = "Create Karpenter's IAM roles, node access entry and interruption queue (GPU nodes on demand, scale to zero)."
  type        = bool
  default     = true
}

variable "karpenter_namespace" {
  description = "Namespace the Karpenter controller runs in (its IRSA trust names it)."
  type        = string
  default     = "kube-system"
}

variable "workload_service_accounts" {
  description = <<-EOT
    "namespace:name" of the ServiceAccounts that may assume the nemoforge workload role (S3 access
    to the artifacts bucket): the chart's own ServiceAccount (release name) and the account KFP runs
    pipeline tasks as (pipeline-runner in standalone KFP, default-editor in a multi-user profile).
  EOT
  type        = list(string)
  default     = ["kubeflow:nemoforge", "kubeflow:pipeline-runner"]

  validation {
    condition     = alltrue([for sa in var.workload_service_accounts : can(regex("^[a-z0-9-]+:[a-z0-9-]+$", sa))])
    error_message = "workload_service_accounts entries look like \"namespace:serviceaccount\"."
  }
}

variable "artifacts_noncurrent_version_days" {
  description = "Days an overwritten or deleted object version is kept in the artifacts bucket."
  type        = number
  default     = 30
}

variable "pipeline_root_expiration_days" {
  description = "Days before KFP's intermediate task artifacts (prefix kfp/) expire; 0 keeps them."
  type        = number
  default     = 90
}

variable "create_rds" {
  description = "Create an RDS PostgreSQL instance for MLflow's backend store (else: in-chart PostgreSQL or your own)."
  type        = bool
  default     = true
}

variable "rds" {
  description = "RDS PostgreSQL settings for MLflow."
  type = object({
    instance_class        = string
    engine_version        = string
    allocated_storage_gib = number
    max_storage_gib       = number
    multi_az              = bool
    deletion_protection   = bool
    backup_retention_days = number
  })
  default = {
    instance_class        = "db.t4g.medium"
    engine_version        = "17"
    allocated_storage_gib = 50
    max_storage_gib       = 500
    multi_az              = false
    deletion_protection   = true
    backup_retention_days = 7
  }
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}
