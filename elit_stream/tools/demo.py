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
        out = write_overlay(mov.frames[last], rep.results[last], Path(args.out))
        print(f"overlay of frame {last} (atoms coloured by uncertainty): {out}")
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


LOW_CLASS_AGREEMENT = 0.75   # overlay: ring atoms whose class fewer active members share


def write_overlay(frame: np.ndarray, result: dict, out: Path) -> Path:
    """PNG: the frame in grey, atoms as dots coloured by uncertainty (matplotlib Agg); atoms whose
    class the active members doubt (cls_agree < LOW_CLASS_AGREEMENT) ringed in cyan; the title
    says whether the frame is out of distribution."""
    import matplotlib

    from elit_stream.tools.replay import ood_text
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.parent.mkdir(parents=True, exist_ok=True)
    a = result["atoms"]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    ax.imshow(frame, cmap="gray")  # pixel centres at integer (x=column, y=row), like results
    sc = ax.scatter(a["x"], a["y"], c=a["uncertainty"], cmap="plasma", s=14, linewidths=0)
    fig.colorbar(sc, ax=ax, label="uncertainty (std over active members)")
    if "cls_agree" in a:
        doubt = np.asarray(a["cls_agree"]) < LOW_CLASS_AGREEMENT
        ax.scatter(np.asarray(a["x"])[doubt], np.asarray(a["y"])[doubt], s=60, facecolors="none",
                   edgecolors="cyan", linewidths=0.8,
                   label=f"class doubted ({int(doubt.sum())}: < {LOW_CLASS_AGREEMENT:.0%} agree)")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"frame {result['frame_id']}: {result['n_atoms']} atoms, "
                 f"{len(result['active'])} active members (v{result['active_version']})"
                 f"{ood_text(result)}", color="red" if result.get("ood_flag") else "black")
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out.resolve()
