"""One file per op: argument checks, the torch.library custom op with its autograd, the torch baseline."""
