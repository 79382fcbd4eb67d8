"""PPO: the loss math on fixed tensors against plain loops (and TRL's log-softmax/entropy helpers), then
`qwenkit ppo` end to end on tiny models: pinned first-step numbers, exact resume after a kill, LoRA
with the adapter-off reference, and a final policy that `qwenkit.load` and transformers read."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, run_until_killed

import qwenkit
from qwenkit.cli import main
from qwenkit.data.synthetic import chat_samples
from qwenkit.train.ppo import (
    RunningMoments,
    entropy_of,
    gae,
    kl_shaped_rewards,
    masked_whiten,
    policy_loss,
    token_logprobs,
    value_loss,
)

ROOT = Path(__file__).resolve().parent.parent


def fixed(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LENGTHS = [5, 2, 7, 1]  # response tokens per row; the rest is padding
MASK = torch.tensor([[1.0 if t < n else 0.0 for t in range(7)] for n in LENGTHS], dtype=torch.float64)


def test_kl_shaped_rewards_match_a_loop():
    scores, logprobs, ref = fixed(0, 4), fixed(1, 4, 7), fixed(2, 4, 7)
    got = kl_shaped_rewards(scores, logprobs, ref, MASK, 0.04)
    for i, n in enumerate(LENGTHS):
        for t in range(7):
            expected = (
                0.0 if t >= n else -0.04 * (logprobs[i, t] - ref[i, t]) + (scores[i] if t == n - 1 else 0)
            )
            assert float(got[i, t]) == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_the_discounted_sum_of_td_errors(gamma, lam):
    rewards, values = fixed(3, 4, 7), fixed(4, 4, 7)
    advantages, returns = gae(rewards, values, MASK, gamma, lam)
    for i, n in enumerate(LENGTHS):
        v = [float(values[i, t]) for t in range(n)] + [0.0]  # V after the last token is 0
        deltas = [float(rewards[i, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(7):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) if t < n else 0.0
            assert float(advantages[i, t]) == pytest.approx(expected, abs=1e-10)
            assert float(returns[i, t]) == pytest.approx(expected + v[t] if t < n else 0.0, abs=1e-10)
    if gamma == lam == 1.0:  # Monte Carlo: the return is the sum of the rewards still to come
        for i, n in enumerate(LENGTHS):
            assert float(returns[i, 0]) == pytest.approx(float(rewards[i, :n].sum()), abs=1e-10)


def test_masked_whiten_uses_only_the_response_tokens():
    values = fixed(5, 4, 7)
    got = masked_whiten(values, MASK)
    valid = values[MASK.bool()]
    expected = (valid - valid.mean()) / valid.std(unbiased=True)
    torch.testing.assert_close(got[MASK.bool()], expected, atol=1e-6, rtol=0)
    assert float(got[~MASK.bool()].abs().max()) == 0.0


def test_clipped_policy_loss_matches_a_loop():
    old, advantages = fixed(6, 4, 7), fixed(7, 4, 7)
    new = old + 0.4 * fixed(8, 4, 7)  # ratios from about 0.5 to 2: many clipped
    loss, clipfrac = policy_loss(new, old, advantages, MASK, 0.2)
    terms, clipped = [], 0
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            ratio, a = math.exp(float(new[i, t] - old[i, t])), float(advantages[i, t])
            plain, capped = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            terms.append(max(plain, capped))
            clipped += capped > plain
    assert float(loss) == pytest.approx(sum(terms) / len(terms), abs=1e-10)
    assert float(clipfrac) == pytest.approx(clipped / len(terms))
    assert 0 < clipped < len(terms)
    # at ratio 1 (the first pass over fresh rollouts) the loss is -mean(A) and nothing is clipped
    loss, clipfrac = policy_loss(old, old, advantages, MASK, 0.2)
    assert float(loss) == pytest.approx(-float(advantages[MASK.bool()].mean()), abs=1e-10)
    assert float(clipfrac) == 0.0


def test_clipped_value_loss_matches_a_loop():
    old, returns = fixed(9, 4, 7), fixed(10, 4, 7)
    new = old + 0.3 * fixed(11, 4, 7)
    loss, clipfrac = value_loss(new, old, returns, MASK, 0.15)
    terms, clipped = [], 0
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            v, v_old, r = float(new[i, t]), float(old[i, t]), float(returns[i, t])
            v_clipped = v_old + min(max(v - v_old, -0.15), 0.15)
            terms.append(0.5 * max((v - r) ** 2, (v_clipped - r) ** 2))
            clipped += (v_clipped - r) ** 2 > (v - r) ** 2
    assert float(loss) == pytest.approx(sum(terms) / len(terms), abs=1e-10)
    assert float(clipfrac) == pytest.approx(clipped / len(terms))


def test_running_moments_equal_the_statistics_of_everything_seen():
    moments, seen = RunningMoments(), []
    for k, size in enumerate([3, 1, 8, 5]):
        batch = fixed(20 + k, size)
        moments.update(batch)
        seen.append(batch)
        everything = torch.cat(seen)
        assert moments.mean == pytest.approx(float(everything.mean()), abs=1e-12)
        if len(everything) > 1:
            assert moments.std == pytest.approx(float(everything.std(unbiased=True)), abs=1e-12)
    x = fixed(30, 6)
    torch.testing.assert_close(moments.normalize(x, "mean"), x - float(everything.mean()))
    torch.testing.assert_close(
        moments.normalize(x, "mean_std"),
        (x - float(everything.mean())) / float(everything.std()),
        atol=1e-6,
        rtol=0,
    )
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.count, restored.mean, restored.std) == (moments.count, moments.mean, moments.std)


def test_token_logprobs_and_entropy_match_trl():
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits, tokens = (
        fixed(40, 3, 5, 11).float(),
        torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0)),
    )
    torch.testing.assert_close(token_logprobs(logits, tokens), selective_log_softmax(logits, tokens))
    torch.testing.assert_close(entropy_of(logits), entropy_from_logits(logits))


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, byte_tokenizer) -> Path:
    """A tiny policy whose <|im_end|> comes often enough that some responses end within 8 tokens and
    some do not, a tiny reward model on the same vocabulary, and 16 prompts."""
    from qwenkit.train.reward import RewardModel, save_reward_model

    directory = tmp_path_factory.mktemp("ppo")
    policy = make_tiny_model(vocab_size=512)
    with torch.no_grad():  # a head row for <|im_end|> along the mean final hidden state: logit about 4.5
        hidden = policy.hidden_states(
            torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
        )
        mean = hidden.flatten(0, 1).mean(dim=0)
        policy.lm_head.weight[byte_tokenizer.im_end_id] = 4.5 * mean / mean.dot(mean)
    qwenkit.save(policy, byte_tokenizer, directory / "policy")
    reward = RewardModel(make_tiny_model(vocab_size=512, seed=1))
    with torch.no_grad():  # the head RewardModel draws from the global RNG, drawn from a fixed one here
        reward.score.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    save_reward_model(reward, byte_tokenizer, directory / "reward")
    rows = [{"prompt": f"Say {i}"} for i in range(12)] + [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Count to {i}"},
            ]
        }
        for i in range(4)
    ]
    (directory / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_samples(8)))
    return directory


def ppo(setup: Path, out: Path, *extra: str) -> list[str]:
    return ["ppo", "--config", str(ROOT / "configs" / "ppo" / "demo.yaml"), "--policy", str(setup / "policy"),
            "--reward", str(setup / "reward"), "--data", str(setup / "prompts.jsonl"), "--out", str(out),
            "--rollout.queries_per_step", "2", "--rollout.max_new_tokens", "8", "--data.max_prompt_len", "128", "--train.micro_batch_size", "2",
            "--train.grad_accum", "1", "--ppo.value_warmup_steps", "1", "--log.progress", "false", *extra]  # fmt: skip


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TIMING = {"rollout_tokens_per_sec", "update_tokens_per_sec", "tokens_per_sec"}


@pytest.fixture(scope="module")
def finished_run(setup, tmp_path_factory) -> Path:
    """Four steps (the first value-only), checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ppo-run") / "run"
    assert main(ppo(setup, out, *RUN)) == 0
    return out


