"""Draft-model speculation (`--speculative draft --draft-model M`): greedy output identical to no
speculation, the sampled distribution the target's (chi-square, and the same test failing when the rule is
broken), both KV pools back to their starting counts, and drafts that cannot be the target's refused.

The draft models are built offline from the tiny random llama: the target itself, and its first layer
only (the same embeddings and head, so its drafts are often but not always the target's)."""

import json
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shared.engine.llm_engine import LLMEngine
from shared.engine.loader import load_checkpoint
from shared.engine.sampling_params import SamplingParams
from shared.engine.speculative import verify
from shared.engine.speculative.planner import StepCost, plan_draft_lengths
from shared.metrics import SpeculationCollector
from tests.engine.helpers import greedy, make_engine, run_all
from tests.engine.test_engine import hand_off
from tests.engine.test_speculative import repetitive_prompts
from xllm.cli import generate

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def target_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def ckpt(target_dir):
    return load_checkpoint(str(target_dir))


@pytest.fixture(scope="module")
def one_layer_dir(target_dir, tiny_hf_model, tmp_path_factory) -> Path:
    """The target with its second layer dropped."""
    from transformers import LlamaForCausalLM

    target = tiny_hf_model("llama")
    config = target.config.to_dict()
    config["num_hidden_layers"] = 1
    draft = LlamaForCausalLM(type(target.config).from_dict(config)).eval()
    missing, _ = draft.load_state_dict(target.state_dict(), strict=False)
    assert not missing
    return save_with_tokenizer(draft, target_dir, tmp_path_factory.mktemp("draft_one_layer"))


def save_with_tokenizer(model, target_dir: Path, out: Path) -> Path:
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(target_dir / name, out / name)
    return out


def drafting(ckpt, draft_dir: Path, **overrides) -> LLMEngine:
    """An engine that drafts every token it may (draft_length="fixed"), so tests do not depend on timing."""
    return make_engine(ckpt, speculative="draft", draft_model=str(draft_dir), draft_length="fixed", **overrides)


def assert_pools_full(engine: LLMEngine) -> None:
    for bm in (engine.block_manager, engine.speculator.draft.block_manager):
        assert bm.num_free_blocks == bm.num_blocks
    assert not engine.speculator.draft.states


# ---- greedy: exactly the output without speculation -------------------------------------------------
def test_greedy_output_is_unchanged_batched_chunked_preempted_and_forked(ckpt, one_layer_dir):
    reqs = {f"r{i}": (p, greedy(24)) for i, p in enumerate(repetitive_prompts(6))}
    reqs["n2"] = (repetitive_prompts(7)[6], greedy(24, n=2))
    want = run_all(make_engine(ckpt), reqs)
    for overrides in ({}, {"max_num_batched_tokens": 16}, {"kv_blocks": 14}):
        engine = drafting(ckpt, one_layer_dir, **overrides)
        assert run_all(engine, reqs) == want, overrides
        spec = engine.speculator
        assert 0 < spec.accepted < spec.drafted, overrides  # drafts were both taken and refused
        assert_pools_full(engine)
        if "kv_blocks" in overrides:
            assert engine.scheduler.num_preemptions > 0


def test_with_quantized_weights_both_models_run_blocks_and_greedy_output_is_unchanged(ckpt, one_layer_dir):
    reqs = {f"r{i}": (p, greedy(24)) for i, p in enumerate(repetitive_prompts(4))}
    want = run_all(make_engine(ckpt, quantization="q4_0"), reqs)
    for overrides in ({}, {"kv_blocks": 10}):
        engine = drafting(ckpt, one_layer_dir, quantization="q4_0", **overrides)
        assert engine.speculator.draft.model.model.layers[0].mlp.gate_up_proj.quantized.format == "q4_0"
        assert run_all(engine, reqs) == want, overrides
        assert 0 < engine.speculator.accepted < engine.speculator.drafted
        if overrides:
            assert engine.scheduler.num_preemptions > 0


