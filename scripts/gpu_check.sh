#!/usr/bin/env bash
# The first run on a new GPU machine: does the training stack work there, and how fast is it?
#
#   scripts/gpu_check.sh [--out DIR]         # every CUDA device of this machine (torchrun, NCCL)
#   scripts/gpu_check.sh --cpu [--out DIR]   # the same checks, reduced: 2 gloo processes, a few steps
#   scripts/gpu_check.sh --only fp16,speed   # some of the checks (names as in the table below)
#
# On FAKE data (torchvision's FakeData with a learnable class pattern, no data set needed), with
# torchrun --nproc_per_node N (N: the CUDA devices; 2 with --cpu):
#   bf16        bvit_5m, bf16 autocast, batch 256 per GPU, 300 steps (--cpu: 8): loss finite, falling
#   fp16        the same in fp16 autocast with the gradient scaler
#   ema-eval    the in-run evaluation of the EMA equals --eval --eval-ema of the saved checkpoint,
#               in a fresh single process
#   compile     --torchcompile (inductor; --cpu: aot_eager), 2 epochs: finite loss, epoch times
#   resume      SIGTERM to torchrun in the last epoch of the bf16 run's command, then --resume: the
#               weights of the uninterrupted bf16 run (largest difference printed; <= 1e-5 passes)
#   speed       images/s of bvit_5m and deit_tiny_patch16_224 training at batch 256 per GPU (bf16,
#               the whole train_hp.py epoch, data loading included)
# In one process on the first device (no data loading):
#   model-speed python -m bvit.benchmark, the default suite (bvit_5m without the stem, its
#               broad=False twin, deit_tiny_patch16_224) at 224, bf16 autocast, TF32, batch 256,
#               inference and training step, eager then torch.compile (inductor; --cpu: batch 2 at
#               32, backend eager): ok when both runs end and every img/s is finite; prints bvit_5m's
#               img/s and its ratios to the twin and to DeiT. Output: DIR/model-speed/
#   fmnist      python -m studies.fmnist_gpu: Fashion-MNIST, all 60,000 training images, the
#               BViT-5M token geometry (50 tokens, D=192, 12 layers), 8 seeds x (BViT, twin), 30
#               epochs, bf16, data and augmentation on the GPU (--cpu: 2 seeds, 2 epochs, 512
#               images, D=16, 2 layers): ok when it ends, every number is finite and every run's
#               training loss fell; prints the EMA top-1 of both, the paired difference with its
#               95% t-interval and how many runs converged. Output: DIR/fmnist/ (fmnist.json,
#               fmnist.md). Data: --fmnist $FMNIST (default data/fashion-mnist, `make fmnist-data`;
#               --cpu falls back to /usr/share/datasets/fashion-mnist); $FMNIST_ARGS is appended
#               to its command (e.g. FMNIST_ARGS=--compile).
#   pipeline    the input pipelines on JPEGs: scripts/photo_folder.py writes 2,048 + 512 photos at
#               ImageNet sizes (8 hard links each: 16,384 training files), then for --pipeline deit
#               and fast: train_hp.py --benchmark-data (the loader alone, 16 workers) and 2 epochs of
#               bvit_5m (released stem) training, batch 256, bf16, one process; beside them
#               bvit.benchmark --suite released (the model alone, the same step without data).
#               ok when every rate is finite; prints each pipeline's training img/s as a fraction of
#               the model-alone rate (how busy it keeps the GPU) and the loader's img/s per core
#               (--cpu: 32 + 8 photos at 32 px, 1 worker, batch 16, 1 epoch). Output: DIR/pipeline/
# and prints one table (each row also goes to DIR/summary.txt as soon as it is known). Exit status
# 0 when every check passed, 1 otherwise, 2 for bad usage.
# Every run's output is in DIR (default: a new folder under /tmp), which must be new or empty.
#
# Time on one H200 (none of it measured yet: estimates, and the caps that hold them):
#   bf16, fp16 ~1 min each; ema-eval, speed under 1 min each; resume ~1.5 min; compile ~2 min
#   (inductor's compilation of bvit_5m assumed ~1 min): about 6 min together.
#   model-speed: eager ~0.5 min; compiled: 6 graphs (3 models x inference, training), assumed
#   0.5-1 min of inductor each; the whole row is cut at MODEL_SPEED_S (default 180) seconds.
#   pipeline: the photos ~5 s (16 processes), 2 loader-only runs ~10 s each, 2 training runs of 2
#   epochs ~30 s each, the model alone ~20 s: ~1.7 min, cut at PIPELINE_S (default 150) seconds.
#   fmnist: 16 runs x 30 epochs x 58 steps x 1024 images = 28.5M training images x 1.67 GFLOP
#   (3x the 0.556 GFLOP forward of bvit.flops.count_flops at 28x28) = 47.6 PFLOP, plus 11
#   evaluations x 32 models x 10,000 images x 0.556 GFLOP = 2.0 PFLOP: 49.5 PFLOP. Assumed
#   100-150 TFLOP/s achieved (10-15% of the H200's dense bf16 peak; a 192-wide model with 50
#   tokens spends much of its time in memory-bound element-wise kernels): 330-500 s. Its own
#   guard stops it after epoch 2 when the measured pace projects more than FMNIST_BUDGET_S
#   (default 360 here, so that pipeline and fmnist fit one 9-minute command) seconds (the row then
#   fails with the measured img/s), and the row is cut at FMNIST_BUDGET_S + 30 s.
# Two commands of at most 9 minutes each (the device tool's limit):
#   scripts/gpu_check.sh --out gpu1 --only bf16,ema-eval,fp16,compile,resume,speed,model-speed
#   make fmnist-data   # before, on the machine that sends the tree: data/fashion-mnist is carried
#   scripts/gpu_check.sh --out gpu2 --only fmnist,pipeline
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODE=gpu
OUT=
ONLY=
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --only) ONLY=",${2:?--only needs a list, e.g. bf16,resume},"; shift ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (usage: scripts/gpu_check.sh [--cpu] [--out DIR] [--only LIST])" >&2; exit 2 ;;
    esac
    shift
