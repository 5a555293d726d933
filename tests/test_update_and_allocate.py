"""``AdaptiveLoraModel.update_and_allocate``: the one call per optimizer step of a hand-written loop.

It must give exactly what the low-level sequence (``start_signal_collection``, ``record_gradients`` each step,
``reallocate`` at the step) gives, and what ``Trainer`` with ``AdaptiveLoraCallback`` gives on the same data.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator, get_linear_schedule_with_warmup

from peft_adaptive import AdaptiveLoraCallback, calibrate_adaptive_lora
from peft_adaptive.scores import get_score

from .tiny_models import TokenDataset, adaptive_model

SIGNAL_STEPS = 3
STEPS = 7


def batches(n: int = STEPS, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    data = TokenDataset(n * batch_size, seed=2)
    return [default_data_collator([data[i * batch_size + j] for j in range(batch_size)]) for i in range(n)]


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_for(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def one_call_loop(model, data, start_first: bool = False):
    """The README's hand-written loop: one call after optimizer.step()."""
    optimizer = optimizer_for(model)
    if start_first:
        model.base_model.start_signal_collection()
    reports = []
    for step, batch in enumerate(data, start=1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        reports.append(model.base_model.update_and_allocate(step, optimizer))
        optimizer.zero_grad()
    return optimizer, reports


def low_level_loop(model, data):
    """The same schedule with the lower-level methods."""
    optimizer = optimizer_for(model)
    tuner = model.base_model
    tuner.start_signal_collection()
    report = None
    for step, batch in enumerate(data, start=1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if step <= SIGNAL_STEPS:
            tuner.record_gradients()
        if step == SIGNAL_STEPS:
            report = tuner.reallocate(optimizer, step=step)
        optimizer.zero_grad()
    return optimizer, report


def assert_same_model(a, b) -> None:
    assert a.base_model.ranks() == b.base_model.ranks()
    state_a, state_b = adapter_state(a), adapter_state(b)
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[n], state_b[n]) for n in state_a), "weights differ"


@pytest.mark.parametrize(
    "config",
    [{}, {"score": "norms", "delta_weight": 0.5, "growth": "gradient"}, {"score": "norms"}],
    ids=["default", "delta-and-gradient-growth", "norms"],
)
def test_one_call_gives_exactly_the_low_level_sequence(config):
    data = batches()
    one = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS, lora_dropout=0.0, **config)
    # the weight delta and the gradient sketch (gradient growth, the sketch scores) must see the first step
    built = one.peft_config["default"]
    needs = get_score(built.score).needs(built, one.base_model.adapted_modules(), "default")
    needs_early_start = needs.delta or needs.sketch or built.growth == "gradient"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # started before the loop when needed: no late-start warning
        _, reports = one_call_loop(one, data, start_first=needs_early_start)
    low = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS, lora_dropout=0.0, **config)
    _, report = low_level_loop(low, data)

    assert [r is not None for r in reports] == [s == SIGNAL_STEPS for s in range(1, STEPS + 1)]
    got = reports[SIGNAL_STEPS - 1]
    assert got.step == SIGNAL_STEPS and got.signal_steps == SIGNAL_STEPS
    assert got.ranks_after == report.ranks_after and got.scores == report.scores
    assert len(set(got.ranks_after)) > 1
    assert one.peft_config["default"].reallocation_step == SIGNAL_STEPS
    assert_same_model(one, low)


def test_one_call_gives_exactly_the_trainer_with_the_callback(tmp_path):
    """Same data, order, optimizer, schedule and clipping: the Trainer run and the hand loop agree bit for bit."""
    data = TokenDataset(4 * STEPS, seed=2)

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_grad_norm=1.0,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    trained = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS)
    callback = AdaptiveLoraCallback()
    trainer = InOrder(model=trained, args=args, train_dataset=data, callbacks=[callback])
    trainer.model_accepts_loss_kwargs = False  # the plain mean loss, as the hand loop computes it
    trainer.train()
    assert callback.reallocation_step == SIGNAL_STEPS

    model = adaptive_model(max_r=12, signal_steps=SIGNAL_STEPS)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_cls(params, weight_decay=args.weight_decay, **optimizer_kwargs)  # Trainer's optimizer
    schedule = get_linear_schedule_with_warmup(optimizer, 0, STEPS)
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=default_data_collator)
    model.base_model.start_signal_collection(seed=args.seed)  # the default score's sketch sees step 1, as in Trainer
    for step, batch in enumerate(loader, start=1):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        model.base_model.update_and_allocate(step, optimizer, seed=args.seed)
        schedule.step()
        optimizer.zero_grad()
    assert_same_model(model, trained)


