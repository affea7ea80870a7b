"""Helpers several test modules share."""
import torch
import torch.nn.functional as F


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b=4, side=12, seed=0):
    """Smooth-ish images in [-1, 1] `[b, 3, side, side]` (blocky, so blur and resize change them)."""
    x = torch.rand(b, 3, side // 3, side // 3, generator=gen(seed)) * 2 - 1
    return F.interpolate(x, size=side, mode="nearest")


def perturb_(model, seed: int, scale: float = 0.05):
    """Make a freshly initialised model's zero-initialised branches live: add `scale` * N(0, 1) noise, drawn from one generator seeded with `seed`, to every parameter (in place);
    returns the model. Output layers start at zero in ADM-style nets, so without this many inputs would not
    reach the output and a test that an input matters could not fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model