RUN = ["--train.max_steps", "4", "--checkpoint.every", "2"]


def test_ppo_pinned_first_steps_and_outputs(setup, finished_run):
    logged = records(finished_run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for name in ("reward", "kl", "policy_loss", "value_loss", "entropy", "response_length", "clipfrac", "lr"):
        assert all(math.isfinite(r[name]) for r in logged), name
    # step 1 is value warm-up: the policy has not moved, so step 2's rollouts still have KL 0
    assert logged[0]["kl"] == logged[1]["kl"] == 0.0 and logged[2]["kl"] != 0.0
    pinned = {"reward": -0.16597, "value_loss": 0.28435, "policy_loss": -0.08514, "entropy": 4.98578,
              "response_length": 5.0, "unfinished": 0.25}  # fmt: skip
    assert {k: logged[0][k] for k in pinned} == pytest.approx(pinned, abs=1e-4)  # CPU, fp32, seed 0
    assert (finished_run / "reward_kl.png").is_file() and (finished_run / "loss.png").is_file()
    final = finished_run / "checkpoints" / "step-0000004"
    assert (finished_run / "checkpoints" / "latest").read_text().strip() == final.name
    # the policy is an ordinary checkpoint: qwenkit and transformers load it, with the same logits
    import transformers

    model, _ = qwenkit.load(final)
    hf = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([[72, 105, 33, 257, 258]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)
        start, _ = qwenkit.load(setup / "policy")
        assert (model(ids) - start(ids)).abs().max() > 0  # PPO moved it
    from qwenkit.train.reward import load_reward_model

    value, _ = load_reward_model(final / "value")
    assert value(ids).shape == (1, 5)


def test_ppo_resume_after_a_kill_is_exact(setup, finished_run, tmp_path):
    interrupted = tmp_path / "interrupted"
    run_until_killed(ppo(setup, interrupted, *RUN), interrupted, after_step=3)
    assert not (interrupted / "checkpoints" / "step-0000004").exists()
    assert main(ppo(setup, interrupted, *RUN)) == 0
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in records(interrupted)]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in records(finished_run)]
    # resuming with another method is refused with one line (it was a KeyError)
    assert main(ppo(setup, interrupted, *RUN, "--method", "lora")) == 1