done
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "error: --out $OUT is not empty; give a new folder (earlier results are never overwritten)" >&2
    exit 2
fi
mkdir -p "$OUT"

COMMON=(--data-set FAKE --fake-classes 10 --aa none --reprob 0 --mixup 0 --cutmix 0 --smoothing 0
        --scale 1 1 --ratio 1 1 --hflip 0 --color-jitter 0 --no-repeated-aug --drop-path 0 --sched none
        --unscale-lr --model-ema-decay 0.99)
if [ "$MODE" = cpu ]; then
    N=2
    BATCH=16
    COMMON+=(--device cpu --threads 1 --input-size 16 --patch-size 4 --num_workers 0 --print-freq 1
             --fake-size $((BATCH * N * 12)) --fake-val-size 32)
    EPOCHS=2                      # 12 steps per epoch: a SIGTERM at the last epoch's first line lands inside it
    COMPILE=aot_eager
    export OMP_NUM_THREADS=1
    MS_ARGS=(--device cpu --batch-size 2 --img-size 32 --repeats 1 --iters 1 --warmup 1 --threads 1 --no-memory)
    MS_BACKEND=eager              # the mechanism without a C compiler, in seconds
    MODEL_SPEED_S=${MODEL_SPEED_S:-300}
    FM_ARGS=(--device cpu --seeds 2 --epochs 2 --train-size 512 --test-size 256 --batch-size 64 --embed-dim 16
             --depth 2 --heads 2 --head-dim 8 --threads 1)
    FMNIST_BUDGET_S=${FMNIST_BUDGET_S:-240}
    if [ -z "${FMNIST:-}" ] && [ ! -d data/fashion-mnist ]; then FMNIST=/usr/share/datasets/fashion-mnist; fi
    PHOTOS=(--images 32 --classes 4 --copies 1 --jobs 1)
    PIPE=(--device cpu --threads 1 --input-size 32 --patch-size 4 --batch-size 16 --num_workers 1 --print-freq 1000)
    PIPE_EPOCHS=1
    PIPE_IMAGES=32
    PIPE_MODEL=(--device cpu --batch-size 16 --img-size 32 --repeats 1 --iters 2 --warmup 1 --threads 1 --no-memory)
    PIPELINE_S=${PIPELINE_S:-120}