def test_an_aborted_request_gives_back_its_blocks_in_both_pools(ckpt, one_layer_dir):
    engine = drafting(ckpt, one_layer_dir)
    for i, prompt in enumerate(repetitive_prompts(3)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=40))
    for _ in range(4):
        engine.step()
    assert engine.speculator.draft.states and engine.speculator.drafted > 0
    for i in range(3):
        engine.abort_request(f"r{i}")
    assert_pools_full(engine)


@pytest.mark.parametrize("overrides", [{}, {"max_num_batched_tokens": 16}], ids=["whole", "chunked"])
def test_drafts_are_the_draft_model_s_own_continuation_after_rejections(ckpt, one_layer_dir, overrides):
    """Its KV is rolled back past rejected drafts and caught up on what the target took: each step's drafts
    are what transformers' copy of the draft model continues the sequence with, greedy."""
    from transformers import AutoModelForCausalLM

    engine = drafting(ckpt, one_layer_dir, **overrides)
    draft, proposals = engine.speculator.draft, []
    propose = draft.propose_batch

    def recording(seqs, lengths):
        propose(seqs, lengths)
        proposals.extend((list(seq.token_ids), list(seq.spec_token_ids)) for seq in seqs if seq.spec_token_ids)

    draft.propose_batch = recording
    prompts = repetitive_prompts(3)
    run_all(engine, {f"r{i}": (p, greedy(20)) for i, p in enumerate(prompts)})
    assert 0 < engine.speculator.accepted < engine.speculator.drafted and len(proposals) > 10
    hf = AutoModelForCausalLM.from_pretrained(one_layer_dir, dtype=torch.float32).eval()
    for context, drafts in proposals:
        out = hf.generate(torch.tensor([context]), max_new_tokens=len(drafts), do_sample=False, pad_token_id=0)
        assert out[0, len(context) :].tolist() == drafts


def test_the_target_drafting_for_itself_is_accepted_and_the_hand_off_works(ckpt, target_dir):
    prompt = repetitive_prompts(8)[0]
    params = greedy(30, n=2)
    want = run_all(make_engine(ckpt), {"x": (prompt, params)})["x"]
    decode = drafting(ckpt, target_dir)
    assert hand_off(make_engine(ckpt), decode, "x", prompt, params) == want
    spec = decode.speculator
    assert spec.accepted >= 0.9 * spec.drafted > 0
    assert_pools_full(decode)


def test_stop_rules_penalties_and_logprobs_inside_accepted_runs(ckpt, one_layer_dir, tiny_hf_model):
    ps = repetitive_prompts(5, seed=1)
    params = [
        SamplingParams(temperature=0.0, max_tokens=30, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, min_tokens=20, stop_token_ids=[ps[1][-1]]),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, logit_bias={ps[2][0]: 3.0}),
        SamplingParams(temperature=0.0, max_tokens=30, presence_penalty=0.5, frequency_penalty=0.3, ignore_eos=True),
    ]
    reqs = {f"r{i}": (p, sp) for i, (p, sp) in enumerate(zip(ps, params))}
    assert run_all(drafting(ckpt, one_layer_dir), reqs) == run_all(make_engine(ckpt), reqs)
    # sampled: max_tokens, min_tokens and a stop id hold, and each logprob is the target's at its position
    sampled = SamplingParams(
        temperature=1.0, seed=7, max_tokens=20, min_tokens=12, stop_token_ids=[ps[3][-1]], logprobs=1
    )
    engine = drafting(ckpt, one_layer_dir)
    engine.add_request("s", ps[3], sampled)
    tokens, logprobs = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.outputs[0].token_ids
            logprobs += [lp for lp, _ in out.outputs[0].logprobs]
    assert engine.speculator.accepted > 0
    assert 12 <= len(tokens) <= 20 and ps[3][-1] not in tokens[:-1]
    with torch.no_grad():
        logits = tiny_hf_model("llama")(torch.tensor([ps[3] + tokens])).logits[0].float()
    want = torch.log_softmax(logits, -1)[len(ps[3]) - 1 : -1].gather(1, torch.tensor(tokens).unsqueeze(1))
    assert logprobs == pytest.approx(want.squeeze(1).tolist(), abs=1e-3)