def test_ppo_lora_uses_the_adapter_off_as_reference(setup, tmp_path):
    out = tmp_path / "lora"
    argv = ppo(setup, out, "--method", "lora", "--train.max_steps", "2", "--train.lr", "1e-2",
               "--model.lora_r", "4", "--model.lora_alpha", "8", "--ppo.value_warmup_steps", "0",
               "--ptx.path", str(setup / "chat.jsonl"), "--ptx.coef", "0.5", "--ptx.micro_batch_size", "2")  # fmt: skip
    assert main(argv) == 0
    logged = records(out)
    assert logged[0]["kl"] == 0.0  # LoRA's B starts at 0: policy = reference
    assert logged[1]["kl"] != 0.0
    # PPO-ptx: the language-model loss on SFT data is logged and, at this learning rate, falls
    assert 5.0 < logged[1]["ptx_loss"] < logged[0]["ptx_loss"] < 8.0
    adapter = out / "checkpoints" / "step-0000002" / "adapter"
    adapted, _ = qwenkit.load(setup / "policy", adapter=adapter)
    start, _ = qwenkit.load(setup / "policy")
    ids = torch.tensor([[72, 105, 33, 257, 258]])
    with torch.no_grad():
        assert (adapted(ids) - start(ids)).abs().max() > 1e-4


def test_ppo_errors_are_one_line(setup, tmp_path, capsys):
    assert main(["ppo", "--data", str(setup / "prompts.jsonl"), "--out", str(tmp_path / "a")]) == 1
    assert "--reward" in capsys.readouterr().err
    assert main([*ppo(setup, tmp_path / "b"), "--rollout.responses_per_query", "3",
                 "--train.micro_batch_size", "4"]) == 1  # fmt: skip
    assert "multiple of" in capsys.readouterr().err
    assert main([*ppo(setup, tmp_path / "e"), "--rollout.max_new_tokens", "200"]) == 1  # 128 + 200 > 256
    assert "context window of 256" in capsys.readouterr().err
    assert main(ppo(setup, tmp_path / "c", "--reward", str(setup / "policy"))) == 1
    assert "not a reward model" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n{broken\n{"messages": [{"role": "assistant", "content": "x"}]}\n')
    assert main([*ppo(setup, tmp_path / "d", "--data", str(bad)), "--data.strict", "true"]) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_settings_that_would_do_nothing_are_refused(tmp_path, capsys):
    """LoRA dropout (the networks run in eval mode) and a PPO-ptx coefficient without its data."""
    base = ["ppo", "--reward", "r", "--data", "p.jsonl", "--out", str(tmp_path / "run")]
    assert main([*base, "--method", "lora", "--model.lora_dropout", "0.1"]) == 1
    assert "model.lora_dropout must be <= 0" in capsys.readouterr().err
    assert main([*base, "--ptx.coef", "0.5"]) == 1
    assert "ptx.coef is set but ptx.path is not" in capsys.readouterr().err
    assert main([*base, "--ppo.value_warmup_steps", "8", "--train.max_steps", "8"]) == 1
    assert "the policy would never train" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run starts
