"""Generation: transformers parity, sampling processors, batching, stops, streaming, errors."""

import pytest
import torch
from conftest import make_tiny_model, sharpen, to_transformers
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qwenkit import GenerationConfig, Qwen, QwenkitError
from qwenkit.generation import generate_tokens, held_back_length, left_pad, pick_tokens, warp_logits


@pytest.fixture(scope="module")
def model() -> Qwen:
    return sharpen(make_tiny_model("tiny-gqa"))


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 151643, (1, n), generator=torch.Generator().manual_seed(seed))


def test_greedy_generation_equals_transformers(model):
    hf = to_transformers(model)
    ids = torch.cat([prompt(9, 1), prompt(9, 2)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, stop=[])
    theirs = hf.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=151643
    )
    assert ours.tolist() == theirs.tolist()
    with_penalty = model.generate(ids[:1], max_new_tokens=20, do_sample=False, repetition_penalty=1.3)
    theirs = hf.generate(
        ids[:1],
        max_new_tokens=20,
        do_sample=False,
        repetition_penalty=1.3,
        eos_token_id=None,
        pad_token_id=151643,
    )
    assert with_penalty.tolist() == theirs.tolist()


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7),
        dict(top_k=5),
        dict(top_p=0.6),
        dict(temperature=1.3, top_k=50, top_p=0.9),
        dict(repetition_penalty=1.1, top_p=0.8),
    ],
)
def test_warping_equals_transformers_processors(settings):
    config = GenerationConfig(do_sample=True, top_p=1.0).updated(**settings)
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 3
    history = torch.randint(0, 500, (3, 12), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter_(1, history, True)
    expected = logits.clone()
    if config.repetition_penalty != 1.0:
        expected = RepetitionPenaltyLogitsProcessor(config.repetition_penalty)(history, expected)
    for warper in (
        TemperatureLogitsWarper(config.temperature),
        TopKLogitsWarper(config.top_k) if config.top_k else None,
        TopPLogitsWarper(config.top_p) if config.top_p < 1 else None,
    ):
        if warper is not None:
            expected = warper(history, expected)
    torch.testing.assert_close(warp_logits(logits, seen, config), expected)


def test_seeded_sampling_is_reproducible(model):
    ids = prompt(5)
    a = model.generate(ids, max_new_tokens=12, do_sample=True, top_p=0.95, temperature=2.0, seed=3)
    b = model.generate(ids, max_new_tokens=12, do_sample=True, top_p=0.95, temperature=2.0, seed=3)
    c = model.generate(ids, max_new_tokens=12, do_sample=True, top_p=0.95, temperature=2.0, seed=4)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_batch_rows_equal_single_rows_and_stop_independently(model):
    rows = [prompt(7, 3)[0].tolist(), prompt(3, 4)[0].tolist()]
    alone = [
        model.generate([r], max_new_tokens=10, do_sample=False, stop=[])[0, len(r) :].tolist() for r in rows
    ]
    stop_token = alone[0][3]  # row 0 stops at its 4th token; row 1 (presumably) goes on
    assert stop_token not in alone[1]
    batch = model.generate(rows, max_new_tokens=10, do_sample=False, stop=[stop_token])
    width = 7
    assert batch.shape == (2, width + 10)
    assert batch[0, width:].tolist() == alone[0][:4] + [151643] * 6  # finished rows are padded
    assert batch[1, width:].tolist() == alone[1]


def test_multi_token_stop_sequences(model):
    full = model.generate(prompt(6), max_new_tokens=12, do_sample=False, stop=[])[0, 6:].tolist()
    stop = full[4:6]
    out = model.generate(prompt(6), max_new_tokens=12, do_sample=False, stop=[stop])[0, 6:].tolist()
    first = next(i for i in range(len(full) - 1) if full[i : i + 2] == stop)
    assert out[: first + 2] == full[: first + 2]
    assert set(out[first + 2 :]) <= {151643}


def test_generation_stops_at_the_context_window(model):
    ids = prompt(250)  # tiny preset: context of 256 tokens
    out = model.generate(ids, max_new_tokens=50, do_sample=False, stop=[])
    assert out.shape[1] == 256
    with pytest.raises(QwenkitError, match="prompt has 300 tokens; the model's context window is 256"):
        model.generate(prompt(300), max_new_tokens=1)


def test_stream_generate_yields_the_decoded_continuation(model, official_tokenizer):
    ids = official_tokenizer.encode("你好，世界！Hello")
    out = model.generate([ids], max_new_tokens=30, do_sample=False, stop=[])[0, len(ids) :].tolist()
    deltas = list(model.stream_generate(official_tokenizer, ids, max_new_tokens=30, do_sample=False, stop=[]))
    assert "".join(deltas) == official_tokenizer.decode(out, skip_special_tokens=True)
    assert all(deltas)


def test_stream_generate_stop_strings(model, official_tokenizer):
    ids = official_tokenizer.encode("Once upon a time")
    settings = dict(max_new_tokens=30, do_sample=False, stop=[])
    text = "".join(model.stream_generate(official_tokenizer, ids, **settings))
    stop = text[10:13]
    cut = text.index(stop)
    deltas = list(
        model.stream_generate(official_tokenizer, ids, stop_strings=[stop, "never there"], **settings)
    )
    assert "".join(deltas) == text[:cut]


def test_generation_config_defaults_and_validation(model):
    config = GenerationConfig()
    assert (config.top_p, config.top_k, config.max_new_tokens, config.do_sample) == (0.8, 0, 512, True)
    for bad in (dict(top_p=0), dict(top_p=1.5), dict(temperature=0), dict(max_new_tokens=-1), dict(top_k=-2)):
        with pytest.raises(QwenkitError, match="invalid generation setting"):
            model.generate(prompt(3), **bad)
    with pytest.raises(QwenkitError, match="unknown generation settings: beam_width"):
        model.generate(prompt(3), beam_width=4)
    with pytest.raises(QwenkitError, match="token ids must lie in"):
        model.generate(torch.tensor([[10**7]]))


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", -1.0),
        ("top_p", float("nan")),
        ("repetition_penalty", 1e-40),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 1e6),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", float("nan")),
    ],
)
def test_out_of_range_settings_are_one_clear_error(model, setting, value):
    """What `qwenkit generate` and the chat's `:conf` pass on: a QwenkitError naming the setting
    (printed as one line), never a failure inside sampling."""
    with pytest.raises(QwenkitError, match=f"invalid generation setting: {setting}"):
        GenerationConfig().updated(**{setting: value})
    with pytest.raises(QwenkitError, match=setting):
        model.generate(prompt(3), max_new_tokens=2, seed=0, **{setting: value})


