import math

import pytest
import torch

from model import GPT, GPTConfig, KVCache, peak_flops, sample_next


def tiny(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd, dropout=dropout, bias=bias)).eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random-weight GPT-2 written by save_pretrained: the offline stand-in for 'gpt2'."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=257, n_positions=48))
    # make LayerNorms and biases non-trivial so a wrong mapping cannot hide behind zeros and ones
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(path)
    return path, hf.eval()


def test_pretrained_logits_match_transformers(hf_folder):
    path, hf = hf_folder
    model = GPT.from_pretrained(str(path)).eval()
    assert model.config.n_layer == 3 and model.config.block_size == 48 and model.config.vocab_size == 257
    idx = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx, targets=idx)
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_pretrained_refuses_other_numerics(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=30, n_positions=8,
                                    activation_function="relu"))
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activation_function"):
        GPT.from_pretrained(str(tmp_path))


def test_pretrained_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(OSError, match="save_pretrained"):
        GPT.from_pretrained(str(tmp_path / "nope"))


def test_tied_embeddings_and_gpt2_init():
    model = tiny(n_layer=4, n_embd=64, n_head=4, seed=3)
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].attn.c_proj.weight
    assert abs(proj.std().item() - 0.02 / math.sqrt(8)) < 0.003  # scaled residual init
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_configure_optimizers_decays_only_matrices():
    model = tiny(bias=True)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())  # every parameter once (tied counted once)


def test_mfu_unknown_rather_than_wrong():
    assert peak_flops(None, "bfloat16") is None  # CPU
    assert peak_flops("NVIDIA A100-SXM4-80GB", "float32") is None  # no float32 peak claimed
    assert peak_flops("Some Future GPU", "bfloat16") is None
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bfloat16") is None and peak_flops("Tesla V100-SXM2-16GB", "float16") == 125e12
    model = tiny()
    assert model.estimate_mfu(1e6, None, "float32") is None
    assert model.estimate_mfu(1e6, "NVIDIA A100", "bfloat16") == pytest.approx(model.flops_per_token() * 1e6 / 312e12)


def test_cache_forward_equals_full_forward():
    model = tiny().double()
    idx = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        full, _ = model(idx, targets=idx)
        cache = KVCache(model.config, 3, "cpu", torch.float64)
        a, _ = model(idx[:, :5], cache=cache)  # prefill 5
        b, _ = model(idx[:, 5:9], cache=cache)  # a 4-token chunk after a cached past
        steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 12)]
    assert torch.allclose(a[:, -1], full[:, 4], atol=1e-10)
    assert torch.allclose(b[:, -1], full[:, 8], atol=1e-10)
    for t, s in zip(range(9, 12), steps):
        assert torch.allclose(s[:, -1], full[:, t], atol=1e-10)


@pytest.mark.parametrize("prompt_len,new", [(5, 8), (6, 40)])  # the second runs far past block_size=16
def test_greedy_cache_equals_recomputation(prompt_len, new):
    model = tiny(seed=1).double()
    idx = torch.randint(0, 50, (2, prompt_len), generator=torch.Generator().manual_seed(2))
    cached = model.generate(idx, new, temperature=0, use_cache=True)
    recomputed = model.generate(idx, new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, recomputed)


def test_sampled_batch_rows_equal_separate_runs():
    model = tiny(seed=2)
    idx = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(3)).repeat(3, 1)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = model.generate(idx, 30, temperature=1.0, top_k=20, top_p=0.9, generators=gens([7, 8, 9]))
    for row, seed in enumerate([7, 8, 9]):
        alone = model.generate(idx[:1], 30, temperature=1.0, top_k=20, top_p=0.9, generators=gens([seed]))
        assert torch.equal(batch[row], alone[0])
    assert not torch.equal(batch[0], batch[1])  # different seeds really give different samples


def test_stop_token_pads_finished_rows_and_ends_early():
    model = tiny(seed=4)
    idx = torch.tensor([[1], [2]])
    greedy = model.generate(idx, 12, temperature=0)[:, 1:]
    stop = greedy[0, 2].item()  # a token row 0 produces by step 2
    first = [row.tolist().index(stop) if stop in row.tolist() else None for row in greedy]
    out = model.generate(idx, 12, temperature=0, stop_token=stop)[:, 1:]
    ends = [f + 1 if f is not None else 12 for f in first]
    assert out.size(1) == max(ends)  # stops as soon as every row has
    for row, end in enumerate(ends):
        assert torch.equal(out[row, :end], greedy[row, :end])
        assert (out[row, end:] == stop).all()  # finished rows are padded with the stop token


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generators=[g]).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_next(logits, 1.0, top_p=0.7, generators=[g]).item() for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the nucleus is the first two
    draws = {sample_next(logits, 1.0, top_p=0.5, generators=[g]).item() for _ in range(200)}
    assert draws == {0}
    assert sample_next(logits, 0.0).item() == 0


def test_memory_seam_sees_context_and_can_replace_values():
    model = tiny(seed=5).double()
    idx = torch.randint(0, 50, (2, 10))
    seen = []

    def identity(attn, q, k, v, attend):
        seen.append((attn.layer_idx, q.shape, k.shape))
        return attend(q, k, v)

    def zero_values(attn, q, k, v, attend):
        return attend(q, k, torch.zeros_like(v))

    with torch.no_grad():
        plain, _ = model(idx, targets=idx)
        model.attentions[1].memory = identity
        hooked, _ = model(idx, targets=idx)
        assert torch.equal(plain, hooked)
        assert seen == [(1, (2, 2, 10, 8), (2, 2, 10, 8))]
        # with a cache the memory sees the whole context's keys and only the new queries
        seen.clear()
        cache = KVCache(model.config, 2, "cpu", torch.float64)
        model(idx[:, :9], cache=cache)
        model(idx[:, 9:], cache=cache)
        assert seen[-1] == (1, (2, 2, 1, 8), (2, 2, 10, 8))
        # the cache keeps the unmodified values even when a memory rewrites them
        model.attentions[1].memory = zero_values
        changed, _ = model(idx, targets=idx)
        assert not torch.allclose(changed, plain)
        model.attentions[1].memory = None
    k_before = cache.k[1, :, :, :10].clone()
    assert torch.count_nonzero(cache.v[1, :, :, :10]) > 0 and torch.equal(k_before, cache.k[1, :, :, :10])


def test_forward_refuses_overlong_input():
    model = tiny(block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
