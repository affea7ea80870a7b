"""unclip_mini: a notebook-first, runnable reference of unCLIP (DALL-E 2).

Ramesh, Dhariwal, Nichol, Chu, Chen (2022), "Hierarchical Text-Conditional Image Generation with CLIP
Latents", arXiv:2204.06125. One module per component of the paper; see README.md for the map.
"""
__version__ = "0.1.0"
