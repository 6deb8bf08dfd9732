"""The memory estimate of a prune (models/memory.py) against the peak resident memory of a real
prune on the CPU, measured in a fresh process (an allocator that already holds freed memory would
hide the peak), not against the estimator's own formula."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_PRUNE_AND_MEASURE = textwrap.dedent("""
    import json, os, sys, threading, time
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from prunekit.models.memory import pruning_estimate
    from prunekit.models.structure import model_structure
    from prunekit.pipeline import PruneSettings, prune_loaded

    autocast = sys.argv[1] == "1"
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
    baseline = rss()
    config = AutoConfig.for_model("llama", vocab_size=32_000, hidden_size=512, intermediate_size=1536,
                                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ids = torch.randint(32_000, (16, 512), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(target=0.2, criterion_options={"autocast": autocast}, batch_size=8)
    structure = model_structure(model)
    estimate = pruning_estimate(structure, "float32", gradients=True, batch_size=8, seq_len=512, n_samples=16,
                                cached_layers=1, autocast=autocast)
    peak, done = [rss()], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    prune_loaded(model, None, settings, progress=False, calibration=(ids, None))
    done.set()
    thread.join()
    print(json.dumps({"estimate": estimate.total, "parts": estimate.parts, "measured": max(peak[0], rss()) - baseline}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [True, False])
def test_pruning_estimate_is_within_a_quarter_of_the_measured_peak(autocast):
    """Taylor scoring (gradients, saved activations, the chunked loss) and sequential compensation
    of a 4-layer model with a 32,000-token vocabulary, 8 x 512 tokens a batch: the estimate made
    before loading lies within 25% of the peak resident memory that the prune added to the process."""
    from prunekit.models.precision import fast_bfloat16

    if autocast and not fast_bfloat16("cpu"):
        pytest.skip("this CPU has no fast bf16 products, so autocast is off")
    out = subprocess.run([sys.executable, "-c", _PRUNE_AND_MEASURE, "1" if autocast else "0"], capture_output=True,
                         text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["estimate"] / result["measured"]
    assert 0.75 <= ratio <= 1.25, result
