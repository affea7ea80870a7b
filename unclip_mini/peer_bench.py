"""Standalone timing of lucidrains' dalle2-pytorch, the peer implementation (for bench.bench_decoder / bench_prior).

Runs in the peer's own venv (it imports nothing from unclip_mini), never in the project's:

    python -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.14.1 torchvision==0.29.1 dalle2-pytorch
    /tmp/peer/bin/python unclip_mini/peer_bench.py --mode unet --params 1300000 --image-size 32 --batch-size 32
    /tmp/peer/bin/python unclip_mini/peer_bench.py --mode prior --params 388000 --depth 3 --heads 4 --batch-size 128

--mode unet: the peer's `Unet` conditioned like unCLIP's decoder (image embedding into the time embedding
and 4 image tokens, text encodings as cross-attention context, attention at the lowest level and the
middle, as ours); a training step is forward, MSE, backward, AdamW; a sampling step the peer's
`forward_with_cond_scale` (the conditional and the null pass).
--mode prior: the peer's `DiffusionPrior` around its `DiffusionPriorNetwork` (causal transformer over text
encodings, text embedding, time, noised image embedding and a learned query; x0 objective, caption dropped
10% of the time), `--depth` blocks and `--heads` heads as ours; its width is the embedding dim (the peer
has no input projections), so the inputs are random embeddings of that width. A training step is
`DiffusionPrior.forward` (noise, loss) + backward + AdamW; a sampling step one guided network call on
`--sample-batch` embeddings (`forward_with_cond_scale`).
Either way the width whose parameter count is closest to `--params` is picked, and one JSON line is printed.
"""
import argparse
import json
import time

import torch


def build(dim, args):
    if args.mode == "prior":
        from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork
        net = DiffusionPriorNetwork(dim=dim, depth=args.depth, heads=args.heads, dim_head=max(8, dim // args.heads),
                                    num_timesteps=1000, max_text_len=args.text_len)
        return DiffusionPrior(net, image_embed_dim=dim, timesteps=1000, cond_drop_prob=0.1,
                              condition_on_text_encodings=True)
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
    p.add_argument("--mode", default="unet", choices=("unet", "prior"))
    p.add_argument("--params", type=int, required=True, help="parameter count to match")
    p.add_argument("--depth", type=int, default=3, help="prior: transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="prior: attention heads")
    p.add_argument("--sample-batch", type=int, default=32, help="prior: embeddings per sampling step")
    p.add_argument("--dim", type=int, default=None, help="skip the search: use this base width")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--image-embed-dim", type=int, default=64)
    p.add_argument("--text-embed-dim", type=int, default=64)
    p.add_argument("--text-len", type=int, default=None, help="caption tokens (default 12 unet, 16 prior)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    args.text_len = args.text_len or (16 if args.mode == "prior" else 12)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # the base width (a multiple of the peer's 8 GroupNorm groups) closest in parameter count
    if args.dim is None:
        counts = {}
        for d in range(8, 4097, 8):  # the count grows with the width: stop once past the target
            counts[d] = n_params(build(d, args))
            if counts[d] > args.params:
                break
        dim = min(counts, key=lambda d: abs(counts[d] - args.params))
    else:
        dim = args.dim
    model = build(dim, args).to(args.device)
    if args.mode == "prior":
        return time_prior(model, dim, args)
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


def time_prior(prior, dim, args):
    opt = torch.optim.AdamW([q for q in prior.parameters() if q.requires_grad], lr=1e-4)
    b, dev, f = args.batch_size, args.device, torch.nn.functional
    text_embed = f.normalize(torch.randn(b, dim, device=dev), dim=-1)
    image_embed = f.normalize(torch.randn(b, dim, device=dev), dim=-1)
    text = torch.randn(b, args.text_len, dim, device=dev)

    def train_step():
        opt.zero_grad(set_to_none=True)
        prior(text_embed=text_embed, image_embed=image_embed, text_encodings=text).backward()
        opt.step()

    s = args.sample_batch
    x, t = torch.randn(s, dim, device=dev), torch.full((s,), 10, device=dev, dtype=torch.long)
    st, sx = text_embed[:s].repeat(-(-s // b), 1)[:s], text[:s].repeat(-(-s // b), 1, 1)[:s]

    def sample_step():
        with torch.no_grad():
            prior.net.forward_with_cond_scale(x, t, text_embed=st, text_encodings=sx, cond_scale=2.0)

    prior.train()
    train_s = median_time(train_step, args.repeats)
    prior.eval()
    sample_s = median_time(sample_step, args.repeats)
    print(json.dumps({"name": "dalle2-pytorch DiffusionPrior", "dim": dim, "depth": args.depth, "heads": args.heads,
                      "params": n_params(prior), "target_params": args.params, "train_step_s": train_s,
                      "sample_step_s": sample_s, "batch_size": b, "sample_batch": s, "text_len": args.text_len,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