else
    N=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [ "${N:-0}" -lt 1 ]; then
        echo "error: no CUDA device visible to $PY (for the reduced check on the CPU: scripts/gpu_check.sh --cpu)" >&2
        exit 2
    fi
    BATCH=256
    COMMON+=(--input-size 224 --num_workers 8 --print-freq 20 --fake-size $((BATCH * N * 100)) --fake-val-size 1024)
    EPOCHS=3                      # 100 steps per epoch
    COMPILE=inductor
    MS_ARGS=(--device cuda --batch-size "$BATCH" --repeats 5 --iters 10 --warmup 3)
    MS_BACKEND=inductor
    MODEL_SPEED_S=${MODEL_SPEED_S:-180}
    FMNIST_BUDGET_S=${FMNIST_BUDGET_S:-360}
    FM_ARGS=(--device cuda --budget-s "$FMNIST_BUDGET_S")
    PHOTOS=(--images 2048 --classes 10 --copies 8 --jobs 16)
    PIPE=(--input-size 224 --batch-size "$BATCH" --num_workers 16 --print-freq 20 --amp --amp-dtype bf16)
    PIPE_EPOCHS=2
    PIPE_IMAGES=8192
    PIPE_MODEL=(--device cuda --batch-size "$BATCH" --repeats 3 --iters 10 --warmup 3 --amp bf16)
    PIPELINE_S=${PIPELINE_S:-150}
fi
FMNIST=${FMNIST:-data/fashion-mnist}
LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$N")
BVIT=(--arch BViT-5 --batch-size "$BATCH" "${COMMON[@]}")
ROWS=()
FAILED=0
row() {  # row NAME STATUS WHAT
    ROWS+=("$(printf '%-11s %-4s %s' "$1" "$2" "$3")")
    printf '%s\n' "${ROWS[-1]}" >>"$OUT/summary.txt"
    [ "$2" = ok ] || FAILED=1
}
seconds() { echo $(( $(date +%s) - $1 )); }
ended() { [ "$1" = 124 ] && echo "cut at $2 s" || echo "exit $1"; }  # ended STATUS LIMIT: why a timed run stopped
want() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }  # want NAME: is the check asked for