def test_tiny_temperatures_pick_greedily_and_edge_settings_sample_finitely(model):
    """Dividing logits by 1e-45 overflows them (NaN probabilities): such temperatures pick greedily."""
    greedy = model.generate(prompt(5), max_new_tokens=8, do_sample=False, stop=[])
    for temperature in (1e-45, 1e-6):
        tiny = model.generate(prompt(5), max_new_tokens=8, temperature=temperature, seed=0, stop=[])
        assert tiny.tolist() == greedy.tolist()
    edge = dict(temperature=1e-5, repetition_penalty=0.01, top_p=1.0)
    logits = torch.randn(2, 500, generator=torch.Generator().manual_seed(0)) * 30
    seen = torch.ones(2, 500, dtype=torch.bool)
    warped = warp_logits(logits, seen, GenerationConfig(**edge))
    assert torch.isfinite(warped.softmax(dim=-1)).all()
    model.generate(prompt(5), max_new_tokens=4, seed=0, stop=[], **edge)


def test_non_finite_logits_are_a_clear_error_not_a_multinomial_failure():
    logits = torch.zeros(1, 50)
    logits[0, 3] = float("nan")
    with pytest.raises(QwenkitError, match="not finite"):
        pick_tokens(logits, None, GenerationConfig(top_p=1.0), None)