def test_seeded_output_does_not_depend_on_the_batch_and_greedy_rows_beside_it_are_unchanged(ckpt, one_layer_dir):
    prompt = repetitive_prompts(3)[2]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=24, ignore_eos=True)
    alone = run_all(drafting(ckpt, one_layer_dir), {"x": (prompt, params)})["x"]
    sampled = {
        f"s{i}": (p, SamplingParams(temperature=1.0, max_tokens=16)) for i, p in enumerate(repetitive_prompts(3))
    }
    greedy_reqs = {f"g{i}": (p, greedy(16)) for i, p in enumerate(repetitive_prompts(3, seed=5))}
    engine = drafting(ckpt, one_layer_dir)
    got = run_all(engine, {**sampled, **greedy_reqs, "x": (prompt, params)})
    assert got["x"] == alone
    want = run_all(make_engine(ckpt), greedy_reqs)
    assert {rid: got[rid] for rid in greedy_reqs} == want
    assert engine.speculator.accepted > 0
    assert_pools_full(engine)


# ---- temperature 1: the target's distribution ------------------------------------------------------
def chi_square_p_value(a: Counter, b: Counter) -> float:
    """Two-sample chi-square test over the outcomes seen at least 10 times in all."""
    keys = [k for k in a.keys() | b.keys() if a[k] + b[k] >= 10]
    assert len(keys) >= 3
    stat = sum((a[k] - b[k]) ** 2 / (a[k] + b[k]) for k in keys)
    return torch.special.gammaincc(torch.tensor((len(keys) - 1) / 2), torch.tensor(stat / 2)).item()


def rule_p_value(rule, p: torch.Tensor, q: torch.Tensor, n: int = 4000) -> float:
    """Goodness of fit of `rule`'s tokens to p, each from a draft drawn from q (its own generator per row);
    tokens p gives no probability must never come out."""
    seqs = [SimpleNamespace(generator=torch.Generator().manual_seed(i)) for i in range(n)]
    drafts = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(n)).tolist()
    tokens, _ = rule(p.expand(n, -1), q.expand(n, -1), drafts, seqs)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(p)).double()
    support = p > 0
    if counts[~support].sum():
        return 0.0
    expected = n * p[support].double()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((int(support.sum()) - 1) / 2), stat / 2).item()


def accept_all(p, q, drafts, seqs):
    return drafts, [True] * len(drafts)


def resample_from_p(p, q, drafts, seqs):
    """A plausible slip: on rejection, draw from p instead of norm(max(0, p - q))."""
    _, kept = verify.accept_or_resample(p, q, drafts, seqs)
    return [
        d if ok else int(torch.multinomial(p[0], 1, generator=s.generator)) for d, ok, s in zip(drafts, kept, seqs)
    ], kept


@pytest.mark.parametrize(
    "p, q",
    [([0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]), ([0.6, 0.4, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4])],
    ids=["overlapping", "p-filtered"],
)
def test_the_rejection_rule_gives_p_and_a_broken_rule_is_caught(p, q):
    p, q = torch.tensor(p), torch.tensor(q)
    assert rule_p_value(verify.accept_or_resample, p, q) > 0.001
    assert rule_p_value(accept_all, p, q) < 1e-6
    assert rule_p_value(resample_from_p, p, q) < 1e-6


