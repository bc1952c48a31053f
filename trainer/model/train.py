"""Multi-SWA ensemble training: one U-Net per member, each with its own seed.

A member's seed drives its weight initialisation and the order of its mini-batches; all members see
the same synthetic training set (the paper's classical ensemble + SWA, "multi-SWA"). Per member:
constant learning rate; after every epoch the weights are kept as a snapshot; training stops early
when the validation loss has not improved (fallen by more than ``min_delta``, relative) for
``patience`` epochs (or at ``max_epochs``); the
snapshots of the ``swa_epochs`` epochs ending at the best epoch are averaged with
``torch.optim.swa_utils.AveragedModel``; then BatchNorm statistics are **recomputed** for the
averaged weights (``update_bn``): statistics accumulated for other weights are stale.

Every epoch writes a checkpoint, so an interrupted run resumes where it stopped.

ELIT retraining (``trainer.elit.iterate``): ``data_path`` names a dataset file (``trainer.data.synth`` format,
e.g. written by ``trainer.elit.relabel``) to train on instead of synthetic data: its tiles are split in
file order into train / val / test (the last ``n_test`` tiles are the test set, the ``n_val``
before them validation; relabelled sets are written frame by frame, so this holds out the last
frames). Mask value 255 means "ignore" and is skipped by the loss and the IoU. ``init_from`` names
starting weights for every member (see ``load_init_state``): a ``final.pt`` state dict, a run
folder's member (``RUN_DIR:K``) or an artifact's member (``ARTIFACT_DIR:K``, weights read back from
the ONNX initializers); tensors whose shape differs (e.g. the head, when the number of classes
changes) keep their fresh initialisation.
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

from trainer.data.synth import SynthConfig, load_dataset, make_dataset, save_dataset
from trainer.model.executor import ExecutorSpec, run_members
from trainer.model.init_weights import (apply_init_state, load_init_state, member_spec,  # noqa: F401
                                        onnx_member_state, per_member as init_per_member)
from trainer.model.unet import UNet, UNetConfig


@dataclass(frozen=True)
class TrainConfig:
    members: int = 8
    base_seed: int = 1000            # member i uses seed base_seed + i
    max_epochs: int = 8
    swa_epochs: int = 3              # K: snapshots averaged, ending at the best epoch
    patience: int = 2                # early stopping: epochs without validation improvement
    min_delta: float = 0.0           # ... an improvement is a relative fall of more than this
    member_budget_s: float = 0.0     # wall-clock budget per member (0 = none): no epoch starts
                                     # after it is spent (the stop reason is recorded)
    lr: float = 1e-3                 # constant (Adam)
    batch_size: int = 16
    n_train: int = 1024
    n_val: int = 128
    n_test: int = 128
    data_seed: int = 7               # train / val / test sets use data_seed, +1, +2
    bn_batches: int = 32             # batches used to recompute BatchNorm statistics
    threads: int = 0                 # torch threads; 0 = torch's default
    data_path: str | None = None     # train on this dataset file instead of synthetic data
    init_from: str | None = None     # starting weights (see load_init_state); None = from scratch
    synth: SynthConfig = field(default_factory=SynthConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("synth", "unet")}
        d["synth"], d["unet"] = self.synth.to_dict(), self.unet.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["synth"] = SynthConfig.from_dict(d["synth"])
        d["unet"] = UNetConfig.from_dict(d["unet"])
        return cls(**d)


@dataclass
class MemberResult:
    id: int
    seed: int
    epochs: int
    swa_epochs: int
    best_epoch: int
    best_val_loss: float
    history: dict                    # {"train_loss": [...], "val_loss": [...]}
    test_iou: float | None = None
    stop_reason: str = ""            # "early stopping" | "max_epochs" | "budget"


@dataclass
class SplitData:
    """Tensors of one split: images float32 [N, 1, H, W], masks int64 [N, H, W]."""
    images: torch.Tensor
    masks: torch.Tensor

    @classmethod
    def from_dataset(cls, ds) -> SplitData:
        return cls(torch.from_numpy(np.ascontiguousarray(ds.images)),
                   torch.from_numpy(ds.masks.astype(np.int64)))

    def __len__(self) -> int:
        return self.images.shape[0]


# ----------------------------------------------------------------------------- data


IGNORE_INDEX = 255                   # mask value skipped by the loss and the IoU
NOT_HEAVY = 254                      # mask value: unsure whether an atom, sure not the last class


def segmentation_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
                      ) -> torch.Tensor:
    """Cross-entropy over the labelled pixels; IGNORE_INDEX pixels count not at all; NOT_HEAVY
    pixels (ELIT children: places the relabelling leaves open, e.g. a contamination blob, whose
    brightness is not a heavier atom's) count as -(1 - p_bg) log(p_light / (p_light + p_heavy))
    with (1 - p_bg) held constant: whatever atom is there is not the heavier one, and whether an
    atom is there at all is left open (the term does not depend on the background logit; a first
    version, -log(1 - p_heavy), also pushed atoms the child called heavy towards background and
    lost blurred atoms in later iterations). With one class (background + atom) NOT_HEAVY is
    ignored like IGNORE_INDEX."""
    not_heavy = y == NOT_HEAVY
    ce_target = torch.where(not_heavy, torch.full_like(y, IGNORE_INDEX), y)
    ce = F.cross_entropy(logits, ce_target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = int((ce_target != IGNORE_INDEX).sum())
    if logits.shape[1] >= 3 and bool(not_heavy.any()):
        logp = torch.log_softmax(logits, 1)
        atom = 1.0 - logp[:, 0].exp().detach()
        light = logp[:, 1:-1].logsumexp(1) - logp[:, 1:].logsumexp(1)   # log P(light | atom)
        ce = ce - (atom * light)[not_heavy].sum()
        count += int(not_heavy.sum())
    return ce if reduction == "sum" else ce / max(count, 1)


def labelled_pixels(masks, n_channels: int) -> int:
    """How many pixels `segmentation_loss` counts."""
    ignored = (masks == IGNORE_INDEX) | ((masks == NOT_HEAVY) if n_channels < 3 else False)
    return int((~ignored).sum())


def prepare_data(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Generate (or reuse, if already in ``run_dir``) the train / val / test splits; with
    ``cfg.data_path``, split that file instead (see the module docstring)."""
    if cfg.data_path:
        return split_dataset_file(Path(cfg.data_path), cfg.n_val, cfg.n_test, log)
    splits = {}
    for offset, (name, n) in enumerate([("train", cfg.n_train), ("val", cfg.n_val),
                                        ("test", cfg.n_test)]):
        path = run_dir / f"data_{name}.npz"
        if path.exists():
            ds = load_dataset(path)
        else:
            t0 = time.perf_counter()
            ds = make_dataset(n, cfg.data_seed + offset, cfg.synth)
            save_dataset(ds, path)
            log(f"generated {n} {name} images in {time.perf_counter() - t0:.1f} s -> {path}")
        splits[name] = ds
    return splits


def split_dataset_file(path: Path, n_val: int, n_test: int, log=print) -> dict:
    from trainer.data.synth import Dataset

    ds = load_dataset(path)
    n = len(ds.images)
    if n < n_val + n_test + 1:
        raise ValueError(f"{path}: {n} tiles, too few for {n_val} validation + {n_test} test tiles")
    bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test),
              "test": (n - n_test, n)}
    log(f"{path}: {n} tiles -> train {bounds['train'][1]}, val {n_val}, test {n_test} (file order)")
    return {k: Dataset(ds.images[a:b], ds.masks[a:b], ds.xy[a:b], ds.cls[a:b],
                       ds.pixel_size_pm[a:b], ds.config, ds.seed) for k, (a, b) in bounds.items()}