def test_held_back_length_is_the_longest_tail_that_starts_a_stop_string():
    def reference(text: str, stops: list[str]) -> int:
        return max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)

    rng = torch.Generator().manual_seed(0)

    def random_text(n: int) -> str:
        return "".join("ab\n"[i] for i in torch.randint(0, 3, (n,), generator=rng).tolist())

    for _ in range(2000):
        stops = [random_text(int(n)) for n in torch.randint(1, 7, (3,), generator=rng)]
        text = random_text(int(torch.randint(0, 9, (1,), generator=rng)))
        assert held_back_length(text, stops) == reference(text, stops), (text, stops)


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(QwenkitError):
        left_pad([[1], []], pad_id=0)


def test_generate_tokens_reports_finished_rows(model):
    first = model.generate(prompt(4), max_new_tokens=1, do_sample=False, stop=[])[0, -1].item()
    steps = list(generate_tokens(model, prompt(4), max_new_tokens=5, do_sample=False, stop=[first]))
    assert len(steps) == 1 and steps[0][1].tolist() == [True]


def test_embedding_padding_rows_are_never_generated(model):
    config, head = model.generation_config, model.lm_head.weight.detach().clone()
    try:
        first = model.generate(prompt(4), max_new_tokens=1, do_sample=False, stop=[])[0, -1].item()
        with torch.no_grad():
            model.lm_head.weight[151900] = head[first] * 3  # a padding row that beats the best real token
        assert model.generate(prompt(4), max_new_tokens=1, do_sample=False, stop=[])[0, -1].item() == 151900
        model.generation_config = GenerationConfig(vocab_size=151851)
        assert model.generate(prompt(4), max_new_tokens=1, do_sample=False, stop=[])[0, -1].item() == first
        out = model.generate(prompt(4), max_new_tokens=5, do_sample=True, top_p=1.0, stop=[], seed=0)
        assert out[0, 4:].max().item() < 151851
    finally:
        model.generation_config = config
        with torch.no_grad():
            model.lm_head.weight.copy_(head)


def test_repetition_penalty_ignores_padding_and_other_rows(model):
    short = prompt(3, 6)[0].tolist()
    settings = dict(max_new_tokens=8, do_sample=False, repetition_penalty=3.0, stop=[])
    alone = model.generate([short], **settings)[0, 3:].tolist()
    long = prompt(8, 5)[0].tolist() + [alone[0]]  # the other row holds the short row's next token
    batch = model.generate([long, short], **settings)
    assert batch[1, 9:].tolist() == alone


def test_stream_text_hides_a_stop_sequence_and_shows_a_false_start(model, official_tokenizer):
    """Tokens that begin a multi-token stop sequence wait; they are shown once they cannot complete it."""
    tok = official_tokenizer
    ids = tok.encode("Once upon a time")
    settings = dict(max_new_tokens=12, do_sample=False)
    full = model.generate([ids], stop=[], **settings)[0, len(ids) :].tolist()

    def text(stop) -> str:
        return "".join(model.stream_generate(tok, ids, stop=stop, **settings))

    def decode(new: list[int]) -> str:
        return tok.decode([t for t in new if t < tok.n_bpe])

    assert text([]) == decode(full)
    assert text([[full[3], full[4] + 1]]) == decode(full)
    assert text([[full[3], full[4]]]) == decode(full[:3])


def test_fixed_shape_decoding_of_all_rows_equals_eager(model, monkeypatch):
    """The CUDA-graph path decodes every row at fixed shapes, parking rows that have ended at slot 0.
    With the capture replaced by the same decode_step run eagerly, it gives `generate`'s tokens on
    CPU too (tests/test_cuda.py replays the real graph)."""
    from qwenkit import generation

    class EagerGraph:
        def __init__(self, model, cache):
            self.model, self.cache = model, cache

        def __call__(self, tokens):
            return self.model.decode_step(tokens[:, None], self.cache)

    rows = [prompt(7, 3)[0].tolist(), prompt(3, 4)[0].tolist(), prompt(5, 5)[0].tolist()]
    first = model.generate(rows[:1], max_new_tokens=10, do_sample=False, stop=[])[0, 7:].tolist()
    expected = model.generate(rows, max_new_tokens=10, do_sample=False, stop=[first[2]])[:, 7:].tolist()
    monkeypatch.setattr(generation, "CUDAGraphDecoder", EagerGraph)
    decoder = generation.BatchDecoder(model, 3, 7 + 10)
    decoder.cuda_graph = True
    settings = generation.RowSettings.create(
        GenerationConfig(do_sample=False, max_new_tokens=10), "cpu", [first[2]]
    )
    steps = decoder.prefill(range(3), rows, [settings] * 3)
    got = [[] for _ in rows]
    while steps:
        for step in steps:
            got[step.row].append(step.token)
        steps = decoder.decode()
    assert isinstance(decoder.graph, EagerGraph)
    assert len(got[0]) == 3 and [r + [151643] * (10 - len(r)) for r in got] == expected


