"""The memory estimate a layer-by-layer prune is admitted on (pipeline.memory_needs, built from
models/memory.layer_by_layer_estimate) against the peak resident memory the real prune adds to a
fresh process on the CPU, not against the estimator's own formula.

Layer by layer, the estimate is the work device's share: the calibration states of every row, one
layer and one batch through it (or one layer's fit), and the MLP inputs sequential compensation
keeps; not the model, which the CPU holds anyway. So the measurement starts after the model is
built: what the prune adds above it is what the estimate speaks for."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_PRUNE_LAYER_BY_LAYER_AND_MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from prunekit.models.structure import model_structure
    from prunekit.pipeline import CalibrationSettings, PruneSettings, memory_needs, prune_loaded

    criterion, compensation = sys.argv[1], sys.argv[2]
    n_samples, seq_len = int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(2)
    status = lambda key: int(next(line for line in open("/proc/self/status")
                                  if line.startswith(key + ":")).split()[1]) * 1024
    config = AutoConfig.for_model("llama", vocab_size=8000, hidden_size=512, intermediate_size=1536,
                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(8000, (n_samples, seq_len), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(target=0.3, criterion=criterion, compensation=compensation, batch_size=8,
                             layer_by_layer=True, device="cpu",
                             calibration=CalibrationSettings(n_samples=n_samples, seq_len=seq_len))
    (need,) = memory_needs(model_structure(model), "float32", settings)
    baseline = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here: the prune's own peak
    prune_loaded(model, None, settings, progress=False, calibration=(ids, None))
    print(json.dumps({"estimate": need.estimate.total, "parts": need.estimate.parts,
                      "measured": status("VmHWM") - baseline}))
""")


def _measure(criterion: str, compensation: str, n_samples: int, seq_len: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _PRUNE_LAYER_BY_LAYER_AND_MEASURE, criterion, compensation,
                          str(n_samples), str(seq_len)], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("criterion, compensation", [("activation", "none"), ("activation", "one-shot"),
                                                     ("activation", "sequential"), ("magnitude", "obs")])
def test_layer_by_layer_estimate_is_a_lower_bound_within_two_and_a_half_times_the_measured_peak(criterion,
                                                                                                compensation):
    """A 4-layer model (hidden 512, FFN 1536, 8,000-token vocabulary, fp32) pruned 30% layer by layer on
    the CPU over 64 x 512 calibration tokens, batches of 8. The estimate is, as memory.py says, rough
    and on the low side: the peak the prune adds lies between 1 and 2.5 times it. Measured on the
    2-core Xeon (2026-12-07): estimate 196 MiB in every case; peak 268 MiB without compensation
    (1.37x), 421 sequential (2.15x), 398 OBS (2.03x), 455 one-shot (2.32x). Which parts the
    estimate leaves out was not measured part by part; the layer's outputs beside its inputs and one
    batch's attention scores are of the right size to explain most of the gap."""
    result = _measure(criterion, compensation, n_samples=64, seq_len=512)
    assert 1.0 <= result["measured"] / result["estimate"] <= 2.5, result