def test_the_schedule_does_nothing_after_the_reallocation():
    model = adaptive_model(max_r=12, signal_steps=2)
    optimizer, reports = one_call_loop(model, batches(4))
    assert [r is not None for r in reports] == [False, True, False, False]
    ranks = model.base_model.ranks()
    # later calls (also with a step count that starts over) change nothing and start nothing
    for step in (1, 2, 5):
        assert model.base_model.update_and_allocate(step, optimizer) is None
    assert model.base_model.ranks() == ranks
    assert model.base_model._signal_collectors == {}


def test_a_calibrated_adapter_is_not_reallocated_again():
    model = adaptive_model(max_r=12, signal_steps=2, score="gradient_spectrum", growth="gradient")
    calibrate_adaptive_lora(model, batches(2))
    ranks = model.base_model.ranks()
    _, reports = one_call_loop(model, batches(3))
    assert reports == [None, None, None]
    assert model.base_model.ranks() == ranks and model.base_model._signal_collectors == {}


def test_a_late_first_call_warns_what_it_missed():
    model = adaptive_model(max_r=12, signal_steps=4)
    optimizer = optimizer_for(model)
    data = batches(4)
    for step, batch in enumerate(data, start=1):
        model(**batch).loss.backward()
        optimizer.step()
        if step == 2:
            with pytest.warns(UserWarning, match=r"misses the gradients of steps 1\.\.1.*start_signal_collection"):
                model.base_model.update_and_allocate(step, optimizer)
        elif step > 2:
            report = model.base_model.update_and_allocate(step, optimizer)
        optimizer.zero_grad()
    assert report is not None and report.signal_steps == 3


def test_a_first_call_after_the_signal_steps_does_nothing():
    model = adaptive_model(max_r=12, signal_steps=2)
    optimizer = optimizer_for(model)
    assert model.base_model.update_and_allocate(3, optimizer) is None
    assert model.base_model._signal_collectors == {} and set(model.base_model.ranks().values()) == {4}


def test_tracked_delta_started_late_warns():
    """Trained in eval() mode, the model never starts the signals at a forward: they start after step 1."""
    model = adaptive_model(max_r=12, signal_steps=2, score="norms", delta_weight=1.0).eval()
    optimizer = optimizer_for(model)
    model(**batches(1)[0]).loss.backward()
    optimizer.step()
    with pytest.warns(UserWarning, match=r"weight change of step 1.*model\.train\(\)"):
        model.base_model.update_and_allocate(1, optimizer)


def test_the_same_step_twice_is_refused():
    """A call per micro-batch with the optimizer-step count, or a count restarting each epoch."""
    model = adaptive_model(max_r=12, signal_steps=4)
    optimizer = optimizer_for(model)
    batch = batches(1)[0]
    model(**batch).loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(1, optimizer)
    with pytest.raises(ValueError, match="got global_step=1 after 1: call it once per optimizer step"):
        model.base_model.update_and_allocate(1, optimizer)


@pytest.mark.parametrize("step", [0, -1, 1.0, True])
def test_global_step_counts_from_one(step):
    model = adaptive_model()
    with pytest.raises(ValueError, match="global_step must be the number of optimizer steps"):
        model.base_model.update_and_allocate(step)


def test_loss_scale_reaches_the_gradient_sketch():
    """A scaled backward with loss_scale=s sketches what the unscaled backward sketches."""
    sketches = []
    for scale in (1.0, 1024.0):
        model = adaptive_model(max_r=12, signal_steps=2, growth="gradient", lora_dropout=0.0)
        tuner = model.base_model
        tuner.start_signal_collection()
        batch = batches(1)[0]
        (model(**batch).loss * scale).backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(scale)  # what GradScaler.unscale_ does to the parameters' gradients
        tuner.update_and_allocate(1, loss_scale=scale)
        sketches.append(tuner._signal_collectors["default"].sketch.totals())
    assert all(torch.allclose(sketches[0][n], sketches[1][n], rtol=1e-4, atol=1e-7) for n in sketches[0])
