"""Training: ``accumulate_gradients``, its losses over micro-batches, and the ranks of a
torch.distributed job kept in step."""
