"""The README works as written: every shell and Python block runs, and prints what it shows.

Read as a newcomer would: the blocks run in order, in a temporary folder that looks like the
repository root (`.venv`, `models/` and `samples/` linked in), with `.venv` activated (as the
README asks). A block whose only command is `elit-stream serve …` is the "first terminal": it is
started in the background (a second one replaces the first, as Ctrl-C would) on free ports
(ELIT_ENDPOINTS__* = port 0); the endpoints it reports go into the environment of every later block
— which is how `ctl` and `replay` find a service on other ports — and Python blocks get them in
place of the documented defaults tcp://127.0.0.1:5555-5557. Each Python block runs twice (a client
example must survive a second run). A ```text block is the expected stdout of the runnable block
before it: `...` on a line of its own stands for any lines, inside a line for any text. A ```toml
block must be a valid configuration for `serve` and for the client commands.

Not run: `bash scripts/test.sh` (this suite itself) and blocks preceded by an HTML comment
"tests/test_readme.py does not run this block: REASON".
"""
from __future__ import annotations

import json
import urllib.request
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP_NOTE = "tests/test_readme.py does not run this block"
NOT_RUN_LINES = {"bash scripts/test.sh"}      # the test suite itself: would recurse
DEFAULT_PORTS = {"ingest": 5555, "results": 5556, "control": 5557}
BLOCK = re.compile(r"(?:<!--(?P<note>[^>]*)-->\s*\n)?```(?P<lang>\w*)\n(?P<body>.*?)\n```",
                   re.DOTALL)


def readme_blocks(text: str) -> list[dict]:
    return [{"lang": m["lang"], "body": m["body"], "skip": bool(m["note"] and
             SKIP_NOTE in m["note"])} for m in BLOCK.finditer(text)]


def output_pattern(expected: str) -> re.Pattern:
    """`...` alone on a line: any lines; `...` inside a line: any text."""
    parts = []
    for line in expected.splitlines():
        if line.strip() == "...":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(".*?".join(map(re.escape, line.split("..."))) + r"\n")
    return re.compile("".join(parts), re.DOTALL)


def assert_output(expected: str, actual: str, what: str) -> None:
    if not output_pattern(expected).fullmatch(actual if actual.endswith("\n") else actual + "\n"):
        pytest.fail(f"{what}: output differs from the README's.\n--- README:\n{expected}\n"
                    f"--- actual:\n{actual}")


def test_pattern_matching_can_fail():
    assert output_pattern("a ... c\n...\nz").fullmatch("a b c\nx\ny\nz\n")
    assert not output_pattern("a ... c\nz").fullmatch("a b c\nx\nz\n")
    assert not output_pattern("sent 10: 10 results").fullmatch("sent 10: 9 results\n")


def test_every_block_is_run_or_skipped_for_a_stated_reason():
    blocks = readme_blocks(README.read_text())
    langs = {b["lang"] for b in blocks}
    assert langs <= {"bash", "python", "text", "toml"}, langs
    assert sum(b["lang"] in ("bash", "python") for b in blocks) >= 8
    assert sum(b["skip"] for b in blocks) == 1      # training only (takes hours)


