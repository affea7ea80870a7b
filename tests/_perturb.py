"""A helper several test modules share: make a freshly initialised model's zero-initialised branches live."""
import torch


def perturb_(model, seed: int, scale: float = 0.05):
    """Add `scale` * N(0, 1) noise, drawn from one generator seeded with `seed`, to every parameter (in place);
    returns the model. Output layers start at zero in ADM-style nets, so without this many inputs would not
    reach the output and a test that an input matters could not fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model
