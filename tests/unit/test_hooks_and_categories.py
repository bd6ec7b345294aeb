"""Hooks never break what they wrap; categories are exact sums of real tensors."""

import pytest
import torch

from memdiag import phases
from memdiag.categories import SavedTensorCounter, measure
from memdiag.hooks import _Hooks, layer_name
from memdiag.phases import PhaseTracker


@pytest.mark.parametrize(
    "name, layer",
    [
        ("model.layers.3.mlp.up_proj", "model.layers.3"),
        ("model.layers.12", "model.layers.12"),
        ("model.embed_tokens", "model.embed_tokens"),
        ("lm_head", "lm_head"),
        ("", "(root)"),
        ("transformer.h.0.attn.c_attn", "transformer.h.0"),
    ],
)
def test_layer_name(name, layer):
    assert layer_name(name) == layer


class ExplodingTracker(PhaseTracker):
    def begin(self, name):
        raise RuntimeError("tracker broke")


def test_a_failing_hook_disables_itself_and_the_call_still_runs():
    warnings = []
    tracker = ExplodingTracker(lambda r: None)
    hooks = _Hooks(tracker, lambda key, message: warnings.append((key, message)))
    wrapped = hooks.phase_wrapper("forward", lambda x: x * 2)
    assert wrapped(21) == 42
    assert wrapped(2) == 4
    assert len(warnings) == 1 and "forward" in warnings[0][1]
    assert "forward" in hooks.disabled


def test_clear_refs_refusal_is_reported_once_and_peaks_continue(monkeypatch):
    def refuse():
        raise PermissionError(13, "Permission denied", "/proc/self/clear_refs")

    monkeypatch.setattr(phases, "reset_peak_rss", refuse)
    warnings, events = [], []
    tracker = PhaseTracker(events.append, warn_once=lambda k, m: warnings.append(m))
    for _ in range(3):
        with tracker.phase_scope("forward"):
            pass
    assert len(warnings) == 1 and "clear_refs" in warnings[0]
    assert all(e["host_peak_bytes"] > 0 for e in events if e["kind"] == "phase_end")


def test_saved_tensor_counter_counts_activations_not_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    x = torch.randn(32, 64)
    counter = SavedTensorCounter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        loss = model(x).sum()
    # saved: the input x (for W1's grad), ReLU's output (for its own grad and W2's grad)
    assert counter.total_bytes == x.numel() * 4 + 32 * 256 * 4
    loss.backward()  # unpack hands the same tensors back: gradients unchanged
    assert model[0].weight.grad is not None


def test_measure_is_exact_for_a_plain_model_and_adamw():
    model = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.Linear(50, 10))
    optimizer = torch.optim.AdamW(model.parameters())
    params_bytes = sum(p.numel() * 4 for p in model.parameters())
    before = measure(model, activations_bytes=0)
    assert before["parameters"] == params_bytes
    assert before["gradients"] == 0 and before["optimizer_exp_avg"] == 0
    model(torch.randn(4, 100)).sum().backward()
    optimizer.step()

    class Engine:  # what DeepSpeed's engine exposes: .module and .optimizer
        pass

    engine = Engine()
    engine.module, engine.optimizer = model, optimizer
    after = measure(engine, activations_bytes=123)
    assert after["gradients"] == params_bytes
    assert after["optimizer_exp_avg"] == after["optimizer_exp_avg_sq"] == params_bytes
    assert after["activations"] == 123


def test_a_deepspeed_internal_missing_in_this_version_is_said_once_and_the_rest_still_works(monkeypatch):
    """A user's DeepSpeed without the ZeRO-3 coordinator memdiag patches for layer attribution:
    installing the hooks warns once, naming the feature and the version, and patches the rest."""
    import deepspeed
    import deepspeed.runtime.zero.partitioned_param_coordinator as coordinator

    from memdiag import hooks
    from memdiag.phases import PhaseTracker

    monkeypatch.delattr(coordinator, "PartitionedParameterCoordinator")
    hooks.uninstall()
    warnings = []
    try:
        hooks.install(PhaseTracker(lambda record: None), lambda key, message: warnings.append(message))
        assert len(warnings) == 1 and "layer attribution" in warnings[0] and deepspeed.__version__ in warnings[0]
        assert getattr(deepspeed.initialize, "__wrapped__", None) is not None  # the phase hooks are in
    finally:
        hooks.uninstall()
