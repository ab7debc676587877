"""The run layer under both trainers (``rm train``, ``ppo``).

- `processes`: the run's processes on accelerate (`Processes.start`: the Accelerator, mixed precision off) and the
  collectives the trainers use (gather, sum, max, barrier, the flat gradient all-reduce of ``ppo``);
- `stats`: statistics summed by name (`NamedSums`: sums and weighted means, reduced over processes in one
  all-reduce of a float64 vector ordered by name; differing names between processes are an error);
- `optim`: the one optimizer (AdamW, weight decay on weights of >= 2 dimensions only) and learning-rate schedule;
- `sharding`: FSDP2 (``--fsdp``): the trained models sharded by ``fully_shard``, gathered weights for sampling and
  evaluation, the global-norm clip, DCP checkpoints of weights and optimizer states, the full model for the save.
"""