def dataset_config(path: Path):
    """The SynthConfig recorded in a dataset file (pixel size, tile size, classes, atom radius)."""
    return load_dataset(path).config


def batches(data: SplitData, batch_size: int, order: np.ndarray | None = None):
    n = len(data)
    order = np.arange(n) if order is None else order
    for start in range(0, n, batch_size):
        idx = torch.from_numpy(order[start:start + batch_size])
        yield data.images[idx], data.masks[idx]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The member's shuffling: depends only on (seed, epoch), so a resumed run is identical."""
    return np.random.default_rng([seed, epoch]).permutation(n)


# ----------------------------------------------------------------------------- one member


def new_member(seed: int, unet_cfg: UNetConfig) -> UNet:
    torch.manual_seed(seed)
    return UNet(unet_cfg)


def train_epoch(model: UNet, opt: torch.optim.Optimizer, data: SplitData, order: np.ndarray,
                batch_size: int, progress=None) -> float:
    model.train()
    total, count = 0.0, 0
    for x, y in batches(data, batch_size, order):
        loss = segmentation_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(x)
        count += len(x)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(count, 1)


@torch.no_grad()
def evaluate_loss(model: UNet, data: SplitData, batch_size: int) -> float:
    model.eval()
    total, channels = 0.0, 0
    for x, y in batches(data, batch_size):
        logits = model(x)
        total, channels = total + segmentation_loss(logits, y, "sum").item(), logits.shape[1]
    return total / max(labelled_pixels(data.masks, channels), 1)


