"""The output writer: --overwrite replaces only miprun's own output, the swap survives races, signals and
SIGKILL (the old output or the new one, never neither), files follow the umask, JSON is strict."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from paths import SRC
from processes import popen

from miprun import transaction
from miprun.atomic import (
    DiskFullError,
    Interrupted,
    NonFiniteJSONError,
    OutputBusyError,
    OutputExistsError,
    OutputNotWritableError,
    UnsafeOutputError,
    check_output,
    interrupts_as_keyboard_interrupt,
    is_miprun_output,
    recover,
    write_json,
    write_steps,
)
from miprun.errors import OutputError

MANIFEST = {"schema_version": 1, "removed": [2], "num_blocks_before": 4, "outputs": ["model.safetensors"]}


def output_steps(tag: str) -> list:
    """Writers for a small fake checkpoint whose every file says which run (``tag``) wrote it."""
    return [
        ("weights", lambda d: (d / "model.safetensors").write_text(f"weights of {tag}\n" * 100)),
        ("manifest", lambda d: (d / "miprun.json").write_text(json.dumps({**MANIFEST, "tag": tag}))),
    ]


def make_output(folder: Path, tag: str) -> Path:
    """A previous miprun output written by run ``tag``."""
    folder.mkdir(parents=True)
    for _, write in output_steps(tag):
        write(folder)
    return folder


def which_output(folder: Path) -> str:
    """The tag of the complete output in ``folder``; fails on a partial or mixed one."""
    tag = json.loads((folder / "miprun.json").read_text())["tag"]
    assert (folder / "model.safetensors").read_text() == f"weights of {tag}\n" * 100
    assert sorted(p.name for p in folder.iterdir()) == ["miprun.json", "model.safetensors"]
    return tag


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Everything miprun left beside ``out`` apart from its lock file."""
    return sorted(
        p.name
        for p in out.parent.iterdir()
        if p.name.startswith(f".{out.name}.") and p.name != f".{out.name}.lock"
    )


# ----------------------------------------------------------------------------- what --overwrite may replace


def test_folder_with_user_files_is_refused_and_left_identical(tmp_path: Path) -> None:
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "calibration.txt").write_text("text " * 100)
    before = snapshot(tmp_path)
    with pytest.raises(
        OutputExistsError, match=r"holds files miprun did not write \(calibration.txt, notes.txt\)"
    ):
        write_steps(out, output_steps("new"), overwrite=True, progress=False)
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # refused before any temp folder or lock


def test_current_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_output(tmp_path / "prev", "old")
    # `--out .`, even inside a previous output: replacing it would leave the shell in a deleted folder
    monkeypatch.chdir(tmp_path / "prev")
    with pytest.raises(UnsafeOutputError, match="is or contains the current directory"):
        write_steps(".", output_steps("new"), overwrite=True, progress=False)
    with pytest.raises(UnsafeOutputError, match="is or contains the current directory"):
        check_output(tmp_path, overwrite=True)
    assert which_output(tmp_path / "prev") == "old"


@pytest.mark.parametrize("previous", ["empty", "miprun output"])
def test_empty_folder_and_previous_output_are_replaced(tmp_path: Path, previous: str) -> None:
    out = tmp_path / "out"
    if previous == "miprun output":
        make_output(out, "old")
    else:
        out.mkdir()
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        write_steps(out, output_steps("new"), overwrite=False, progress=False)
    write_steps(out, output_steps("new"), overwrite=True, progress=False)
    assert which_output(out) == "new"
    assert leftovers(out) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (json.dumps(MANIFEST), True),
        (json.dumps({**MANIFEST, "schema_version": "1"}), False),
        (json.dumps({**MANIFEST, "schema_version": True}), False),
        (json.dumps({"schema_version": 1, "removed": []}), False),
        (json.dumps([MANIFEST]), False),
        ("{not json", False),
        (None, False),
    ],
)
def test_is_miprun_output(tmp_path: Path, text: str | None, expected: bool) -> None:
    if text is not None:
        (tmp_path / "miprun.json").write_text(text)
    assert is_miprun_output(tmp_path) is expected


