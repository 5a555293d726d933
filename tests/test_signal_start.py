"""The signal collection starts by itself at the first forward in training mode, so a hand loop needs one call.

``get_peft_model`` installs a forward pre-hook on the base model; at the first forward in training mode with
gradients enabled it starts the collection of the active adapter (what ``start_signal_collection()`` before the
loop does) and removes itself. The loop without ``start_signal_collection()`` must give exactly the ranks and
weights of the loop with it, with no warning; evaluation, ``AdaptiveLoraCallback`` and a resumed loop must not
start anything.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

from peft_adaptive import AdaptiveLoraCallback, AdaptiveLoraConfig

from .test_update_and_allocate import adapter_state, assert_same_model, batches, one_call_loop, optimizer_for
from .tiny_models import TokenDataset, adaptive_model, tiny_llama

SIGNAL_STEPS = 3


def hook_installed(model) -> bool:
    tuner = model.base_model
    return tuner._forward_start_hook is not None and any(
        getattr(hook, "__func__", None) is type(tuner)._start_signals_on_forward
        for hook in tuner.model._forward_pre_hooks.values()
    )


@pytest.mark.parametrize(
    "config",
    [{}, {"growth": "gradient"}, {"score": "norms", "delta_weight": 0.5}],
    ids=["default", "gradient-growth", "weight-delta"],
)
def test_the_one_call_loop_equals_the_loop_that_starts_the_signals_first(config):
    data = batches()
    two_calls = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS, lora_dropout=0.0, **config)
    _, two_call_reports = one_call_loop(two_calls, data, start_first=True)
    one_call = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS, lora_dropout=0.0, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no late-start warning: the sketch and the snapshot saw step 1
        _, reports = one_call_loop(one_call, data)

    got, want = reports[SIGNAL_STEPS - 1], two_call_reports[SIGNAL_STEPS - 1]
    assert got.signal_steps == want.signal_steps == SIGNAL_STEPS
    assert got.ranks_after == want.ranks_after and got.scores == want.scores
    assert len(set(got.ranks_after)) > 1
    assert_same_model(one_call, two_calls)  # the ranks and torch.equal weights


def test_evaluation_starts_nothing_and_training_starts_once():
    model = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS)
    tuner, batch = model.base_model, batches(1)[0]
    model.eval()
    model(**batch)  # eval mode
    model.train()
    with torch.no_grad():
        model(**batch)  # no gradients
    assert tuner._signal_collectors == {} and hook_installed(model)

    model(**batch).loss.backward()
    assert list(tuner._signal_collectors) == ["default"]
    assert not hook_installed(model) and tuner.model._forward_pre_hooks == {}


def test_nothing_is_left_after_the_reallocation():
    model = adaptive_model(max_r=12, signal_steps=2)
    optimizer, reports = one_call_loop(model, batches(4))
    assert [r is not None for r in reports] == [False, True, False, False]
    tuner = model.base_model
    assert tuner._signal_collectors == {} and tuner._forward_start_hook is None
    model(**batches(1)[0]).loss.backward()
    assert tuner._signal_collectors == {}


def test_only_the_active_trainable_adapter_starts():
    model = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS)
    model.add_adapter("other", AdaptiveLoraConfig(r=2, target_modules=["q_proj", "v_proj"], signal_steps=2))
    model.set_adapter("default")
    model(**batches(1)[0]).loss.backward()
    assert list(model.base_model._signal_collectors) == ["default"]
    assert not hook_installed(model)

    frozen = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS)
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen.base_model.model.lm_head.weight.requires_grad_(True)  # something else trains
    frozen(**batches(1)[0]).loss.backward()
    assert frozen.base_model._signal_collectors == {}


def test_ranks_set_by_hand_start_nothing():
    model = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS)
    model.base_model.resize_adapter({name: 2 for name in model.base_model.ranks()})
    assert not hook_installed(model)
    model(**batches(1)[0]).loss.backward()
    assert model.base_model._signal_collectors == {}


def test_an_inference_adapter_and_a_reallocated_one_install_no_hook():
    frozen = get_peft_model(tiny_llama(), AdaptiveLoraConfig(r=4, target_modules=["q_proj"], inference_mode=True))
    done = get_peft_model(tiny_llama(), AdaptiveLoraConfig(r=4, target_modules=["q_proj"], reallocation_step=5))
    assert not hook_installed(frozen) and not hook_installed(done)


def test_a_loop_resumed_after_the_reallocation_collects_nothing(tmp_path):
    data = batches(5)
    model = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS)
    one_call_loop(model, data[:4])
    model.save_pretrained(tmp_path)
    ranks = model.base_model.ranks()

    resumed = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS)  # a fresh process rebuilds the model ...
    resumed.load_adapter(str(tmp_path), adapter_name="default", is_trainable=True)  # ... and loads the checkpoint
    assert resumed.base_model.ranks() == ranks
    optimizer = optimizer_for(resumed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed(**data[4]).loss.backward()  # the first training forward starts a collection ...
        optimizer.step()
        assert resumed.base_model.update_and_allocate(5, optimizer) is None  # ... that step 5 closes unused
    assert resumed.base_model._signal_collectors == {} and resumed.base_model.ranks() == ranks


def test_the_callback_starts_the_signals_itself(tmp_path):
    """A run too short to reallocate (allow_plain_lora) must not leave the forward's collection running."""
    model = adaptive_model(max_r=12, signal_steps=8)
    model(**batches(1)[0]).loss.backward()  # a training forward before training: the hook starts a collection
    model.zero_grad()
    assert list(model.base_model._signal_collectors) == ["default"]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    callback = AdaptiveLoraCallback(allow_plain_lora=True)
    with pytest.warns(UserWarning, match="training as plain LoRA"):
        Trainer(model=model, args=args, train_dataset=TokenDataset(16), callbacks=[callback]).train()
    assert model.base_model._signal_collectors == {} and not hook_installed(model)
    assert set(model.base_model.ranks().values()) == {4}


def test_torch_compile_starts_the_signals_eagerly():
    data = batches()
    eager = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS, lora_dropout=0.0)
    one_call_loop(eager, data)
    torch._dynamo.reset()
    model = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS, lora_dropout=0.0)
    compiled = torch.compile(model, backend="aot_eager")
    optimizer = optimizer_for(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # (not "error": dynamo reads tensor attributes that warn while tracing)
        for step, batch in enumerate(data, start=1):
            compiled(**batch).loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step, optimizer)
            optimizer.zero_grad()
    assert not [w for w in caught if "signal collection" in str(w.message)]
    assert model.base_model.ranks() == eager.base_model.ranks()
    state, expected = adapter_state(model), adapter_state(eager)
    assert all(torch.allclose(state[n], expected[n], rtol=1e-5, atol=1e-6) for n in expected)
