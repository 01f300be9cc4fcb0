# cp example.tfvars terraform.tfvars, then edit. Every variable has a default (variables.tf).
region       = "us-east-1"
cluster_name = "nemoforge"

# Narrow the public API endpoint to your network.
api_allowed_cidrs = ["203.0.113.0/24"]

# GPU nodes come from Karpenter (infra/karpenter/) by default. For fixed-size managed node
# groups instead (or as well), list them here:
# gpu_node_groups = {
#   h100 = { instance_types = ["p5.48xlarge"], gpu_product = "NVIDIA-H100-80GB-HBM3", min_size = 0, max_size = 2, desired_size = 1 }
#   h200 = { instance_types = ["p5e.48xlarge"], gpu_product = "NVIDIA-H200", min_size = 0, max_size = 2, desired_size = 0 }
# }

# The chart's ServiceAccount (release "nemoforge" in namespace "kubeflow") and the KFP runner.
workload_service_accounts = ["kubeflow:nemoforge", "kubeflow:pipeline-runner"]

create_rds = true