@pytest.mark.parametrize("graph", [False, True])
def test_budgeted_cache_grows_with_rows_within_budget_and_keeps_the_tokens(model, monkeypatch, graph):
    """With a KV budget the cache starts empty, is reshaped as rows join (a reshape drops the
    captured graph; the fixed-shape path runs eagerly here, tests/test_cuda.py replays real graphs),
    never holds more than the budget together with a prefill's own cache, and is freed when idle.
    Every row still gets `generate`'s tokens."""
    from qwenkit import generation

    def addresses(cache):
        return [t.data_ptr() for t in (*cache.keys, *cache.values, cache.positions, cache.slot)]

    class EagerGraph:  # like a captured graph, it only works on the tensors it was captured on
        def __init__(self, model, cache):
            self.model, self.cache, self.captured = model, cache, addresses(cache)

        def __call__(self, tokens):
            assert addresses(self.cache) == self.captured, "a graph replayed on reallocated tensors"
            return self.model.decode_step(tokens[:, None], self.cache)

    monkeypatch.setattr(generation, "CUDAGraphDecoder", EagerGraph)
    rows = [prompt(n, n)[0].tolist() for n in (30, 9, 17)]
    expected = [
        model.generate([r], max_new_tokens=12, do_sample=False, stop=[])[0, len(r) :].tolist() for r in rows
    ]
    size = lambda b, t: generation.KVCache.size_in_bytes(model.config, b, t, model.dtype)  # noqa: E731
    budget = size(2, 42) + size(1, 30)  # two rows at most: the third waits for a free row
    decoder = generation.BatchDecoder(model, 3, 300, kv_budget=budget)
    decoder.cuda_graph = graph
    assert decoder.cache.nbytes == 0
    peaks, forward = [], model.forward

    def measured_forward(*args, cache=None, **kwargs):  # a prefill: its own cache next to the decoder's
        peaks.append(decoder.cache.nbytes + cache.nbytes)
        return forward(*args, cache=cache, **kwargs)

    monkeypatch.setattr(model, "forward", measured_forward)
    settings = generation.RowSettings.create(GenerationConfig(do_sample=False, max_new_tokens=12), "cpu", [])
    got, request_at = {0: [], 1: [], 2: []}, {}  # tokens per request; the request in each row

    def start(row: int, request: int):
        request_at[row] = request
        take(decoder.prefill([row], [rows[request]], [settings]))

    def take(steps):
        for step in steps:
            got[request_at[step.row]].append(step.token)

    start(0, 0)
    assert decoder.can_prefill([1], [rows[1]], [settings])
    assert not decoder.can_prefill([1, 2], rows[1:], [settings] * 2)
    with pytest.raises(ValueError, match="KV budget"):
        decoder.prefill([1, 2], rows[1:], [settings] * 2)
    for _ in range(4):
        take(decoder.decode())
    graphs = [decoder.graph]
    start(1, 1)  # joins mid-way: the cache is reshaped
    waited = False
    while decoder.running:
        take(decoder.decode())
        graphs.append(decoder.graph)
        peaks.append(decoder.cache.nbytes)
        if 2 not in request_at.values() and decoder.free_rows:
            if decoder.can_prefill(decoder.free_rows[:1], [rows[2]], [settings]):
                start(decoder.free_rows[0], 2)
            else:
                waited = True
                assert len(decoder.running) == 2  # the third request waits while two rows run
    assert [got[i] for i in range(3)] == expected
    assert waited and max(peaks) <= budget and decoder.cache.nbytes == 0  # freed once idle
    if graph:  # captured again after each reshape, never replayed on freed tensors
        assert graphs[0] is not None and graphs[0] is not graphs[-1]


