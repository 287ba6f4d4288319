"""Why self-cycling: a direct learned analysis on Lorenz-96, trained on 3D-Var's backgrounds and
then on its own, cycled each time.

    python benchmarks/self_cycling_bound.py [--rounds 3] [--memory 0] [--cycles 1000] [--seed 11]
                                            [--threads 2] [--json]

A feasibility study of the information a one-cycle analysis has, free of the diffusion machinery:
a periodic 1-D convolutional network ``f`` maps ``(x_b, y - x_b)`` (all 40 variables observed,
``R = I``: the observations are a grid field) to the increment, ``x_a = x_b + f(x_b, y - x_b)``,
trained by mean-squared error against ``x_t - x_b``: the minimum-variance analysis *for the
backgrounds it is trained on*. ``--memory K`` adds the last ``K`` analysis residuals
``y - x_a`` of the cycle as inputs (what a driver could carry between cycles).

Round 0 trains on the cycled 3D-Var backgrounds of the training seed (101, 6000 cycles; as
``lodas train``); round ``r`` adds the backgrounds of the network of round ``r - 1`` cycled on
the training seed (DAgger, Ross et al. 2011). After each round the network is cycled on
``--seed`` (the tuning seed 11 by default; never the evaluation seed 1) and its analysis RMSE
is printed next to 3D-Var's on the same truth and observations. The JSON (``--json``; also
``lodas_output/self_cycling_bound.json``) holds every figure. About 3 minutes per round on 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRAIN_SEED, TRAIN_CYCLES, SPINUP = 101, 6000, 200


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="training rounds (0: 3D-Var backgrounds only)")
    ap.add_argument("--memory", type=int, default=0, help="past analysis residuals y - x_a given to the network")
    ap.add_argument("--cycles", type=int, default=1000, help="evaluation cycles (after 200 of spin-up)")
    ap.add_argument("--seed", type=int, default=11, help="evaluation seed (11: tuning seed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from torch import nn

    from bridges.namelist import load
    from coupler.experiment import make_experiment
    from coupler.methods import make_method

    torch.set_num_threads(args.threads)
    cfg = load(REPO / "namelists" / "l96_bench.nml")
    cfg = dataclasses.replace(cfg, assim=dataclasses.replace(cfg.assim, method="3dvar"))
    K, n = args.memory, cfg.grid.nx
    mean, std = 2.3, 3.6                                    # Lorenz-96 (F = 8) climate, for the input scaling

    def experiment(seed, cycles):
        exp = make_experiment(cfg, seed=seed, n_cycles=cycles)
        y = np.zeros((cycles, n))
        for c, o in enumerate(exp.observations):
            y[c, o.x.astype(int)] = o.value
        return exp, y

    def features(x_b, y, hist):
        return np.stack([(x_b - mean) / std, y - x_b, *hist])

    class Net(nn.Module):
        def __init__(self, c_in, width=64, blocks=6):
            super().__init__()
            conv = lambda a, b: nn.Conv1d(a, b, 5, padding=2, padding_mode="circular")  # noqa: E731
            self.inp, self.out = conv(c_in, width), conv(width, 1)
            self.blocks = nn.ModuleList(nn.Sequential(nn.GELU(), conv(width, width), nn.GELU(), conv(width, width))
                                        for _ in range(blocks))

        def forward(self, x):
            h = self.inp(x)
            for b in self.blocks:
                h = h + b(h)
            return self.out(h)[:, 0]

    def cycle(exp, y, analyse):
        """Cycle ``analyse(x_b, y, hist, c) -> x_a``; (features, targets x_t - x_b, RMSE after spin-up)."""
        x, hist = exp.x_b0.reshape(-1), [np.zeros(n)] * K
        feats, targets, se = [], [], []
        for c in range(exp.n_cycles):
            x = exp.model.step(x.reshape(1, 1, n), exp.steps_per_cycle).reshape(-1)
            x_t = exp.truth[c].reshape(-1)
            feats.append(features(x, y[c], hist))
            targets.append(x_t - x)
            x_a = analyse(x, y[c], hist, c)
            if not np.all(np.isfinite(x_a)) or np.abs(x_a).max() > 100:
                return np.array(feats), np.array(targets), float("nan")
            hist = ([y[c] - x_a] + hist)[:K]
            se.append(np.mean((x_a - x_t) ** 2))
            x = x_a
        return np.array(feats), np.array(targets), float(np.sqrt(np.mean(se[SPINUP:])))

    def threedvar(exp):
        m = make_method(cfg, covariance=exp.covariance)
        return lambda x_b, y, hist, c: x_b + m.analyse(x_b.reshape(1, 1, n), exp.observations[c],
                                                      cycle=c).increment.reshape(-1)

    def learned(net):
        def analyse(x_b, y, hist, c):
            with torch.no_grad():
                f = torch.tensor(features(x_b, y, hist), dtype=torch.float32)[None]
                return x_b + net(f)[0].double().numpy()
        return analyse

    def train(feats, targets, epochs):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        F, T = torch.tensor(feats, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32)
        idx = torch.randperm(len(F), generator=g)
        n_val = len(F) // 10
        tr, va = idx[n_val:], idx[:n_val]
        net = Net(F.shape[1])
        opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
        per_epoch = len(tr) // 128
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * per_epoch)
        for _ in range(epochs):
            perm = tr[torch.randperm(len(tr), generator=g)]
            for i in range(per_epoch):
                b = perm[i * 128:(i + 1) * 128]
                shift = int(torch.randint(n, (1,), generator=g))      # translation invariance
                loss = ((net(torch.roll(F[b], shift, -1)) - torch.roll(T[b], shift, -1)) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        with torch.no_grad():
            val = float(((net(F[va]) - T[va]) ** 2).mean().sqrt())
        return net, val

    t0 = time.perf_counter()
    trn, y_trn = experiment(TRAIN_SEED, TRAIN_CYCLES + SPINUP)
    ev, y_ev = experiment(args.seed, args.cycles + SPINUP)
    feats, targets, rmse_3dvar_train = cycle(trn, y_trn, threedvar(trn))
    _, _, rmse_3dvar = cycle(ev, y_ev, threedvar(ev))
    feats, targets = feats[SPINUP:], targets[SPINUP:]
    rows = []
    print(f"Lorenz-96, all observed, R = I; memory {K}; evaluation seed {args.seed}, {args.cycles} cycles after "
          f"{SPINUP}: 3D-Var {rmse_3dvar:.4f} (training seed {rmse_3dvar_train:.4f})")
    print(f"{'round':>5} {'trained on':<28} {'one-step val RMSE':>17} {'cycled (train seed)':>19} "
          f"{'cycled (eval seed)':>18} {'x 3D-Var':>8}")
    for r in range(args.rounds + 1):
        net, val = train(feats, targets, epochs=20 if r == 0 else 10)
        f_own, t_own, rmse_train = cycle(trn, y_trn, learned(net))
        _, _, rmse_eval = cycle(ev, y_ev, learned(net))
        label = "3D-Var backgrounds" if r == 0 else f"+ own backgrounds of {r} round(s)"
        rows.append({"round": r, "pairs": int(len(feats)), "val_rmse_one_step": val,
                     "cycled_rmse_train_seed": rmse_train, "cycled_rmse": rmse_eval,
                     "ratio_to_3dvar": rmse_eval / rmse_3dvar, "elapsed_s": time.perf_counter() - t0})
        print(f"{r:>5} {label:<28} {val:>17.4f} {rmse_train:>19.4f} {rmse_eval:>18.4f} "
              f"{rmse_eval / rmse_3dvar:>8.3f}", flush=True)
        if np.isfinite(rmse_train):
            feats, targets = np.concatenate([feats, f_own[SPINUP:]]), np.concatenate([targets, t_own[SPINUP:]])
    out = {"benchmark": "self_cycling_bound", "memory": K, "seed": args.seed, "cycles": args.cycles,
           "spinup_cycles": SPINUP, "rmse_3dvar": rmse_3dvar, "rounds": rows}
    path = REPO / "lodas_output" / "self_cycling_bound.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
