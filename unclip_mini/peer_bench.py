"""Standalone timing of the peer decoder U-Net: lucidrains' dalle2-pytorch `Unet` (for bench.bench_decoder).

Runs in the peer's own venv (it imports nothing from unclip_mini), never in the project's:

    python -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.14.1 torchvision==0.29.1 dalle2-pytorch
    /tmp/peer/bin/python unclip_mini/peer_bench.py --params 1300000 --image-size 32 --batch-size 32

It builds the peer's `Unet` conditioned like unCLIP's decoder (image embedding into the time embedding
and 4 image tokens, text encodings as cross-attention context, attention at the lowest level and the
middle, as ours), picks the base width whose parameter count is closest to `--params`, and prints one
JSON line: seconds per training step (forward, MSE, backward, AdamW) and per guided sampling step (the
peer's `forward_with_cond_scale`, which runs the conditional and the null pass).
"""
import argparse
import json
import time

import torch


def build(dim, args):
    from dalle2_pytorch import Unet
    return Unet(dim=dim, image_embed_dim=args.image_embed_dim, text_embed_dim=args.text_embed_dim,
                cond_on_image_embeds=True, cond_on_text_encodings=True, dim_mults=(1, 2, 2), channels=3,
                num_resnet_blocks=2, self_attn=(False, False, True), attn_heads=4, attn_dim_head=32)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def median_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, required=True, help="parameter count to match")
    p.add_argument("--dim", type=int, default=None, help="skip the search: use this base width")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--image-embed-dim", type=int, default=64)
    p.add_argument("--text-embed-dim", type=int, default=64)
    p.add_argument("--text-len", type=int, default=12)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # the base width (a multiple of the peer's 8 GroupNorm groups) closest in parameter count
    if args.dim is None:
        counts = {}
        for d in range(8, 513, 8):  # the count grows with the width: stop once past the target
            counts[d] = n_params(build(d, args))
            if counts[d] > args.params:
                break
        dim = min(counts, key=lambda d: abs(counts[d] - args.params))
    else:
        dim = args.dim
    model = build(dim, args).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, s, dev = args.batch_size, args.image_size, args.device
    x = torch.randn(b, 3, s, s, device=dev)
    image_embed = torch.nn.functional.normalize(torch.randn(b, args.image_embed_dim, device=dev), dim=-1)
    text = torch.randn(b, args.text_len, args.text_embed_dim, device=dev)
    t = torch.randint(0, 1000, (b,), device=dev)

    def train_step():
        opt.zero_grad(set_to_none=True)
        out = model(x, t, image_embed=image_embed, text_encodings=text, image_cond_drop_prob=0.1,
                    text_cond_drop_prob=0.5)
        loss = torch.nn.functional.mse_loss(out, x)
        loss.backward()
        opt.step()

    def sample_step():
        with torch.no_grad():
            model.forward_with_cond_scale(x, t, image_embed=image_embed, text_encodings=text, cond_scale=3.0)

    model.train()
    train_s = median_time(train_step, args.repeats)
    model.eval()
    sample_s = median_time(sample_step, args.repeats)
    print(json.dumps({"name": "dalle2-pytorch Unet", "dim": dim, "params": n_params(model),
                      "target_params": args.params, "train_step_s": train_s, "sample_step_s": sample_s,
                      "batch_size": b, "image_size": s, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
