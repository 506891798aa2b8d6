#!/usr/bin/env bash
# The README's quick start in one command: synthetic data -> SimCLR pretraining -> fine-tuning from the SSL
# encoder and from scratch -> one evaluation of both. Run it from any folder: the data, checkpoints and report
# are written under the current folder (./data, ./checkpoints, ./evaluation_results).
#
#   bash quickstart.sh                                  # the README's sizes (README: how long on a 2-core CPU)
#   SSL_EPOCHS=200 bash quickstart.sh                   # longer pretraining (a GPU)
#   FRACTION=0.1 bash quickstart.sh                     # fine-tune on 10% of the labels instead of 5%
#   IMAGES=48 UNLABELED=24 SIZE=32 SSL_EPOCHS=2 FT_STEPS=2 bash quickstart.sh   # a smoke test (the tests' size)
#
# Each phase prints the command it runs; copy it to run or change that phase by hand.
set -euo pipefail

IMAGES=${IMAGES:-800}          # labelled synthetic images (by patient: 45% train, 15% val, 40% test)
UNLABELED=${UNLABELED:-800}    # extra unlabelled images, used by pretraining only
SIZE=${SIZE:-64}               # image side in pixels
SSL_EPOCHS=${SSL_EPOCHS:-32}   # pretraining epochs of the tuned recipe (docs/results.md)
FRACTION=${FRACTION:-0.05}     # labelled share of the train split for both fine-tunings (5%: 18 images)
FT_STEPS=${FT_STEPS:-200}      # fine-tuning optimizer steps, the same for both runs
PYTHON=${PYTHON:-python}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script() {              # a script's path as the user would type it: bare when run from the repository
    if [ "$here" = "$(pwd)" ]; then echo "$1"; else echo "$here/$1"; fi
}

phase() {               # phase NUMBER TITLE COMMAND...: print the command, then run it
    local number=$1 title=$2
    shift 2
    echo
    echo "== phase $number/5: $title"
    echo "\$ $(printf '%q ' "$@" | sed 's/ $//')"
    local t0=$SECONDS
    "$@"
    echo "-- phase $number took $((SECONDS - t0)) s"
}

data=./data/medical_images
labels=$data/labels.csv
start=$SECONDS

# --test_fraction 0.4: 318 test images, so that one run can tell a 10-point difference from chance (77 could not)
phase 1 "synthetic chest X-rays" \
    "$PYTHON" "$(script data_loader.py)" --output_dir $data --num_images "$IMAGES" --num_unlabeled "$UNLABELED" \
    --image_size "$SIZE" --test_fraction 0.4
phase 2 "SimCLR pretraining" \
    "$PYTHON" "$(script train_ssl.py)" --data_dir $data --label_file $labels --output_dir ./checkpoints \
    --recipe tuned --image_size "$SIZE" --num_epochs "$SSL_EPOCHS" --eval_every 5 --compile
phase 3 "fine-tuning from the SSL encoder on $(awk "BEGIN{print $FRACTION*100}")% of the labels" \
    "$PYTHON" "$(script fine_tune.py)" --data_dir $data --label_file $labels \
    --ssl_checkpoint ./checkpoints/best_ssl_model.pth --output_dir ./checkpoints --recipe tuned \
    --label_fraction "$FRACTION" --num_steps "$FT_STEPS"
phase 4 "the same fine-tuning from scratch (the baseline)" \
    "$PYTHON" "$(script fine_tune.py)" --data_dir $data --label_file $labels --output_dir ./checkpoints \
    --recipe tuned --image_size "$SIZE" --label_fraction "$FRACTION" --num_steps "$FT_STEPS"
phase 5 "evaluation of both on the held-out test split" \
    "$PYTHON" "$(script evaluate.py)" --checkpoint ./checkpoints/best_finetuned_model.pth \
    --checkpoint ./checkpoints/best_baseline_model.pth --data_dir $data --label_file $labels \
    --output_dir ./evaluation_results

echo
echo "== done in $((SECONDS - start)) s. Report: ./evaluation_results/report.md"
grep -E '^\*\*Verdict|^One pair|^- |^\|' ./evaluation_results/comparison.md | head -n 24 || true
