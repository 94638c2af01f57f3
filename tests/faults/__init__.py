"""Fault injection: real processes killed (SIGKILL) and a real S3 server stopped at set points."""