class Reader:
    """The newcomer's terminals: runs blocks in `cwd` with the README's environment."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.env = {**os.environ, "PATH": f"{cwd / '.venv' / 'bin'}:{os.environ['PATH']}",
                    "ELIT_METRICS__PORT": "0", "ELIT_VENV": sys.prefix,
                    **{f"ELIT_ENDPOINTS__{n.upper()}": "tcp://127.0.0.1:0" for n in DEFAULT_PORTS}}
        self.env.pop("ELIT_CONFIG", None)
        self.service: subprocess.Popen | None = None
        self.endpoints: dict = {}

    def serve(self, line: str) -> str:
        self.stop()
        env = {**self.env, **{f"ELIT_ENDPOINTS__{n.upper()}": "tcp://127.0.0.1:0"
                              for n in DEFAULT_PORTS}}
        self.service, first = self._start(line, env)
        self.endpoints = json.loads(first)["endpoints"]
        for name in DEFAULT_PORTS:
            self.env[f"ELIT_ENDPOINTS__{name.upper()}"] = self.endpoints[name]
        return first

    def _start(self, command: str, env: dict) -> tuple[subprocess.Popen, str]:
        """A command that runs until stopped (a terminal of its own) -> (process, its ready
        line); fails the test if the first line is not the JSON ready line."""
        proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        first = proc.stdout.readline()      # the ready line (or EOF if it failed)
        if not first.startswith("{"):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        assert first.startswith("{"), f"`{command}` did not start: {first!r}"
        return proc, first

    def bash(self, body: str, cwd: Path | None = None) -> str:
        out = subprocess.run(["bash", "-e", "-c", body], cwd=cwd or self.cwd, env=self.env,
                             capture_output=True, text=True, timeout=600, check=False)
        assert out.returncode == 0, f"block failed ({out.returncode}):\n{body}\n{out.stderr}"
        return out.stdout

    def view(self, line: str) -> str:
        """`elit-stream view` (a second terminal): started on a free HTTP port, its page fetched
        once, then stopped; -> its ready line."""
        command = line.split("#")[0].strip() + " --port 0"
        proc, first = self._start(command, self.env)
        try:
            with urllib.request.urlopen(json.loads(first)["url"], timeout=30) as page:
                assert page.status == 200 and b"<html" in page.read(4096).lower()
            return first
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)

    def python(self, body: str) -> str:
        for name, port in DEFAULT_PORTS.items():
            if self.endpoints:
                body = body.replace(f"tcp://127.0.0.1:{port}", self.endpoints[name])
        outs = [self.bash(f"python - <<'README_PY'\n{body}\nREADME_PY") for _ in range(2)]
        return outs[0]

    def stop(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(signal.SIGINT)      # Ctrl-C
            try:
                self.service.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.service.pid, signal.SIGKILL)
                self.service.wait(10)
        self.service = None


def run_shell_block(reader: Reader, body: str) -> str:
    lines = [ln for ln in body.splitlines() if ln.strip()]
    if len(lines) == 1 and re.match(r"(\.venv/bin/)?elit-stream serve\b", lines[0]):
        return reader.serve(lines[0])
    if len(lines) == 1 and re.match(r"(\.venv/bin/)?elit-stream view\b", lines[0]):
        return reader.view(lines[0])
    if any(ln.startswith("bash scripts/") for ln in lines):      # set-up: in the repository
        run = [ln for ln in lines if ln.split("#")[0].strip() not in NOT_RUN_LINES]
        assert len(run) == len(lines) - 1, lines       # exactly the test suite is left out
        return reader.bash("\n".join(run), cwd=ROOT)
    out = reader.bash(body)
    if "elit-stream ctl shutdown" in body and reader.service is not None:
        assert reader.service.wait(60) == 0
    return out


def check_toml(reader: Reader, body: str, tmp_path: Path) -> None:
    from elit_stream.service.config import load_config
    from elit_stream.tools.settings import client_settings
    path = tmp_path / "readme.toml"
    path.write_text(body)
    cfg = load_config(path)
    env = {k: v for k, v in os.environ.items() if k.startswith("ELIT_")}
    try:
        for k in env:
            os.environ.pop(k)
        client = client_settings(str(path))
    finally:
        os.environ.update(env)
    assert client.endpoints["control"] == cfg.endpoints.control


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_readme_runs_as_written(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    (work / ".venv").symlink_to(sys.prefix)
    for name in ("models", "samples"):
        (work / name).symlink_to(ROOT / name)
    reader = Reader(work)
    last_output, last_what, ran = None, "", 0
    try:
        for block in readme_blocks(README.read_text()):
            body, lang = block["body"], block["lang"]
            if block["skip"]:
                continue
            if lang == "text":
                assert last_output is not None, f"output block with no command before it:\n{body}"
                assert_output(body, last_output, last_what)
                last_output = None
            elif lang == "toml":
                check_toml(reader, body, tmp_path)
            elif lang in ("bash", "python"):
                started = time.monotonic()
                last_output = (run_shell_block(reader, body) if lang == "bash"
                               else reader.python(body))
                last_what = f"{lang} block {body.splitlines()[0]!r}"
                ran += 1
                print(f"ran {last_what} in {time.monotonic() - started:.1f} s")
    finally:
        reader.stop()
    assert ran >= 8
    assert (work / "results.jsonl").is_file() and (work / "predict-grid.png").is_file()
