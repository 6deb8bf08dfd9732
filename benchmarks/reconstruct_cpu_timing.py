"""What block reconstruction costs on the 2-core CPU, per layer: the pass that computes the dense
layer's targets, one Adam step (8 rows x 512 tokens) and one held-out check (16 rows), on the
35%-pruned SmolLM2-135M that `prunekit prune smollm2-135m --target 0.35 --compensation obs --out
runs/obs35_cpu` wrote; then the estimate for 200 steps in every one of the 30 layers. A full CPU
run of that budget would take most of an hour, so it is estimated, not run.

    python benchmarks/reconstruct_cpu_timing.py     # writes benchmarks/results/grid_obs_reconstruct_cpu_timing.json
"""
import time, json, torch, prunekit
from prunekit.data import calibration_tokens
from prunekit.models.layerwise import embed_calibration
from prunekit.compensate.reconstruct import _outputs, _train_layer, _error
pruned, tok = prunekit.load("runs/obs35_cpu", dtype="float32")
dense, _ = prunekit.load("smollm2-135m", dtype="float32")
ids = calibration_tokens("c4", tok, n_samples=128, seq_len=512, seed=0, data_dir=None)
stream, kw = embed_calibration(pruned, pruned.model.layers, ids, batch_size=8, device="cpu")
layer, ref = pruned.model.layers[0], dense.model.layers[0]
t = time.perf_counter(); target = _outputs(ref, stream, kw[0], 8); t_target = time.perf_counter() - t
g = torch.Generator().manual_seed(0); order = torch.randperm(128, generator=g)
held, train = order[:16].sort().values, order[16:]
t = time.perf_counter(); _error(layer, stream, target, kw[0], held, 8); t_eval = time.perf_counter() - t
steps = 10
t = time.perf_counter(); r = _train_layer(layer, stream, target, kw[0], train, held, steps=steps, lr=1e-4, batch_size=8, eval_every=1000, patience=4, generator=g); t_train = time.perf_counter() - t - t_eval * 2
per_step = t_train / steps
layers, budget = 30, 200
estimate = layers * (2 * t_target + budget * per_step + budget / 25 * t_eval)  # target + advancing pass, steps, held-out checks
out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": "2-core CPU (x86_64), torch threads %d" % torch.get_num_threads(),
       "model": "runs/obs35_cpu (SmolLM2-135M, 35% removed with --compensation obs), layer 0", "calibration": "c4 128x512 seed 0, batch 8",
       "seconds_target_pass": round(t_target, 2), "seconds_held_out_check": round(t_eval, 2), "seconds_per_adam_step": round(per_step, 3),
       "estimate_seconds_200_steps_30_layers": round(estimate)}
print(json.dumps(out))
json.dump(out, open("benchmarks/results/grid_obs_reconstruct_cpu_timing.json", "w"), indent=1)
