# Sourced by the GPU scripts that run the real SmolLM2-135M (gpu_default_grid.sh): the GPU machine
# has no network and no gguf / lm-eval packages, and a call carries at most 64 MiB, so an earlier
# call carries the GGUF's first half (.gpu/m1/part.00) and the data sets (.gpu/data), and the
# running call the second half (.gpu/m2/part.01, with the whole file's SHA-256) and the pure-Python
# packages (.gpu/site, .gpu/whl). Sets MODEL and the environment.
MODEL=/tmp/smollm2.gguf
if [ ! -f $MODEL ]; then
    cat .gpu/m1/part.00 .gpu/m2/part.01 > $MODEL.tmp
    echo "$(cat .gpu/m2/sha256)  $MODEL.tmp" | sha256sum -c --quiet
    mv $MODEL.tmp $MODEL
fi
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:.gpu/site:src PRUNEKIT_DATA_DIR=.gpu/data PYTHONUNBUFFERED=1