# check.py: the numbers of the runs, read back from their log.txt and checkpoints
check() { "$PY" - "$@" <<'EOF'
import json, math, re, sys
import torch

def rows(folder):
    return [json.loads(line) for line in open(f'{folder}/log.txt') if line.strip()]

kind = sys.argv[1]
if kind == 'loss':  # loss finite and falling over the epochs
    r = rows(sys.argv[2])
    losses = [x['train_loss'] for x in r]
    ok = len(losses) >= 2 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    print(('ok' if ok else 'FAIL'), 'loss ' + ' -> '.join(f'{v:.4f}' for v in losses) +
          f', {r[-1]["train_images_per_sec"]:.0f} img/s')
elif kind == 'ema':  # the run's last EMA evaluation against the fresh process's line
    last = rows(sys.argv[2])[-1]
    m = re.search(r'^\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)', open(sys.argv[3]).read(), re.M)
    if m is None:
        print('FAIL no evaluation line in', sys.argv[3])
    else:
        acc, loss = float(m.group(1)), float(m.group(3))
        ok = abs(acc - last['test_ema_acc1']) < 5e-4 and abs(loss - last['test_ema_loss']) < 1e-3
        print(('ok' if ok else 'FAIL'), f'in run: EMA top-1 {last["test_ema_acc1"]:.3f}, loss {last["test_ema_loss"]:.4f};'
              f' fresh --eval --eval-ema: {acc:.3f}, {loss:.3f}')
elif kind == 'compile':
    r = rows(sys.argv[2])
    ok = all(math.isfinite(x['train_loss']) for x in r) and len(r) == 2
    print(('ok' if ok else 'FAIL'), f'epoch times {r[0]["epoch_time_s"]:.1f} s (with the compilation) then '
          f'{r[-1]["epoch_time_s"]:.1f} s; {r[-1]["train_images_per_sec"]:.0f} img/s; loss {r[-1]["train_loss"]:.4f}')
elif kind == 'resume':
    a, b = (torch.load(f'{d}/checkpoint.pth', weights_only=True) for d in sys.argv[2:4])
    diff = max((a[k][n].float() - b[k][n].float()).abs().max().item() for k in ('model', 'model_ema') for n in a[k])
    print(('ok' if diff <= 1e-5 and b['position'] is None else 'FAIL'),
          f'stopped at epoch {sys.argv[4]}, iteration {sys.argv[5]}; resumed weights vs uninterrupted: largest difference {diff:.3g}')
elif kind == 'model-speed':  # bvit.benchmark's JSON of the eager and the compiled run
    parts, ok = [], True
    for path in sys.argv[2:]:
        d = json.load(open(path))
        res, rel = d['runs'][0], d['ratios'][0]
        label = next(k for k in res if k.startswith('bvit') and 'broad=False' not in k)
        cells = []
        for m in ('infer', 'train'):
            v, twin, deit = res[label][m], rel[label][f'{m} x twin'], rel[label][f'{m} x DeiT']
            ok &= all(math.isfinite(x) and x > 0 for x in (v, twin, deit))
            ok &= all(math.isfinite(r[m]) for r in res.values())
            mib = res[label].get(f'{m} MiB')
            cells.append(f'{m} {v:.0f} img/s x{twin:.2f} twin x{deit:.2f} DeiT' + (f' {mib:.0f} MiB' if mib else ''))
        parts.append(d['compiled'] + ': ' + ', '.join(cells))
    print(('ok' if ok and len(parts) == 2 else 'FAIL'), f'bvit_5m(stem=none) ' + '; '.join(parts) +
          f'; {d["precision"]}, batch {d["args"]["batch_size"]} at {d["args"]["img_size"]}')
elif kind == 'fmnist':  # studies/fmnist_gpu.py's record
    d = json.load(open(sys.argv[2]))
    runs, s = d['results'], d['summary']
    numbers = [v for r in runs for v in r['curve'] + r['raw_curve'] + r['train_loss']]
    fell = all(r['train_loss'][-1] < r['train_loss'][0] for r in runs)
    ok = all(math.isfinite(v) for v in numbers) and fell and len(runs) >= 4
    by = {b: [r['acc1'] for r in runs if r['meta']['broad'] == b] for b in (True, False)}
    mean = lambda v: sum(v) / len(v)
    p = s['paired']
    ci = f'[{p["ci"][0]:+.2f}, {p["ci"][1]:+.2f}]' if p['ci'] else '-'
    print(('ok' if ok else 'FAIL'), f'{len(runs) // 2} seeds x 2, {d["args"]["epochs"]} epochs: EMA top-1 BViT '
          f'{mean(by[True]):.2f}, twin {mean(by[False]):.2f}; BViT - twin {mean(p["diffs"]):+.2f} {ci} (95% t); '
          f'converged {s["converged"]}/{s["runs"]}; ' + ('' if fell else 'a training loss did not fall; ') +
          f'{d["train_img_per_s"]:.0f} img/s, {d["wall_s"]:.0f} s')
elif kind == 'pipeline':  # DIR/pipeline: the loader-only lines, the training logs, the model-alone JSON
    folder = sys.argv[2]
    alone = json.load(open(f'{folder}/model.json'))['runs'][0]['bvit_5m(stem=conv)']['train']
    parts, per_core, ok = [], {}, math.isfinite(alone) and alone > 0
    for p in ('deit', 'fast'):
        last = [l for l in open(f'{folder}/data-{p}.log') if l.startswith('data: ')][-1].split()
        per_core[p], wall = float(last[1]), float(last[last.index('wall;') - 2])
        train = rows(f'{folder}/train-{p}')[-1]['train_images_per_sec']
        ok &= all(math.isfinite(v) and v > 0 for v in (per_core[p], wall, train))
        parts.append(f'{p}: training {train:.0f} img/s = {train / alone:.2f} of the model alone, '
                     f'loader alone {wall:.0f} img/s, {per_core[p]:.0f}/core')
    print(('ok' if ok else 'FAIL'), '; '.join(parts) + f'; model alone {alone:.0f} img/s; '
          f'fast/deit per core {per_core["fast"] / per_core["deit"]:.2f}x')
elif kind == 'speed':
    bvit, deit = (rows(d)[-1]['train_images_per_sec'] for d in sys.argv[2:4])
    print('ok', f'bvit_5m {bvit:.0f} img/s, deit_tiny {deit:.0f} img/s ({bvit / deit:.2f}x) at batch {sys.argv[4]} '
          f'per process, {sys.argv[5]} processes')
EOF
}
result() {  # result NAME CHECK-ARGS...: one table row from check's line
    local name=$1; shift
    local line
    line=$(check "$@" 2>>"$OUT/check.err") || line="FAIL the check itself failed (see $OUT/check.err)"
    row "$name" "${line%% *}" "${line#* }"
}
run() {  # run NAME ARGS...: one launch, its output in OUT/NAME.log; status in $?
    local name=$1; shift
    "$@" >"$OUT/$name.log" 2>&1
}

