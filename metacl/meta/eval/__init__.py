"""The sequential meta-test protocol, batched LR sweeps and reports."""
