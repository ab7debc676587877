"""The run layer under both trainers (``rm train``, ``ppo``).

- `optim`: the one optimizer (AdamW, weight decay on weights of >= 2 dimensions only) and learning-rate schedule.
"""