echo "gpu_check: $MODE, $N processes, output in $OUT"
start=$(date +%s)
DET=(--deterministic --epochs "$EPOCHS" --amp --amp-dtype bf16)
if ! want bf16 && ! want ema-eval && ! want resume; then
    :  # the bf16 run is also what ema-eval and resume compare with
elif run bf16 "${LAUNCH[@]}" train_hp.py "${BVIT[@]}" "${DET[@]}" --output_dir "$OUT/bf16"; then
    result bf16 loss "$OUT/bf16"
else
    row bf16 FAIL "exit $? (see $OUT/bf16.log)"
fi
if ! want ema-eval; then
    :
elif [ -f "$OUT/bf16/checkpoint.pth" ]; then
    # a fresh single process, the same precision and kernels
    if CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} run ema-eval "$PY" train_hp.py "${BVIT[@]}" --deterministic \
            --amp --amp-dtype bf16 --eval --eval-ema --resume "$OUT/bf16/checkpoint.pth"; then
        result ema-eval ema "$OUT/bf16" "$OUT/ema-eval.log"
    else
        row ema-eval FAIL "exit $? (see $OUT/ema-eval.log)"
    fi
else
    row ema-eval FAIL "no checkpoint of the bf16 run"
fi

if ! want fp16; then
    :
elif run fp16 "${LAUNCH[@]}" train_hp.py "${BVIT[@]}" --epochs "$EPOCHS" --amp --amp-dtype fp16 --output_dir "$OUT/fp16"; then
    result fp16 loss "$OUT/fp16"
else
    row fp16 FAIL "exit $? (see $OUT/fp16.log)"
fi

if ! want compile; then
    :
elif run compile "${LAUNCH[@]}" train_hp.py "${BVIT[@]}" --epochs 2 --amp --amp-dtype bf16 --torchcompile "$COMPILE" \
        --output_dir "$OUT/compile"; then
    result compile compile "$OUT/compile"
else
    row compile FAIL "exit $? (see $OUT/compile.log)"
fi

# SIGTERM to torchrun (it forwards it to the workers) at the first progress line of the last epoch
last=$((EPOCHS - 1))
stop=
if want resume; then
    "${LAUNCH[@]}" train_hp.py "${BVIT[@]}" "${DET[@]}" --output_dir "$OUT/cut" >"$OUT/cut.log" 2>&1 &
    pid=$!
    deadline=$(( $(date +%s) + 240 ))
    while kill -0 "$pid" 2>/dev/null; do
        if grep -q "^Epoch \[$last/$last\] \[ *[0-9]*/" "$OUT/cut.log"; then kill -TERM "$pid"; break; fi
        if [ "$(date +%s)" -gt "$deadline" ]; then kill -KILL "$pid"; break; fi
        sleep 0.2
    done
    wait "$pid"
    stop=$(grep -o "stopped by SIGTERM at epoch [0-9]*, iteration [0-9]*" "$OUT/cut.log" | head -1)
fi
if ! want resume; then
    :
elif [ -z "$stop" ]; then
    row resume FAIL "no mid-epoch stop (see $OUT/cut.log)"
elif run resume "${LAUNCH[@]}" train_hp.py "${BVIT[@]}" "${DET[@]}" --output_dir "$OUT/cut" \
        --resume "$OUT/cut/checkpoint.pth"; then
    set -- $stop
    result resume resume "$OUT/bf16" "$OUT/cut" "${6%,}" "$8"
else
    row resume FAIL "exit $? (see $OUT/resume.log)"
fi

if ! want speed; then
    :
elif run speed-bvit "${LAUNCH[@]}" train_hp.py "${BVIT[@]}" --epochs 1 --amp --amp-dtype bf16 --no-model-ema \
        --eval-freq 1000 --output_dir "$OUT/speed-bvit" &&
   run speed-deit "${LAUNCH[@]}" train_hp.py --arch deit_tiny_patch16_224 --batch-size "$BATCH" "${COMMON[@]}" \
        --epochs 1 --amp --amp-dtype bf16 --no-model-ema --eval-freq 1000 --output_dir "$OUT/speed-deit"; then
    result speed speed "$OUT/speed-bvit" "$OUT/speed-deit" "$BATCH" "$N"
else
    row speed FAIL "exit $? (see $OUT/speed-*.log)"
fi

