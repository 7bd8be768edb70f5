"""Configuration: layering and validation with dotted paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightcache.config import GiB, MiB, load_config, parse_size
from weightcache.errors import ConfigInvalid


def test_defaults_without_anything() -> None:
    cfg = load_config(env={"HOME": "/home/x"})
    assert cfg.cache.dir == Path("/home/x/.cache/weightcache")
    assert cfg.fetch.concurrency == 8
    assert cfg.publish.chunk_bytes == 16 * MiB


def test_layers_file_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "wc.toml"
    toml.write_text(
        '[cache]\ndir = "/data/wc"\nreserve_bytes = "2GiB"\n[fetch]\nconcurrency = 4\nretries = 3\n'
    )
    env = {
        "WEIGHTCACHE_FETCH_CONCURRENCY": "6",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
    cfg = load_config(toml, env=env, overrides={"cache.dir": "/flag/wc"})
    assert cfg.cache.dir == Path("/flag/wc")
    assert cfg.cache.reserve_bytes == 2 * GiB
    assert cfg.fetch.concurrency == 6
    assert cfg.fetch.retries == 3
    assert cfg.s3.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.s3.secret_access_key == "secret"
    assert "secret" not in repr(cfg)


def test_every_problem_reported_with_its_path(tmp_path: Path) -> None:
    toml = tmp_path / "wc.toml"
    toml.write_text(
        '[fetch]\nconcurrency = 0\nretries = "many"\nbogus = 1\n[nosuch]\nx = 1\n'
        '[s3]\nsecret_access_key = "leak"\n'
    )
    with pytest.raises(ConfigInvalid) as info:
        load_config(toml, env={})
    problems = info.value.problems
    joined = "\n".join(problems)
    assert "fetch.retries: must be an integer" in joined
    assert "fetch.bogus: unknown option" in joined
    assert "nosuch: unknown section" in joined
    assert "s3.secret_access_key: secrets are read from AWS_" in joined
    assert "leak" not in joined


def test_range_checks_after_types() -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(
            env={"WEIGHTCACHE_FETCH_CONCURRENCY": "0", "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "1"}
        )
    joined = "\n".join(info.value.problems)
    assert "fetch.concurrency: must be in 1..256, got 0" in joined
    assert "publish.chunk_bytes" in joined


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(env={"WEIGHTCACHE_CACHE_RESERVE_BYTES": "lots"})
    assert "WEIGHTCACHE_CACHE_RESERVE_BYTES" in info.value.problems[0]


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid, match="No such file"):
        load_config(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache\n")
    with pytest.raises(ConfigInvalid, match=r"bad\.toml"):
        load_config(bad, env={})


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64MiB", 64 * MiB),
        ("2GiB", 2 * GiB),
        ("1GB", 10**9),
        ("3k", 3000),
        ("5 mib", 5 * MiB),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_bad_size() -> None:
    with pytest.raises(ValueError, match="not a byte size"):
        parse_size("12 parsecs")


def test_daemon_refuses_a_network_listener_without_a_token() -> None:
    from weightcache.daemon import check_exposure

    open_cfg = load_config(env={"WEIGHTCACHE_DAEMON_LISTEN": "0.0.0.0:7878"})
    with pytest.raises(ConfigInvalid, match="token is required"):
        check_exposure(open_cfg)
    check_exposure(load_config(env={"WEIGHTCACHE_DAEMON_LISTEN": "127.0.0.1:7878"}))
    check_exposure(
        load_config(env={"WEIGHTCACHE_DAEMON_LISTEN": "0.0.0.0:7878", "WEIGHTCACHE_TOKEN": "t"})
    )


def test_every_problem_at_once_with_where_it_came_from(tmp_path: Path) -> None:
    toml = tmp_path / "wc.toml"
    toml.write_text('[fetch]\nconcurency = 4\nretries = 500\n[cache]\nmax_bytes = "lots"\n')
    env = {"WEIGHTCACHE_DAEMON_MAX_PENDING": "0", "WEIGHTCACHE_FETCH_HASH_RETRIES": "x"}
    with pytest.raises(ConfigInvalid) as info:
        load_config(toml, env=env, overrides={"publish.chunk_bytes": 1, "fetch.nope": 1})
    problems = info.value.problems
    by_path = {p.split(":")[0]: p for p in problems}
    # unknown keys, type errors and range errors together, each with its source
    assert by_path["fetch.concurency"].endswith(
        f"unknown option (in {toml}); did you mean fetch.concurrency?"
    )
    assert by_path["fetch.retries"] == f"fetch.retries: must be in 0..100, got 500 (from {toml})"
    assert f"(from {toml})" in by_path["cache.max_bytes"]
    assert by_path["daemon.max_pending"].endswith("got 0 (from WEIGHTCACHE_DAEMON_MAX_PENDING)")
    assert by_path["fetch.hash_retries"].endswith("(from WEIGHTCACHE_FETCH_HASH_RETRIES)")
    assert by_path["publish.chunk_bytes"].endswith("(from command line)")
    assert "command line" in by_path["fetch.nope"]
    assert len(problems) == 7
    # a value that did not parse is not also reported by the range checks
    assert sum(p.startswith("cache.max_bytes") for p in problems) == 1


def test_a_range_problem_on_a_default_says_so() -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(env={"WEIGHTCACHE_FETCH_BACKOFF_BASE_S": "20"})
    assert (
        "fetch.backoff_max_s: must be >= fetch.backoff_base_s, got 10.0 (from the default)"
        in info.value.problems
    )


def test_unknown_section_suggests_the_closest(tmp_path: Path) -> None:
    toml = tmp_path / "wc.toml"
    toml.write_text("[fetchh]\nretries = 1\n")
    with pytest.raises(ConfigInvalid, match=r"did you mean \[fetch\]"):
        load_config(toml, env={})


def test_an_unknown_weightcache_variable_warns_once_with_the_closest_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"WEIGHTCACHE_S3_ENDPOINT": "http://x:1", "WEIGHTCACHE_ZZZ_QQQ": "1"}
    with caplog.at_level("WARNING", logger="weightcache.config"):
        cfg = load_config(env=env)
    assert cfg.s3.endpoint_url == "https://s3.amazonaws.com"  # ignored, not guessed
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "config.unknown_variable name=WEIGHTCACHE_S3_ENDPOINT "
        "did_you_mean=WEIGHTCACHE_S3_ENDPOINT_URL",
        "config.unknown_variable name=WEIGHTCACHE_ZZZ_QQQ did_you_mean=-",
    ]


def test_known_and_alias_variables_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    env = {
        "WEIGHTCACHE_SOCKET": "/tmp/s",
        "WEIGHTCACHE_TOKEN": "t",
        "WEIGHTCACHE_FETCH_RETRIES": "1",
    }
    with caplog.at_level("WARNING", logger="weightcache.config"):
        load_config(env=env)
    assert not caplog.records


def test_one_key_without_the_other_is_a_problem_that_echoes_neither() -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config(env={"AWS_ACCESS_KEY_ID": "AKIDSECRETISH"})
    joined = "\n".join(info.value.problems)
    assert "s3.secret_access_key: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together" in joined
    assert "AKIDSECRETISH" not in joined
