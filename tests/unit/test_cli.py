"""The command line for a new user: version, help, -v anywhere, --json, clear errors, and
the README's quick start without S3, run as written."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
from pathlib import Path

import pytest

import weightcache
from tests.support.models import assert_bitwise_equal, reference, write_model
from weightcache import cli

ROOT = Path(__file__).resolve().parents[2]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"weightcache {weightcache.__version__}\n"


def test_every_positional_has_help_and_every_ref_its_grammar() -> None:
    for name, sub in _subcommands().items():
        for action in sub._actions:
            if action.option_strings:
                continue
            assert action.help, f"{name} {action.dest}: no help"
            if action.dest == "ref":
                for form in ("s3://BUCKET/PREFIX[@REV]", "file:///ABS/PATH[@REV]", "NAME[@REV]"):
                    assert form in action.help, f"{name} ref: help lacks {form}"
    text = _subcommands()["publish"].format_help()
    assert "the local model directory" in text and "file:///ABS/PATH[@REV]" in text


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["ls"], 0),
        (["-v", "ls"], 1),
        (["ls", "-v"], 1),
        (["ls", "--verbose", "--verbose"], 2),
        (["-v", "ls", "-v"], 2),
        (["demo", "-vv"], 2),
        (["daemon", "-v"], 1),
    ],
)
def test_verbose_before_or_after_the_command(argv: list[str], verbose: int) -> None:
    args = cli.build_parser().parse_args(argv)
    assert args.verbose + args.verbose_after == verbose


def test_publish_and_index_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_model(tmp_path / "src", shards=2)
    ref = f"file://{tmp_path}/origin/m"
    rc, out, err = run_cli(capsys, "publish", str(tmp_path / "src"), ref, "--json", "-v")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["ref"] == f"{ref}@{doc['revision']}" and re.fullmatch(
        r"[0-9a-f]{64}", doc["revision"]
    )
    assert doc["files"] == len(list((tmp_path / "src").iterdir()))
    assert doc["uploaded_bytes"] == doc["total_bytes"] > 0
    # index over the same objects: the same manifest, so the same revision.
    rc, out, err = run_cli(capsys, "index", ref, "--json")
    assert rc == 0, err
    again = json.loads(out)
    assert again["revision"] == doc["revision"] and again["uploaded_bytes"] == 0


@pytest.mark.parametrize("missing", ["does-not-exist", "a-file"])
def test_publish_of_no_directory_is_request_invalid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    (tmp_path / "a-file").write_bytes(b"x")
    target = tmp_path / missing
    rc, out, err = run_cli(capsys, "publish", str(target), f"file://{tmp_path}/origin/m")
    what = "does not exist" if missing == "does-not-exist" else "is not a directory"
    assert rc == 1 and out == ""
    assert (
        err.splitlines()[0] == f"weightcache: request_invalid: cannot publish {target}: it {what}"
    )
    assert not (tmp_path / "origin").exists()  # nothing reached the origin


@pytest.mark.parametrize(
    "argv", [["ls"], ["ls", "--json"], ["verify"], ["verify", "--json"], ["verify", "--repair"]]
)
def test_read_only_commands_on_a_missing_cache_make_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    cache = tmp_path / "no" / "cache"
    rc, out, err = run_cli(capsys, *argv, "--cache-dir", str(cache))
    assert rc == 1 and out == ""
    lines = err.splitlines()
    assert lines[0] == f"weightcache: request_invalid: no cache at {cache}"
    assert lines[1].startswith("  hint: check --cache-dir, WEIGHTCACHE_CACHE_DIR or cache.dir")
    assert not (tmp_path / "no").exists()
    # A file where the cache should be is said so, and left alone.
    (tmp_path / "f").write_bytes(b"")
    rc, _, err = run_cli(capsys, *argv, "--cache-dir", str(tmp_path / "f"))
    assert rc == 1 and "(it is not a directory)" in err.splitlines()[0]


def test_ls_on_an_existing_empty_directory_lists_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run_cli(capsys, "ls", "--json", "--cache-dir", str(tmp_path))
    assert rc == 0 and json.loads(out)["models"] == []


def _quick_start() -> tuple[str, str]:
    """The README's quick start without S3: its one command and its load call."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start without S3", 1)[1].split("\n## ", 1)[0]
    command = next(
        line.strip() for line in section.splitlines() if line.startswith("    weightcache ")
    )
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    return command, code


def test_the_readmes_quick_start_without_s3_runs_as_written(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    command, code = _quick_start()
    origin = "file:///tmp/weightcache-origin/my-model"
    assert command.split("#")[0].split() == ["weightcache", "publish", "./my-model", origin]
    assert f'weightcache.load("{origin}")' in code
    # The same command and call, with the origin under this test's directory.
    mine = f"file://{tmp_path}/origin/my-model"
    files = write_model(tmp_path / "my-model", shards=2)
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command.replace(origin, mine), comments=True)
    rc, out, err = run_cli(capsys, *argv[1:])
    assert rc == 0, err
    assert out.startswith(f"published {mine}@")
    scope: dict[str, object] = {}
    with caplog.at_level(logging.WARNING):
        exec(code.replace(origin, mine), scope)
    assert_bitwise_equal(scope["state_dict"], reference(files))  # type: ignore[arg-type]
    assert [r.getMessage().split()[:2] for r in caplog.records] == [
        ["load.fallback", "reason=no_daemon"]
    ]
    rc, out, _ = run_cli(capsys, "ls")
    assert rc == 0 and out.startswith("cache ") and ": 1 revisions," in out
