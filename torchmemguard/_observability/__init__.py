"""What the package reports: Prometheus metrics and collectors (``prometheus_client``),
the post-mortem record of an unrecovered OOM, and allocator snapshots."""
