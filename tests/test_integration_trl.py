"""TRL integration: the fused GRPO loss equals TRL 1.16's own ``GRPOTrainer._compute_loss``.

A real ``FastGRPOTrainer`` (a ``trl.GRPOTrainer`` subclass) is built on a tiny randomly initialised
Qwen2 model and a tokenizer made in code (no download). Generation and rewards are not run: each case
hand-builds TRL's batch dict (prompt/completion ids and masks with padding, advantages, old / ref
log-probs, num_items_in_batch), then compares TRL's ``GRPOTrainer._compute_loss`` with ours on the same
trainer and model: loss and every parameter gradient, in fp32.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL integration tests need `pip install trl==1.16.0`")

from fastrl_kernels.integrations import trl as fk_trl  # noqa: E402
from tests.docs_examples import doc_example  # noqa: E402

VOCAB, BATCH, PROMPT, COMPLETION = 300, 4, 5, 7


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo")), per_device_train_batch_size=BATCH,
        num_generations=BATCH, max_completion_length=COMPLETION + 2, report_to=[], use_cpu=True,
        bf16=False, save_strategy="no", beta=0.0,  # beta != 0 would load a reference model by name; set per case below
    )
    dataset = Dataset.from_dict({"prompt": ["t5 t6 t7"] * BATCH})
    trainer = fk_trl.FastGRPOTrainer(
        model=tiny_model(), reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=dataset, processing_class=_tokenizer(),
    )
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def _inputs(trainer, seed: int, per_token_adv: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, VOCAB, (BATCH, PROMPT), generator=gen)
    prompt_mask = torch.ones(BATCH, PROMPT, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(2, VOCAB, (BATCH, COMPLETION), generator=gen)
    completion_mask = torch.ones(BATCH, COMPLETION, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 1:] = 0
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                               attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
        logp = torch.log_softmax(logits[:, -COMPLETION - 1:-1].float() / trainer.temperature, -1)
        logp = logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    shape = (BATCH, COMPLETION) if per_token_adv else (BATCH,)
    return {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": torch.randn(shape, generator=gen),
        # old policy 0.3 nats away: ratios on both sides of every clip boundary
        "old_per_token_logps": logp + 0.3 * torch.randn(BATCH, COMPLETION, generator=gen),
        "ref_per_token_logps": logp + 0.2 * torch.randn(BATCH, COMPLETION, generator=gen),
        "importance_sampling_ratio": torch.rand(BATCH, COMPLETION, generator=gen) + 0.5,
        "num_items_in_batch": completion_mask.sum() * 3,
    }


def _loss_and_grads(trainer, compute, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = compute(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


CASES = [
    dict(loss_type="grpo"),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo"),
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="cispo", epsilon_high=1.2),
    dict(loss_type="sapo"),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="dapo", beta=0.1, delta=1.2, ga=2),
    dict(loss_type="grpo", importance_sampling_level="sequence"),
    dict(loss_type="bnpo", entropy_coef=0.05, ga=3),
    dict(loss_type="dapo", vllm_is=True, per_token_adv=True, temperature=0.7),
    dict(loss_type="dr_grpo", entropy_coef=0.1, beta=0.02, eval=True),
]


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fused_grpo_matches_trl(trainer, case, path):
    if path == "linear" and not fk_trl.linear_path_available():
        pytest.skip("fk.linear_policy_loss is not available in this build")
    case = dict(case)
    saved = {k: getattr(trainer, k) for k in ("loss_type", "epsilon_high", "beta", "importance_sampling_level",
                                              "entropy_coef", "_entropy_bonus_enabled", "use_vllm", "temperature")}
    saved_forward = trainer.model.forward
    saved_args = {k: getattr(trainer.args, k)
                  for k in ("delta", "vllm_importance_sampling_correction", "use_bias_correction_kl")}
    try:
        trainer.loss_type = case.pop("loss_type")
        trainer.epsilon_high = case.pop("epsilon_high", trainer.epsilon_low)
        trainer.beta = case.pop("beta", 0.0)
        trainer.importance_sampling_level = case.pop("importance_sampling_level", "token")
        trainer.entropy_coef = case.pop("entropy_coef", 0.0)
        trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0
        trainer.args.delta = case.pop("delta", None)
        trainer.args.use_bias_correction_kl = False  # TRL's default True falls back (tested below)
        trainer.use_vllm = trainer.args.vllm_importance_sampling_correction = case.pop("vllm_is", False)
        trainer.temperature = case.pop("temperature", 1.0)
        if trainer.temperature != 1.0:  # TRL bakes the temperature into its fused head at construction
            from trl.trainer.utils import add_fused_lm_head

            add_fused_lm_head(trainer.model, temperature=trainer.temperature, outputs=("log_probs", "entropy"))
        trainer.current_gradient_accumulation_steps = case.pop("ga", 1)
        trainer.model.train(not case.pop("eval", False))
        trainer.fastrl_path = path
        inputs = _inputs(trainer, seed=len(trainer.loss_type), per_token_adv=case.pop("per_token_adv", False))
        assert not case, f"unused case keys {case}"
        assert fk_trl.unsupported_reason(trainer, inputs) is None
        expected, expected_grads = _loss_and_grads(trainer, super(type(trainer), trainer)._compute_loss, inputs)
        loss, grads = _loss_and_grads(trainer, trainer._compute_loss, inputs)
    finally:
        for k, v in saved.items():
            setattr(trainer, k, v)
        for k, v in saved_args.items():
            setattr(trainer.args, k, v)
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train(True)
        trainer.model.forward = saved_forward
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().max() > 0 for g in grads.values())


def test_metrics_logged_like_trl(trainer):
    trainer.loss_type, trainer.beta = "grpo", 0.04
    trainer.args.use_bias_correction_kl = False
    try:
        inputs = _inputs(trainer, seed=3)
        names = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
        values = {}
        for compute in (super(type(trainer), trainer)._compute_loss, trainer._compute_loss):
            trainer._metrics["train"].clear()
            compute(trainer.model, inputs)
            values[compute] = [trainer._metrics["train"][n][-1] for n in names]
    finally:
        trainer.loss_type, trainer.beta = "grpo", 0.0
    trl_values, ours = values.values()
    assert ours == pytest.approx(trl_values, rel=1e-4, abs=1e-6)
    assert trl_values[2] + trl_values[3] > 0  # the case clips, so the comparison is not of zeros


def test_unsupported_settings_fall_back_to_trl(trainer):
    inputs = _inputs(trainer, seed=5)
    for attribute, value, reason in (("loss_type", "vespo", "loss_type='vespo'"),
                                     ("beta", 0.04, "use_bias_correction_kl")):
        saved = getattr(trainer, attribute)
        setattr(trainer, attribute, value)
        trainer.args.use_bias_correction_kl = True  # TRL's default
        try:
            assert fk_trl.unsupported_reason(trainer, inputs) == reason
            expected = super(type(trainer), trainer)._compute_loss(trainer.model, inputs)
            torch.testing.assert_close(trainer._compute_loss(trainer.model, inputs), expected)
        finally:
            setattr(trainer, attribute, saved)


def test_patch_grpo_trainer(trainer):
    from trl import GRPOTrainer

    inputs = _inputs(trainer, seed=7)
    expected = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    plain = object.__new__(GRPOTrainer)
    plain.__dict__.update(trainer.__dict__)
    calls = []
    plain._compute_loss = lambda model, batch: calls.append(1) or GRPOTrainer._compute_loss(plain, model, batch)
    fk_trl.patch_grpo_trainer(plain, path="logits")
    loss = plain._compute_loss(plain.model, inputs)
    assert calls == []  # the fused loss ran, not the original method
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="path"):
        fk_trl.patch_grpo_trainer(plain, path="fast")


def test_docs_example(trainer):
    from trl import GRPOTrainer

    inputs = _inputs(trainer, seed=11)
    plain = object.__new__(GRPOTrainer)
    plain.__dict__.update(trainer.__dict__)
    plain.model.zero_grad(set_to_none=True)
    namespace = {"trainer": plain, "inputs": inputs}
    exec(compile(doc_example("trl"), "docs/integrations.md:trl", "exec"), namespace)
    torch.testing.assert_close(namespace["loss"], GRPOTrainer._compute_loss(plain, plain.model, inputs),
                               rtol=1e-5, atol=1e-6)
    assert plain.model.lm_head.weight.grad is not None