def test_foreign_miprun_json_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("{}")
    (out / "miprun.json").write_text('{"name": "some other tool"}')
    with pytest.raises(OutputExistsError, match=r"and no miprun.json from a previous run"):
        check_output(out, overwrite=True)
    assert is_miprun_output(out, manifest="plan.json") is False


def test_output_overlapping_an_input_is_refused(tmp_path: Path) -> None:
    model = make_output(tmp_path / "model", "dense")
    calibration = tmp_path / "data" / "calibration.txt"
    calibration.parent.mkdir()
    calibration.write_text("text")
    inputs = [model, calibration, "smollm2-135m"]  # a hub id is not a local path and is ignored
    with pytest.raises(UnsafeOutputError, match=r"contains the input .*calibration.txt"):
        check_output(tmp_path / "data", overwrite=True, inputs=inputs)
    with pytest.raises(UnsafeOutputError, match=r"is the input .*model"):
        write_steps(model, output_steps("new"), overwrite=True, progress=False, inputs=inputs)
    with pytest.raises(UnsafeOutputError, match=r"lies inside the input .*model"):
        check_output(model / "pruned", overwrite=True, inputs=inputs)
    assert which_output(model) == "dense"
    check_output(tmp_path / "pruned", overwrite=False, inputs=inputs)


def test_file_out_and_unwritable_parent_are_refused_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "scores.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="is an existing file"):
        check_output(tmp_path / "scores.json", overwrite=True)
    with pytest.raises(OutputNotWritableError, match=r"scores\.json is a file, not a folder"):
        check_output(tmp_path / "scores.json" / "out", overwrite=True)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: emulate the permission check a user would get
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    with pytest.raises(OutputNotWritableError, match=r"cannot write in .*locked \(no write permission\)"):
        check_output(locked / "a" / "out", overwrite=False)
    assert list(locked.iterdir()) == []


# ----------------------------------------------------------------------------- races and concurrent runs


