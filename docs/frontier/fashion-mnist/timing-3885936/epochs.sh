#!/bin/bash
# Side-by-side training cost on Fashion-MNIST, run C of epochs.csv: each method on the full training split (the
# study's width-8 student, batch 128, seed 0), one model at a time on two threads, from the repository root at
# 3885936; the per-epoch seconds are in each run's metrics.csv (train_seconds). Two epochs, so that robust-kd's
# first epoch shows the teacher cache's one pass over the split and its second a step without the teacher; one
# epoch of the PGD-10 methods (nothing changes from epoch to epoch there).
RKD=${RKD:-rkd-fast}  # or "python -m rkd_fast" to run the checkout's code
T=docs/frontier/fashion-mnist/teacher.pt
mkdir -p runs/timing-c
for m in fgsm-rs n-fgsm robust-kd robust-kd-no-cache pgd-2 natural kd pgd-at-10 trades; do
  epochs=2
  case $m in
    robust-kd) extra=(--method robust-kd --teacher $T) ;;  # Fashion-MNIST's defaults: the teacher cache (auto)
    robust-kd-no-cache) extra=(--method robust-kd --teacher $T --teacher-cache off) ;;
    kd) extra=(--method kd --teacher $T) ;;  # the teacher cache (auto)
    pgd-2) extra=(--method pgd-at --attack-steps 2 --alpha 0.05) ;;  # the study's pgd-2: alpha = eps/2
    pgd-at-10) extra=(--method pgd-at --attack-steps 10); epochs=1 ;;  # alpha = eps/4, as the teacher's
    trades) extra=(--method trades); epochs=1 ;;
    *) extra=(--method $m) ;;
  esac
  $RKD train --dataset fashion-mnist --width 8 --epochs $epochs --batch-size 128 --seed 0 --eps 0.1 \
    --no-progress "${extra[@]}" --out runs/timing-c/$m
done