@torch.no_grad()
def atom_iou(model: UNet, data: SplitData, batch_size: int = 16) -> float:
    """IoU of atom pixels (any class) vs background over a whole split; an atom pixel is one whose
    background probability is below 0.5 (sum of class probabilities above 0.5). Ignored pixels
    (mask 255, and 254: NOT_HEAVY) count neither way."""
    model.eval()
    inter = union = 0
    for x, y in batches(data, batch_size):
        valid = (y != IGNORE_INDEX) & (y != NOT_HEAVY)
        pred = (torch.softmax(model(x), 1)[:, 0] < 0.5) & valid
        truth = (y > 0) & valid
        inter += (pred & truth).sum().item()
        union += (pred | truth).sum().item()
    return inter / union if union else 1.0


def swa_average(snapshots: list[dict], unet_cfg: UNetConfig) -> UNet:
    """Average the given state dicts' parameters with ``AveragedModel`` (equal weights)."""
    model = UNet(unet_cfg)
    averaged = AveragedModel(model)
    for state in snapshots:
        model.load_state_dict(state)
        averaged.update_parameters(model)
    result = UNet(unet_cfg)
    result.load_state_dict(averaged.module.state_dict())
    return result


def recompute_bn(model: UNet, data: SplitData, batch_size: int, n_batches: int) -> UNet:
    """Reset and recompute BatchNorm running statistics for the (averaged) weights."""
    n = min(len(data), batch_size * n_batches)
    loader = [data.images[i:i + batch_size] for i in range(0, n, batch_size)]
    update_bn(loader, model)
    return model.eval()


def train_member(member_id: int, cfg: TrainConfig, train: SplitData, val: SplitData,
                 member_dir: Path, log: Callable[[str], None] = print,
                 show_progress: bool = True, init_state: dict | None = None) -> tuple[UNet, MemberResult]:
    """Train one member with early stopping, SWA and BN recomputation; resumable from ``member_dir``.
    ``init_state``: starting weights (same-shape tensors are copied; the seed still drives the
    rest of the initialisation and the batch order)."""
    seed = cfg.base_seed + member_id
    member_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = member_dir / "checkpoint.pt"
    model = new_member(seed, cfg.unet)
    if init_state is not None:
        apply_init_state(model, init_state)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"epoch": 0, "snapshots": [], "history": {"train_loss": [], "val_loss": []},
             "best_val": float("inf"), "best_epoch": 0}
    if ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log(f"member {member_id}: resuming after epoch {state['epoch']}")
    steps = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    while _stop_reason(state, cfg) is None:
        epoch = state["epoch"] + 1
        t0 = time.perf_counter()
        bar = _progress(steps, f"member {member_id} epoch {epoch}/{cfg.max_epochs}", show_progress)
        train_loss = train_epoch(model, opt, train, epoch_order(seed, epoch, len(train)),
                                 cfg.batch_size, bar)
        if bar is not None:
            bar.close()
        val_loss = evaluate_loss(model, val, cfg.batch_size)
        improved = val_loss < state["best_val"] * (1.0 - cfg.min_delta)
        if improved:
            state["best_val"], state["best_epoch"] = val_loss, epoch
        state["history"]["train_loss"].append(train_loss)
        state["history"]["val_loss"].append(val_loss)
        state["snapshots"].append(copy.deepcopy(model.state_dict()))
        state["snapshots"] = state["snapshots"][-(cfg.swa_epochs + cfg.patience):]
        state["epoch"] = epoch
        state["elapsed_s"] = state.get("elapsed_s", 0.0) + time.perf_counter() - t0
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state},
                   ckpt_path)
        log(f"member {member_id} epoch {epoch}: train {train_loss:.4f}  val {val_loss:.4f}"
            f"{'  (best)' if improved else ''}  {time.perf_counter() - t0:.0f} s")
    window = _swa_window(state, cfg.swa_epochs)
    averaged = recompute_bn(swa_average(window, cfg.unet), train, cfg.batch_size, cfg.bn_batches)
    result = MemberResult(id=member_id, seed=seed, epochs=state["epoch"], swa_epochs=len(window),
                          best_epoch=state["best_epoch"], best_val_loss=state["best_val"],
                          history=state["history"], stop_reason=_stop_reason(state, cfg))
    return averaged, result