def test_no_lock_file_stays_beside_the_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_steps(out, output_steps("old"), overwrite=False, progress=False)
    write_steps(out, output_steps("new"), overwrite=True, progress=False)
    assert recover(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.lock (issue #19)


@pytest.mark.parametrize("overwrite", [False, True])
def test_folder_appearing_during_the_run_is_not_replaced(tmp_path: Path, overwrite: bool) -> None:
    out = tmp_path / "out"

    def someone_else_writes(_: Path) -> None:
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    steps = [*output_steps("new"), ("report", someone_else_writes)]
    with pytest.raises(OutputExistsError, match=r"the new output was kept in .*out\.new-") as caught:
        write_steps(out, steps, overwrite=overwrite, progress=False)
    assert snapshot(out) == {"notes.txt": b"mine"}
    kept = next(tmp_path.glob("out.new-*"))
    assert str(kept) in str(caught.value)
    assert which_output(kept) == "new"
    assert leftovers(out) == []


CONCURRENT_WRITER = """
import sys, time
from pathlib import Path
from miprun.atomic import write_steps
out, started, release = map(Path, sys.argv[1:])
def wait(_):
    started.touch()
    while not release.exists():
        time.sleep(0.02)
write_steps(out, [("weights", wait)], overwrite=False, progress=False)
"""


def python(*args: str, **kwargs) -> subprocess.Popen:
    """A Python child (default signal dispositions, however pytest was started) importing this ``src``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    return popen([sys.executable, "-c", *args], env=env, stderr=subprocess.PIPE, text=True, **kwargs)


def test_second_writer_fails_at_once_naming_the_first(tmp_path: Path) -> None:
    out, started, release = tmp_path / "out", tmp_path / "started", tmp_path / "release"
    first = python(CONCURRENT_WRITER, str(out), str(started), str(release))
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert first.poll() is None and time.monotonic() < deadline, (
                first.stderr.read() if first.stderr else ""
            )
            time.sleep(0.02)
        with pytest.raises(
            OutputBusyError, match=rf"another process \(pid {first.pid}\) is writing --out .*out now"
        ):
            write_steps(out, output_steps("second"), overwrite=True, progress=False)
        with pytest.raises(OutputBusyError):
            recover(out)  # never touches the files of a live run
    finally:
        release.touch()
        assert first.wait(timeout=20) == 0, first.stderr.read() if first.stderr else ""
    assert out.is_dir() and leftovers(out) == []


def test_second_thread_fails_at_once(tmp_path: Path) -> None:
    out, entered, release = tmp_path / "out", threading.Event(), threading.Event()

    def blocking(_: Path) -> None:
        entered.set()
        release.wait(10)

    worker = threading.Thread(
        target=write_steps,
        args=(out, [*output_steps("first"), ("wait", blocking)]),
        kwargs={"overwrite": False, "progress": False},
    )
    worker.start()
    try:
        assert entered.wait(10)
        with pytest.raises(OutputBusyError, match=rf"pid {os.getpid()}"):
            write_steps(out, output_steps("second"), overwrite=True, progress=False)
    finally:
        release.set()
        worker.join(10)
    assert which_output(out) == "first"


# ----------------------------------------------------------------------------- interrupts and crashes

SIGNALLED_WRITER = """
import json, os, signal, sys
from pathlib import Path
from miprun import atomic, transaction
out, signum, at = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def maybe_kill(step):
    if step == at:
        os.kill(os.getpid(), signum)
transaction.step_hook = maybe_kill
def weights(d):
    (d / "model.safetensors").write_text("weights of new\\n" * 100)
    maybe_kill("writer")
def manifest(d):
    (d / "miprun.json").write_text(json.dumps({"schema_version": 1, "removed": [2], "num_blocks_before": 4, "outputs": ["model.safetensors"], "tag": "new"}))
with atomic.interrupts_as_keyboard_interrupt():
    atomic.write_steps(out, [("weights", weights), ("manifest", manifest)], overwrite=True, progress=False)
"""
SWAP_STEPS = ["journal-written", "old-moved-aside", "new-moving-in", "swapped"]


def run_signalled(out: Path, signum: int, at: str) -> subprocess.CompletedProcess:
    child = python(SIGNALLED_WRITER, str(out), str(int(signum)), at, cwd=out.parent)
    _, stderr = child.communicate(timeout=30)
    return subprocess.CompletedProcess(child.args, child.returncode, "", stderr)


@pytest.mark.parametrize("at", ["writer", *SWAP_STEPS])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_signal_at_any_step_leaves_old_or_new_output(tmp_path: Path, signum: signal.Signals, at: str) -> None:
    out = make_output(tmp_path / "out", "old")
    done = run_signalled(out, signum, at)
    assert done.returncode != 0, done.stderr
    # during a writer: nothing was swapped; once journaled, the renames finish before the signal acts
    assert which_output(out) == ("old" if at == "writer" else "new"), done.stderr
    assert leftovers(out) == [], done.stderr
    assert "KeyboardInterrupt" in done.stderr or "Interrupted: stopped by SIG" in done.stderr


@pytest.mark.parametrize("at", ["writer", *SWAP_STEPS])
def test_sigkill_at_any_step_is_recovered(tmp_path: Path, at: str, caplog: pytest.LogCaptureFixture) -> None:
    out = make_output(tmp_path / "out", "old")
    done = run_signalled(out, signal.SIGKILL, at)
    assert done.returncode == -signal.SIGKILL
    assert leftovers(out) != []  # no handler ran: the temp folder (and maybe the journal) is still there
    actions = recover(out)
    assert actions and all(a in caplog.text for a in actions)  # recovery says what it did
    assert which_output(out) == ("old" if at == "writer" else "new")
    assert leftovers(out) == []
    assert recover(out) == []


def test_early_check_judges_the_recovered_output(tmp_path: Path) -> None:
    """Killed between the renames, `out` is missing; the early check must not let a long run start on that."""
    out = make_output(tmp_path / "out", "old")
    assert run_signalled(out, signal.SIGKILL, "old-moved-aside").returncode == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        check_output(out, overwrite=False)
    assert which_output(out) == "new"
    assert leftovers(out) == []


@pytest.mark.parametrize("at", SWAP_STEPS)
def test_interrupt_raised_inside_the_swap_is_finished_in_process(
    tmp_path: Path, at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As when a Python handler runs late (a signal that landed on another thread): the journal completes it."""
    out = make_output(tmp_path / "out", "old")

    def interrupt(step: str) -> None:
        if step == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(transaction, "step_hook", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_steps(out, output_steps("new"), overwrite=True, progress=False)
    assert which_output(out) == "new"
    assert leftovers(out) == []


def test_interrupt_handlers_are_scoped_and_respect_nohup() -> None:
    term_before = signal.getsignal(signal.SIGTERM)
    hup_before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under `nohup`
    try:
        with interrupts_as_keyboard_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # an ignored signal stays ignored
            with pytest.raises(Interrupted, match="stopped by SIGTERM") as caught:
                signal.raise_signal(signal.SIGTERM)
            assert isinstance(caught.value, KeyboardInterrupt) and caught.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == term_before
    finally:
        signal.signal(signal.SIGHUP, hup_before)


def test_the_caller_learns_which_signal_stopped_it_even_from_a_nested_block() -> None:
    """The CLI's exit code (128 + signum) comes from the record its block yields, not from module state."""
    term_before = signal.getsignal(signal.SIGTERM)
    with interrupts_as_keyboard_interrupt() as outer:
        assert outer.signum is None
        with interrupts_as_keyboard_interrupt() as inner:  # as heal's training loop inside the CLI's block
            assert inner is outer
            with pytest.raises(Interrupted):
                signal.raise_signal(signal.SIGTERM)
        assert outer.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is outer  # the nested block left the handler alone
    assert signal.getsignal(signal.SIGTERM) == term_before
    with interrupts_as_keyboard_interrupt() as fresh:  # each outermost block starts a new record
        assert fresh.signum is None


def test_siblings_that_merely_look_like_temporaries_survive(tmp_path: Path) -> None:
    """Recovery deletes only what its journal names by the run's random token, never a look-alike."""
    out = make_output(tmp_path / "out", "old")
    mine = tmp_path / ".out.old-20240101"
    mine.mkdir()
    (mine / "backup.txt").write_text("my backup")
    (tmp_path / ".out.tmp-notes123").write_text("my notes")
    before = {
        **snapshot(tmp_path / ".out.old-20240101"),
        "notes": (tmp_path / ".out.tmp-notes123").read_bytes(),
    }
    write_steps(out, output_steps("new"), overwrite=True, progress=False)
    assert which_output(out) == "new"
    assert recover(out) == []
    assert {**snapshot(mine), "notes": (tmp_path / ".out.tmp-notes123").read_bytes()} == before


def test_a_hand_written_journal_cannot_make_recovery_delete_a_users_folder(tmp_path: Path) -> None:
    out = make_output(tmp_path / "out", "old")
    mine = tmp_path / ".out.old-20240101"
    mine.mkdir()
    (mine / "backup.txt").write_text("my backup")
    journal = tmp_path / ".out.swap"
    journal.write_text(json.dumps({"new": ".out.tmp-abcdefgh", "old": mine.name, "pid": 1}))
    with pytest.raises(OutputError, match=r"cannot read as its own swap journal"):
        write_steps(out, output_steps("new"), overwrite=True, progress=False)
    assert snapshot(mine) == {"backup.txt": b"my backup"}
    assert which_output(out) == "old" and journal.exists()


# ----------------------------------------------------------------------------- what --overwrite replaces


def test_overwrite_refuses_an_output_holding_a_file_the_user_added(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_steps(out, output_steps("old"), overwrite=False, progress=False)
    assert json.loads((out / "miprun.json").read_text())["outputs"] == ["model.safetensors"]
    (out / "my_eval.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"but my_eval.txt in it is not listed in its miprun.json"):
        write_steps(out, output_steps("new"), overwrite=True, progress=False)
    assert (out / "my_eval.txt").read_text() == "mine"
    assert json.loads((out / "miprun.json").read_text())["tag"] == "old"


def test_overwrite_refuses_a_users_folder_with_a_manifest_like_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "miprun.json").write_text(json.dumps({"schema_version": 1, "removed": [], "num_blocks_before": 2}))
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"thesis.tex in it is not listed"):
        write_steps(out, output_steps("new"), overwrite=True, progress=False)
    assert (out / "thesis.tex").read_text() == "mine"


def test_a_read_only_earlier_output_is_replaced_without_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import stat

    real = shutil.rmtree

    def as_a_user(path, *args, **kwargs):  # root deletes anything: fail like a user's unlink would
        for root, _dirs, _files in os.walk(path):
            if not os.stat(root).st_mode & stat.S_IWUSR:
                raise PermissionError(errno.EACCES, "Permission denied", root)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", as_a_user)
    out = tmp_path / "out"
    write_steps(out, output_steps("old"), overwrite=False, progress=False)
    for path in [*out.iterdir(), out]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    write_steps(out, output_steps("new"), overwrite=True, progress=False)
    assert which_output(out) == "new"
    assert leftovers(out) == []
    write_steps(out, output_steps("newer"), overwrite=True, progress=False)  # later runs are not wedged
    assert which_output(out) == "newer"


# ----------------------------------------------------------------------------- disk full, JSON, permissions


def test_disk_full_names_the_step_and_keeps_the_previous_output(tmp_path: Path) -> None:
    out = make_output(tmp_path / "out", "old")

    def full(_: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as caught:
        write_steps(out, [*output_steps("new"), ("tokenizer", full)], overwrite=True, progress=False)
    assert str(caught.value) == (
        f"no space left on the device while writing the tokenizer of {out}: nothing was written there "
        f"(a previous out is untouched); free some space or pass --out on another disk"
    )
    assert caught.value.errno == errno.ENOSPC
    assert which_output(out) == "old"
    assert leftovers(out) == []


def test_disk_full_inside_safetensors_gets_the_same_message(tmp_path: Path) -> None:
    """safetensors reports ENOSPC as its own error, which reached the user raw (issue #19)."""
    from safetensors import SafetensorError

    out = make_output(tmp_path / "out", "old")

    def full(_: Path) -> None:
        message = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        raise SafetensorError(message)

    with pytest.raises(DiskFullError, match=r"no space left on the device while writing the weights of"):
        write_steps(out, [("weights", full), *output_steps("new")], overwrite=True, progress=False)
    assert which_output(out) == "old"
    assert leftovers(out) == []


@pytest.mark.parametrize(
    ("bad", "where"), [(float("nan"), "b.c[1]"), (float("inf"), "b.c[1]"), (float("-inf"), "b.c[1]")]
)
def test_write_json_refuses_non_finite_naming_the_key(tmp_path: Path, bad: float, where: str) -> None:
    path = tmp_path / "scores.json"
    path.write_text('{"previous": true}')
    with pytest.raises(NonFiniteJSONError, match=rf"the value at {re.escape(where)} is {bad}"):
        write_json(path, {"a": 1, "b": {"c": [0.5, bad]}})
    assert json.loads(path.read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]
    with pytest.raises(NonFiniteJSONError, match="at the top level"):
        write_json(path, bad)


def test_write_json_is_strict_and_leaves_no_temp_file_on_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "plan.json"
    write_json(path, {"x": [1.0, 2], "y": None})
    assert json.loads(path.read_text()) == {"x": [1.0, 2], "y": None}

    def interrupted(_: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"x": "new"})
    assert json.loads(path.read_text()) == {"x": [1.0, 2], "y": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


@pytest.mark.parametrize(
    ("umask", "folder_mode", "file_mode"),
    [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)],
    ids=["umask-022", "umask-077"],
)
def test_permissions_follow_the_umask(tmp_path: Path, umask: int, folder_mode: int, file_mode: int) -> None:
    def made_private(d: Path) -> None:  # as tempfile.mkstemp does: 0600 whatever the umask
        (d / "sub").mkdir()
        (d / "sub" / "private.bin").write_bytes(b"x")
        os.chmod(d / "sub" / "private.bin", 0o600)

    previous = os.umask(umask)
    try:
        out = tmp_path / "out"
        write_steps(out, [*output_steps("new"), ("extra", made_private)], overwrite=False, progress=False)
        write_json(tmp_path / "scores.json", {"a": 1})
    finally:
        os.umask(previous)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert [mode(out), mode(out / "sub")] == [folder_mode, folder_mode]
    files = [
        out / "miprun.json",
        out / "model.safetensors",
        out / "sub" / "private.bin",
        tmp_path / "scores.json",
    ]
    assert [mode(p) for p in files] == [file_mode] * 4