if want model-speed; then
    mkdir -p "$OUT/model-speed"
    ms_start=$(date +%s)
    if run model-speed-eager timeout "$MODEL_SPEED_S" "$PY" -m bvit.benchmark "${MS_ARGS[@]}" --amp bf16 \
            --json "$OUT/model-speed/eager.json"; then
        left=$(( MODEL_SPEED_S - $(seconds "$ms_start") ))
        if [ "$left" -lt 1 ]; then
            row model-speed FAIL "no time left for the compiled run (MODEL_SPEED_S=$MODEL_SPEED_S)"
        elif run model-speed-compiled timeout "$left" "$PY" -m bvit.benchmark "${MS_ARGS[@]}" --amp bf16 --compile \
                --compile-backend "$MS_BACKEND" --json "$OUT/model-speed/compiled.json"; then
            result model-speed model-speed "$OUT/model-speed/eager.json" "$OUT/model-speed/compiled.json"
        else
            why=$(ended $? "$MODEL_SPEED_S")
            eager=$(check model-speed "$OUT/model-speed/eager.json" 2>/dev/null | cut -d' ' -f2-)
            row model-speed FAIL "compiled run: $why (see $OUT/model-speed-compiled.log); eager: $eager"
        fi
    else
        row model-speed FAIL "eager run: $(ended $? "$MODEL_SPEED_S") (see $OUT/model-speed-eager.log)"
    fi
    cp "$OUT"/model-speed-*.log "$OUT/model-speed/" 2>/dev/null
fi

if want pipeline; then
    P=$OUT/pipeline
    mkdir -p "$P"
    pipe_start=$(date +%s)
    left() { local s=$(( PIPELINE_S - $(seconds "$pipe_start") )); echo $(( s > 1 ? s : 1 )); }  # timeout 0: none
    why=
    run pipeline-photos timeout "$(left)" "$PY" scripts/photo_folder.py "$P/photos" "${PHOTOS[@]}" ||
        why="photo folder: $(ended $? "$PIPELINE_S") (see $OUT/pipeline-photos.log)"
    for p in deit fast; do
        [ -z "$why" ] || break
        FLAGS=(--arch BViT-5 --data-set FOLDER --data-path "$P/photos" --pipeline "$p" "${PIPE[@]}")
        run "pipeline-data-$p" timeout "$(left)" "$PY" train_hp.py "${FLAGS[@]}" --benchmark-data "$PIPE_IMAGES" ||
            why="loader-only run ($p): $(ended $? "$PIPELINE_S") (see $OUT/pipeline-data-$p.log)"
        cp "$OUT/pipeline-data-$p.log" "$P/data-$p.log" 2>/dev/null
        [ -z "$why" ] || break
        run "pipeline-train-$p" timeout "$(left)" "$PY" train_hp.py "${FLAGS[@]}" --epochs "$PIPE_EPOCHS" \
                --no-model-ema --eval-freq 1000 --output_dir "$P/train-$p" ||
            why="training run ($p): $(ended $? "$PIPELINE_S") (see $OUT/pipeline-train-$p.log)"
    done
    [ -n "$why" ] || run pipeline-model timeout "$(left)" "$PY" -m bvit.benchmark --suite released --modes train \
            "${PIPE_MODEL[@]}" --json "$P/model.json" ||
        why="model alone: $(ended $? "$PIPELINE_S") (see $OUT/pipeline-model.log)"
    if [ -z "$why" ]; then
        result pipeline pipeline "$P"
    else
        row pipeline FAIL "$why"
    fi
    rm -rf "$P/photos"  # rewritten by the next run in seconds; not worth carrying back
fi

if want fmnist; then
    cap=$((${FMNIST_BUDGET_S%.*} + 30))
    # shellcheck disable=SC2086  # FMNIST_ARGS: extra flags, split on spaces
    if run fmnist timeout "$cap" "$PY" -m studies.fmnist_gpu --fmnist "$FMNIST" --out "$OUT/fmnist" "${FM_ARGS[@]}" \
            ${FMNIST_ARGS:-}; then
        result fmnist fmnist "$OUT/fmnist/fmnist.json"
    else
        why=$(ended $? "$cap")
        row fmnist FAIL "$why: $(grep -v '^\s*$' "$OUT/fmnist.log" | tail -1 | cut -c1-300) (see $OUT/fmnist.log)"
    fi
fi

echo
echo "gpu_check summary ($MODE, $N processes, $(seconds "$start") s; logs in $OUT)"
printf '%-11s %-4s %s\n' check ok? measured
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