def _stop_reason(state: dict, cfg: TrainConfig) -> str | None:
    if state["epoch"] - state["best_epoch"] >= cfg.patience:
        return "early stopping"
    if state["epoch"] >= cfg.max_epochs:
        return "max_epochs"
    if cfg.member_budget_s and state.get("elapsed_s", 0.0) >= cfg.member_budget_s:
        return "budget"
    return None


def _swa_window(state: dict, swa_epochs: int) -> list[dict]:
    """Snapshots of the ``swa_epochs`` epochs ending at the best one (fewer if training was short)."""
    first_kept = state["epoch"] - len(state["snapshots"]) + 1      # epoch number of snapshots[0]
    end = state["best_epoch"] - first_kept + 1
    return state["snapshots"][max(0, end - swa_epochs):end]


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- the ensemble


def train_ensemble(cfg: TrainConfig, run_dir: Path, log: Callable[[str], None] = print,
                   show_progress: bool = True,
                   executor: ExecutorSpec | None = None) -> list[MemberResult]:
    """Train (or resume) every member into ``run_dir``; returns per-member results with test IoU.
    ``executor``: in this process or as Ray tasks (``trainer.model.executor``); the driver
    writes every member's ``final.pt`` as it arrives, whichever executor trained it.

    Layout: ``config.json``, ``data_{train,val,test}.npz``, ``member_XX/{checkpoint.pt,
    final.pt,result.json}``, ``report/loss_curves.png``, ``report/members.md``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write_config(cfg, run_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    splits = prepare_data(cfg, run_dir, log)
    train, val, test = (SplitData.from_dataset(splits[k]) for k in ("train", "val", "test"))
    per_member = init_per_member(cfg.init_from)
    init_state = (load_init_state(cfg.init_from, cfg.unet, log)
                  if cfg.init_from and not per_member else None)
    results, todo = {}, []
    for member_id in range(cfg.members):
        member_dir = run_dir / f"member_{member_id:02d}"
        final_path, result_path = member_dir / "final.pt", member_dir / "result.json"
        if final_path.exists() and result_path.exists():
            results[member_id] = MemberResult(**json.loads(result_path.read_text()))
            log(f"member {member_id}: already trained (test IoU {results[member_id].test_iou:.4f})")
        else:
            todo.append(member_id)
    if per_member:      # DIR:* or DIR:A,B,.. - member K from its own member (loaded here, once)
        init_state = {k: load_init_state(member_spec(cfg.init_from, k), cfg.unet, log) for k in todo}
    executor = executor or ExecutorSpec()
    local = executor.kind == "local"
    job = MemberJob(cfg, train, val, test, str(run_dir), init_state, show_progress and local,
                    log if local else None, per_member)
    for member_id, (state, result) in run_members(_member_task, todo, job, executor, log,
                                                  show_progress):
        member_dir = run_dir / f"member_{member_id:02d}"
        member_dir.mkdir(parents=True, exist_ok=True)
        torch.save(state, member_dir / "final.pt")
        (member_dir / "result.json").write_text(json.dumps(asdict(result), indent=1))
        log(f"member {member_id}: done after {result.epochs} epochs ({result.stop_reason}), "
            f"SWA over {result.swa_epochs},"
            f" test IoU {result.test_iou:.4f}")
        results[member_id] = result
    results = [results[i] for i in sorted(results)]
    write_training_report(results, run_dir / "report")
    return results


@dataclass
class MemberJob:
    """What every member's task needs (sent once to a Ray cluster's object store)."""
    cfg: TrainConfig
    train: SplitData
    val: SplitData
    test: SplitData
    run_dir: str
    init_state: dict | None
    show_progress: bool
    log: Callable[[str], None] | None = None      # None (Ray workers): print
    per_member_init: bool = False                 # init_state is {member id: state} (DIR:*)


def _member_task(member_id: int, job: MemberJob) -> tuple[dict, MemberResult]:
    """Train one member and score it on the test split -> (state dict, result)."""
    if job.cfg.threads:
        torch.set_num_threads(job.cfg.threads)
    member_dir = Path(job.run_dir) / f"member_{member_id:02d}"
    init = job.init_state[member_id] if job.per_member_init else job.init_state
    model, result = train_member(member_id, job.cfg, job.train, job.val, member_dir,
                                 job.log or print, job.show_progress, init)
    result.test_iou = atom_iou(model, job.test, job.cfg.batch_size)
    return model.state_dict(), result


def load_members(run_dir: Path, cfg: TrainConfig) -> list[UNet]:
    models = []
    for member_id in range(cfg.members):
        model = UNet(cfg.unet)
        model.load_state_dict(torch.load(run_dir / f"member_{member_id:02d}" / "final.pt"))
        models.append(model.eval())
    return models


def load_results(run_dir: Path, cfg: TrainConfig) -> list[MemberResult]:
    return [MemberResult(**json.loads((run_dir / f"member_{i:02d}" / "result.json").read_text()))
            for i in range(cfg.members)]


def _check_or_write_config(cfg: TrainConfig, run_dir: Path) -> None:
    path = run_dir / "config.json"
    if path.exists():
        old = json.loads(json.dumps(TrainConfig.from_dict(json.loads(path.read_text())).to_dict()))
        if old != json.loads(json.dumps(cfg.to_dict())):
            raise ValueError(f"{run_dir} holds a run with a different configuration; "
                             "use another --run-dir or delete it to start afresh")
    else:
        path.write_text(json.dumps(cfg.to_dict(), indent=1))


def write_training_report(results: list[MemberResult], report_dir: Path) -> None:
    """Loss curves of every member (PNG) and the per-member IoU table (markdown)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in results:
        epochs = np.arange(1, len(r.history["train_loss"]) + 1)
        ax_t.plot(epochs, r.history["train_loss"], label=f"member {r.id}")
        ax_v.plot(epochs, r.history["val_loss"], label=f"member {r.id}")
        ax_v.plot([r.best_epoch], [r.best_val_loss], "k.")
    ax_t.set(title="training loss (cross-entropy)", xlabel="epoch", ylabel="loss", yscale="log")
    ax_v.set(title="validation loss (dots: best epoch, SWA window ends here)", xlabel="epoch")
    ax_v.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(report_dir / "loss_curves.png", dpi=110)
    plt.close(fig)
    ious = np.array([r.test_iou for r in results if r.test_iou is not None])
    lines = ["| member | seed | epochs | stopped by | SWA epochs | best val loss | test IoU |",
             "|---:|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {r.id} | {r.seed} | {r.epochs} | {r.stop_reason or '-'} | {r.swa_epochs} | "
              f"{r.best_val_loss:.4f} | {r.test_iou:.4f} |" for r in results]
    if len(ious):
        lines.append(f"| **mean ± std** | | | | | | **{ious.mean():.4f} ± {ious.std(ddof=0):.4f}** |")
    (report_dir / "members.md").write_text("\n".join(lines) + "\n")
