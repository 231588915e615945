"""fssdp: Fully Sharded Sparse Data Parallelism for Mixture-of-Experts training."""
