"""S3 shipping against a real moto server (marker ``s3``)."""
