"""`elit-stream demo`: the service on the shipped ensemble, fed by a synthetic movie.

Starts `elit-stream serve` as a subprocess on free ports, replays a `movie.make_movie` movie
through real sockets, prints a line per frame, scores the atoms against the movie's ground
truth (precision / recall), writes a PNG overlay of the last frame (atoms coloured by their
uncertainty) and shuts the service down.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import bf16_hint
from elit_stream.core.manifest import ArtifactError, default_artifact_path
from elit_stream.tools.launcher import ServiceProcess, ServiceStartError


class DemoError(RuntimeError):
    """The demo cannot run (no model, service does not start); the message says why."""


def find_model(arg: str | None) -> Path:
    """--model, else models/default, else the newest other artifact in models/ (with a note)."""
    if arg:
        return Path(arg)
    default = default_artifact_path()
    if (default / "manifest.json").is_file():
        return default
    others = sorted((p.parent for p in default.parent.glob("*/manifest.json")),
                    key=lambda p: p.stat().st_mtime)
    if others:
        print(f"note: {default} not found; using {others[-1]} instead", file=sys.stderr)
        return others[-1]
    raise DemoError(f"no model artifact at {default} (and none elsewhere in {default.parent}).\n"
                    "  The shipped ensemble is trained with `elit-train` (see README); "
                    "or pass --model DIR.")


def run_demo(args) -> int:
    from elit_stream.tools import movie as movies
    from elit_stream.tools.replay import replay, result_line

    model = find_model(args.model)
    try:
        art = load_artifact(model, check_probe=False)
    except ArtifactError as exc:
        raise DemoError(f"cannot use {model}: {exc}") from None
    mov = movies.make_movie(n_frames=args.frames, size_px=args.size, seed=args.seed,
                            pixel_size_pm=art.pixel_size_pm)
    print(f"model {art.name}: {art.n_members} members, classes {', '.join(art.class_names)}; "
          f"movie: {len(mov.frames)} frames of {args.size}x{args.size} px", flush=True)
    print("per frame: atoms found, their mean uncertainty, time inside the service, and time "
          "since the frame was sent (includes waiting in the queue when frames are sent faster "
          "than they are processed)", flush=True)
    try:
        # warm up on the movie's frame size, so that frame 0 does not pay for set-up
        warm = {"ELIT_MODEL__WARMUP_SHAPE_PX": json.dumps(list(mov.frames.shape[1:]))}
        service = ServiceProcess(["--model", str(model), "--device", args.device,
                                  "--precision", args.precision,
                                  "--delivery", args.delivery], timeout_s=120, env=warm)
    except ServiceStartError as exc:
        raise DemoError(f"the service did not start: {exc}") from None
    with service:
        print(f"service ready: {service.endpoints}; {service.ready.get('provider')}, "
              f"{service.ready.get('precision')}", flush=True)
        if (hint := bf16_hint(service.ready.get("provider"), service.ready.get("precision"))):
            print(f"  ({hint})", flush=True)

        def show(msg, rep):
            if msg["topic"] == "result":
                print(result_line(msg, rep), flush=True)
            elif msg["topic"] != "event.ping":
                print(f"  event {msg['event']}: " + _brief(msg), flush=True)
        rep = replay(mov.frames, service.endpoints, acquisition="demo", rate_fps=args.rate,
                     pixel_size_pm=mov.pixel_size_pm, on_message=show, wait_s=120)
        stop = _shutdown(service)
    _score(rep, mov, movies)
    if rep.results:
        last = max(rep.results)
        radius_px = 0.5 * movies.CC_BOND_PM / mov.pixel_size_pm
        out = write_overlay(mov.frames[last], rep.results[last], Path(args.out),
                            mov.pixel_size_pm, tuple(art.class_names), mov.xy[last], radius_px)
        print(f"overlay of frame {last} (atoms by class, coloured by uncertainty; false "
              f"detections and missed atoms marked): {out}")
    if stop:
        print(f"service stopped ({stop['exit_status']}): {stop['counts']}")
    return 0 if rep.complete else 1


def _brief(msg: dict) -> str:
    skip = {"protocol", "kind", "event", "run_uid", "seq", "time", "topic"}
    return ", ".join(f"{k}={v}" for k, v in msg.items() if k not in skip)[:160]


def _shutdown(service: ServiceProcess) -> dict | None:
    from elit_stream.protocol.client import ControlClient, ResultSubscriber
    with ResultSubscriber(service.endpoints["results"], topics=("event.stop",)) as sub, \
            ControlClient(service.endpoints["control"]) as ctl:
        sub.wait_ready(ctl)
        ctl.call("shutdown")
        while (msg := sub.recv(10.0)) is not None:
            if msg.get("event") == "stop":
                service.wait(30)
                return msg
    return None


def _score(rep, mov, movies) -> None:
    """Precision / recall over all answered frames. Match radius: half the C-C bond, so a
    prediction can only be matched to the atom it is closest to."""
    radius_px = 0.5 * movies.CC_BOND_PM / mov.pixel_size_pm
    tp = fp = fn = 0
    for fid, msg in rep.results.items():
        pred = np.column_stack([msg["atoms"]["x"], msg["atoms"]["y"]])
        t, f, n = movies.match_atoms(pred, np.asarray(mov.xy[fid]), radius_px)
        tp, fp, fn = tp + t, fp + f, fn + n
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    print(f"detection over {len(rep.results)} frames (match radius {radius_px:.1f} px): "
          f"precision {precision:.3f}, recall {recall:.3f} (tp {tp}, fp {fp}, fn {fn})")


CLASS_MARKERS = ("o", "^", "s", "D")      # class 0 (lattice) circle, 1 (impurity) triangle, ...
LOW_CLASS_AGREEMENT = 0.75   # overlay: ring atoms whose class fewer active members share


def write_overlay(frame: np.ndarray, result: dict, out: Path, pixel_size_pm: float | None = None,
                  class_names: tuple[str, ...] = ("lattice", "impurity"),
                  truth_xy: np.ndarray | None = None, match_radius_px: float = 5.0) -> Path:
    """PNG a scientist reads without the docs: the frame in grey with a scale bar in nm, atoms
    by class (marker shape) coloured by uncertainty (colour bar), white-edged so they show on
    dark vacuum too; atoms whose class the active members doubt (cls_agree <
    LOW_CLASS_AGREEMENT) ringed in lime; with `truth_xy`, detections with no true atom near
    (false) are boxed in red and missed true atoms ringed in cyan; the title says whether the
    frame is out of distribution. A legend says all of it."""
    import matplotlib

    from elit_stream.tools.replay import ood_text
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.parent.mkdir(parents=True, exist_ok=True)
    a = result["atoms"]
    xy = np.column_stack([a["x"], a["y"]]).astype(float).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(9, 7.5), dpi=110)
    ax.imshow(frame, cmap="gray")  # pixel centres at integer (x=column, y=row), like results
    vmax = max(float(np.max(a["uncertainty"], initial=0.0)), 0.05)
    sc = None
    for k, name in enumerate(class_names):
        sel = np.asarray(a["cls"]) == k
        sc = ax.scatter(xy[sel, 0], xy[sel, 1], c=np.asarray(a["uncertainty"])[sel],
                        cmap="plasma", vmin=0, vmax=vmax, s=30 if k else 16,
                        marker=CLASS_MARKERS[k % len(CLASS_MARKERS)], edgecolors="white",
                        linewidths=0.5, label=f"{name} ({int(sel.sum())})")
    if sc is not None:
        fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02,
                     label="uncertainty: the ensemble's doubt that an atom is there")
    if "cls_agree" in a:
        doubt = np.asarray(a["cls_agree"]) < LOW_CLASS_AGREEMENT
        ax.scatter(xy[doubt, 0], xy[doubt, 1], s=70, facecolors="none", edgecolors="lime",
                   linewidths=0.9,
                   label=f"class doubted ({int(doubt.sum())}: < {LOW_CLASS_AGREEMENT:.0%} agree)")
    if truth_xy is not None:
        _mark_errors(ax, xy, np.asarray(truth_xy, float).reshape(-1, 2), match_radius_px)
    if pixel_size_pm:
        _scale_bar(ax, frame.shape, pixel_size_pm)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.01), ncol=4, fontsize=8, frameon=False,
              title="marker shape = class (count); colour = uncertainty", title_fontsize=8)
    ax.set_title(f"frame {result['frame_id']}: {result['n_atoms']} atoms found, "
                 f"{len(result['active'])} active members (v{result['active_version']})"
                 f"{ood_text(result)}", color="red" if result.get("ood_flag") else "black")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out.resolve()


def _mark_errors(ax, found_xy: np.ndarray, truth_xy: np.ndarray, radius_px: float) -> None:
    from elit_stream.tools.movie import match_pairs
    found_i, true_i, _ = match_pairs(found_xy, truth_xy, radius_px)
    false = np.setdiff1d(np.arange(len(found_xy)), found_i)
    missed = np.setdiff1d(np.arange(len(truth_xy)), true_i)
    ax.scatter(found_xy[false, 0], found_xy[false, 1], marker="s", facecolors="none",
               edgecolors="red", s=90, linewidths=1.3, label=f"false detection ({len(false)})")
    ax.scatter(truth_xy[missed, 0], truth_xy[missed, 1], marker="o", facecolors="none",
               edgecolors="cyan", s=60, linewidths=1.2, label=f"missed true atom ({len(missed)})")


def _scale_bar(ax, shape: tuple[int, int], pixel_size_pm: float) -> None:
    """A white bar of a round length in nm, about a fifth of the frame wide, bottom right."""
    width_nm = shape[1] * pixel_size_pm / 1000
    bar_nm = max((v for v in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if v <= width_nm / 4),
                 default=width_nm / 4)
    bar_px = bar_nm * 1000 / pixel_size_pm
    x0, y0 = shape[1] * 0.95 - bar_px, shape[0] * 0.94
    ax.plot([x0, x0 + bar_px], [y0, y0], color="white", linewidth=4, solid_capstyle="butt")
    ax.text(x0 + bar_px / 2, y0 - shape[0] * 0.02, f"{bar_nm:g} nm", color="white",
            ha="center", va="bottom", fontsize=10, fontweight="bold")