def test_sampled_distribution_is_the_target_s_and_the_test_catches_a_broken_rule(ckpt, one_layer_dir, monkeypatch):
    """Output tokens 1 to 3 (positions drafts are verified at), independent seeds on each side."""
    prompt = repetitive_prompts(8)[3]
    samples = 500

    def draw(engine, seed0):
        reqs = {
            f"r{i}": (prompt, SamplingParams(temperature=1.0, top_k=4, seed=seed0 + i, max_tokens=4, ignore_eos=True))
            for i in range(samples)
        }
        return Counter(tuple(r[0][0][1:]) for r in run_all(engine, reqs).values())

    without = draw(make_engine(ckpt, kv_blocks=1024), 10**6)
    engine = drafting(ckpt, one_layer_dir, kv_blocks=1024)
    with_spec = draw(engine, 0)
    spec = engine.speculator
    assert spec.accepted > samples // 4 and spec.drafted - spec.accepted > samples // 4
    assert chi_square_p_value(with_spec, without) > 0.001, (with_spec, without)
    assert_pools_full(engine)
    # Accepting every draft gives the draft's distribution: the same test must see it
    monkeypatch.setattr(verify, "accept_or_resample", lambda p, q, drafts, seqs: (drafts, [True] * len(drafts)))
    broken = draw(drafting(ckpt, one_layer_dir, kv_blocks=1024), 0)
    assert chi_square_p_value(broken, without) < 1e-6


# ---- configuration -----------------------------------------------------------------------------------
def test_a_draft_that_cannot_be_the_target_s_is_refused(ckpt, target_dir, one_layer_dir, tmp_path):
    with pytest.raises(ValueError, match="needs --draft-model"):
        make_engine(ckpt, speculative="draft")
    with pytest.raises(ValueError, match="--draft-model is for --speculative draft"):
        make_engine(ckpt, speculative="ngram", draft_model=str(one_layer_dir))
    from transformers import LlamaConfig, LlamaForCausalLM

    small_vocab = tmp_path / "small_vocab"
    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    save_with_tokenizer(LlamaForCausalLM(config), target_dir, small_vocab)
    with pytest.raises(ValueError, match="vocabulary of 1000 tokens"):
        make_engine(ckpt, speculative="draft", draft_model=str(small_vocab))
    swapped = tmp_path / "swapped"
    shutil.copytree(one_layer_dir, swapped)
    tokenizer = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="maps tokens to other ids"):
        make_engine(ckpt, speculative="draft", draft_model=str(swapped))


def test_draft_passes_count_in_the_plan_and_the_metrics_say_draft(ckpt, one_layer_dir):
    memory_bound = StepCost({1: 0.010, 64: 0.012, 512: 0.080})
    assert plan_draft_lengths([5], [0.8], 1, 1, memory_bound, StepCost({1: 0.0005, 64: 0.001})) == [5]
    assert plan_draft_lengths([5], [0.8], 1, 1, memory_bound, StepCost({1: 0.02, 64: 0.03})) == [0]
    # a sequence the draft has to catch up on first (a new one, or one that has not drafted for a while)
    cheap = StepCost({1: 0.0005, 64: 0.001, 512: 0.05})
    assert plan_draft_lengths([5], [0.8], 1, 1, memory_bound, cheap, catch_up=[1]) == [5]
    assert plan_draft_lengths([5], [0.8], 1, 1, memory_bound, cheap, catch_up=[500]) == [0]
    engine = make_engine(ckpt, speculative="draft", draft_model=str(one_layer_dir))  # adaptive: calibrated
    assert engine.speculator.draft.cost is not None and engine.speculator.cost is not None
    run_all(engine, {"x": (repetitive_prompts(2)[1], greedy(12))})
    metrics = {m.name: m.samples[0] for m in SpeculationCollector("draft", engine.stats).collect()}
    assert metrics["xllm_spec_draft_tokens"].labels == {"method": "draft"}
    assert metrics["xllm_spec_draft_tokens"].value == engine.speculator.drafted
    assert_pools_full(engine)


def test_generate_with_a_draft_model_prints_what_it_prints_without(tiny_model_dir, capsys):
    model = str(tiny_model_dir("llama"))
    args = ["--prompt", "one two three one two three one two", "--max-tokens", "12", "--model", model]
    assert generate(args) == 0
    plain = capsys.readouterr().out
    assert generate([*args, "--speculative", "draft", "--draft-model", model, "--draft-length", "fixed"]) == 0
    assert capsys.readouterr().out == plain
