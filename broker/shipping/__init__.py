"""Copies off the bastion: recordings to S3 and audit events to CloudWatch Logs, from a spool."""
