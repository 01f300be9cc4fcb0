# Optional PostgreSQL for MLflow's backend store. RDS manages the master (admin) password in
# Secrets Manager (output mlflow_db_secret_arn) and rotates it: it never appears in Terraform code,
# variables or state. MLflow logs in as its own role (docs/install.md creates it), so a rotation
# of the admin password does not break the server.
locals {
  rds = var.create_rds ? 1 : 0
}

resource "aws_db_subnet_group" "mlflow" {
  count      = local.rds
  name       = "${var.cluster_name}-mlflow"
  subnet_ids = aws_subnet.private[*].id
}

resource "aws_security_group" "mlflow_db" {
  count       = local.rds
  name        = "${var.cluster_name}-mlflow-db"
  description = "PostgreSQL for MLflow, reachable from the cluster's nodes only"
  vpc_id      = aws_vpc.this.id
  tags        = { Name = "${var.cluster_name}-mlflow-db" }
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_db" {
  count                        = local.rds
  security_group_id            = aws_security_group.mlflow_db[0].id
  description                  = "PostgreSQL from EKS nodes (cluster security group)"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

resource "aws_db_instance" "mlflow" {
  count      = local.rds
  identifier = "${var.cluster_name}-mlflow"

  engine                     = "postgres"
  engine_version             = var.rds.engine_version
  auto_minor_version_upgrade = true
  instance_class             = var.rds.instance_class
  allocated_storage          = var.rds.allocated_storage_gib
  max_allocated_storage      = var.rds.max_storage_gib
  storage_type               = "gp3"
  storage_encrypted          = true

  db_name                     = "mlflow"
  username                    = "mlflow_admin"
  manage_master_user_password = true

  db_subnet_group_name   = aws_db_subnet_group.mlflow[0].name
  vpc_security_group_ids = [aws_security_group.mlflow_db[0].id]
  publicly_accessible    = false
  multi_az               = var.rds.multi_az

  backup_retention_period   = var.rds.backup_retention_days
  copy_tags_to_snapshot     = true
  deletion_protection       = var.rds.deletion_protection
  skip_final_snapshot       = false
  final_snapshot_identifier = "${var.cluster_name}-mlflow-final"
}