# ---- one decoding core: generate, the serving engine and the agent adapters agree ----------------

PARITY_TEXTS = ["The quick brown fox", "你好，世界！Hello there, how are you today?", "def f(x):\n    return"]
# Greedy continuations (12 tokens) recorded from generate() before the engine and generate shared
# one decoding core; pinned so that neither path can drift. The second set penalizes repetition
# with 0.5 (< 1 favours seen tokens), so the seen-token sets decide its tokens.
PARITY_GREEDY = [
    [124543, 99868, 88052, 96715, 57073, 20483, 5542, 147579, 12531, 5352, 25586, 138070],
    [121256, 8577, 51076, 104270, 20847, 85138, 135793, 43687, 60643, 61595, 2194, 23532],
    [67644, 121413, 52985, 47706, 79545, 91916, 65155, 111402, 55133, 138150, 41581, 8508],
]
PARITY_PENALIZED = [
    [124543, 99868, 99868, 99868, 99868, 99868, 99868, 100170, 57018, 69706, 785, 69706],
    [121256, 8577, 51076, 30, 121256, 8577, 51076, 30, 121256, 8577, 51076, 30],
    [67644, 121413, 52985, 47706, 2075, 47138, 52985, 47706, 2075, 47138, 52985, 47706],
]
PARITY_AGENT = [56008, 35758, 150720, 9052, 64392, 115160, 15511, 72418, 123979, 37160, 117381, 124344,
                1833, 23527, 38268, 83324]  # fmt: skip


@pytest.fixture(scope="module")
def served(served_model, official_tokenizer):
    """The sharpened tiny model as `qwenkit.load` would set it up, and a serving engine of 2 rows."""
    from qwenkit.serve.engine import Engine

    engine = Engine(served_model, official_tokenizer, max_batch=2)
    yield served_model, official_tokenizer, engine
    engine.close()


def engine_texts(engine, prompts, params) -> list[str]:
    """Every prompt submitted at once (more prompts than rows: some wait for a free row)."""
    import threading

    results = [None] * len(prompts)

    def run(i):
        results[i] = engine.generate(prompts[i], params).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results


def test_generate_engine_and_agent_adapters_give_the_pinned_greedy_output(served):
    from qwenkit.agent.loop import local_complete, react_messages
    from qwenkit.agent.react import calculator
    from qwenkit.chat import DEFAULT_SYSTEM, make_context, stop_words_ids
    from qwenkit.serve.engine import SamplingParams
    from qwenkit.serve.web import engine_complete

    model, tok, engine = served
    prompts = [tok.encode(text) for text in PARITY_TEXTS]
    width = max(len(p) for p in prompts)
    for settings, expected in [({}, PARITY_GREEDY), ({"repetition_penalty": 0.5}, PARITY_PENALIZED)]:
        batch = model.generate(prompts, max_new_tokens=12, do_sample=False, **settings)
        assert batch[:, width:].tolist() == expected
        alone = [model.generate([p], max_new_tokens=12, do_sample=False, **settings)[0, len(p) :].tolist()
                 for p in prompts]  # fmt: skip
        assert alone == expected
        params = SamplingParams(max_tokens=12, temperature=0, **settings)
        assert engine_texts(engine, prompts, params) == [tok.decode(ids) for ids in expected]
    sampled = dict(temperature=1.0, top_p=0.9, seed=5)
    alone = [model.generate([p], max_new_tokens=12, **sampled)[0, len(p) :].tolist() for p in prompts]
    assert engine_texts(engine, prompts, SamplingParams(max_tokens=12, **sampled)) == [
        tok.decode(i) for i in alone
    ]

    messages = react_messages("What is 6 * 7?", [calculator])
    _, ids = make_context(tok, messages[1]["content"], [], DEFAULT_SYSTEM)
    out = model.generate([ids], max_new_tokens=16, do_sample=False, stop=stop_words_ids(tok, "chatml"))
    assert out[0, len(ids) :].tolist() == PARITY_AGENT
    begun = [*messages, {"role": "assistant", "content": ""}]
    local = local_complete(model, tok, max_new_tokens=16, do_sample=False)
    served_agent = engine_complete(engine, tok, SamplingParams(max_tokens=16, temperature=0))
    assert "".join(local(begun, [])) == "".join(served_agent(begun, [])) == tok.decode(PARITY_AGENT)


def test_score_prompts_equals_log_softmax_of_one_forward_pass_per_prompt():
    """Prompt log-probabilities from a padded batch run in chunks equal log_softmax of each prompt's
    own full forward pass (dynamic NTK and LogN on, prompts past the training length)."""
    from qwenkit.generation import score_prompts

    model = make_tiny_model(
        vocab_size=512, max_position_embeddings=16, use_dynamic_ntk=True, use_logn_attn=True
    )
    prompts = [
        prompt(n, seed).remainder(512)[0].tolist()
        for n, seed in ((40, 1), (7, 2), (1, 3), (25, 4), (23, 5), (22, 6))
    ]
    for budget in (2**25, 3 * 512 * 4):  # one pass; padded passes in chunks of 4 positions
        scored = score_prompts(model, prompts, top=3, logits_budget=budget)
        for p, entries in zip(prompts, scored, strict=True):
            logprobs = torch.log_softmax(model(torch.tensor([p]))[0].float(), dim=-1)
            assert len(entries) == len(p) and entries[0] is None
            expected = logprobs[torch.arange(len(p) - 1), torch.tensor(p[1:], dtype=torch.long)]
            torch.testing.assert_close(
                torch.tensor([e.logprob for e in entries[1:]]), expected, atol=1e-4, rtol=0
            )
            for k, e in enumerate(entries[1:]):
                values, ids = logprobs[k].topk(3)
                assert [i for i, _ in e.top] == ids.tolist() and e.token == p[k + 1]
                torch.testing.assert_close(torch.tensor([v for _, v in e.top]), values, atol=1e-4, rtol=0)


def test_rows_asking_for_logprobs_get_the_raw_distribution_of_their_tokens(model):
    """Sampled rows report log_softmax of the model's raw logits (not of the warped distribution);
    a greedy row's token is the top alternative; a stop token carries none."""
    from qwenkit.generation import BatchDecoder, RowSettings, score_prompts

    p = prompt(6, 5)[0].tolist()
    decoder = BatchDecoder(model, 2, 64)
    sampled = RowSettings.create(
        GenerationConfig(max_new_tokens=5, temperature=0.5, top_p=0.5), "cpu", seed=1, logprobs=2
    )
    greedy = RowSettings.create(
        GenerationConfig(max_new_tokens=5, do_sample=False), "cpu", stop=[], logprobs=0
    )
    steps = decoder.prefill([0, 1], [p, p], [sampled, greedy])
    tokens = {0: [], 1: []}
    entries = {0: [], 1: []}
    while True:
        for s in steps:
            tokens[s.row].append(s.token)
            entries[s.row].append(s.logprob)
        if not decoder.running:
            break
        steps = decoder.decode()
    for row in (0, 1):
        ids = torch.tensor([p + tokens[row]])
        logprobs = torch.log_softmax(model(ids)[0, len(p) - 1 : -1].float(), dim=-1)
        got = torch.tensor([e.logprob for e in entries[row]])
        torch.testing.assert_close(
            got, logprobs[torch.arange(5), torch.tensor(tokens[row])], atol=1e-4, rtol=0
        )
    assert all(len(e.top) == 2 and e.top[0][1] >= e.top[1][1] for e in entries[0])
    assert all(e.top == [] for e in entries[1])
    eos = GenerationConfig(max_new_tokens=5, do_sample=False)
    stop_at_first = RowSettings.create(eos, "cpu", stop=[tokens[1][0]], logprobs=1, prompt_logprobs=2)
    (step,) = decoder.prefill([0], [p], [stop_at_first])
    assert step.finish_reason == "stop" and step.logprob is None
    (expected,) = score_prompts(model, [p], top=2)  # the prompt's own, from the prefill's pass
    assert [e and (e.token, [t for t, _ in e.top]) for e in step.prompt_logprobs] == [
        e and (e.token, [t for t, _ in e.top]) for e in expected
    ]
    assert [e.logprob for e in step.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in expected[1:]], abs=1e-5
    )
