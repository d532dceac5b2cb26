"""kvd.config: defaults, TOML files, env and override layering, errors that name the key."""

import re
import typing
from pathlib import Path

import msgspec
import pytest

from kvd.config import (
    CacheConfig,
    ConfigError,
    DaemonConfig,
    EngineConfig,
    KvdConfig,
    LogConfig,
    MetricsConfig,
    load_config,
    resolve_run_dir,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvd.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file_and_ignore_unrelated_env():
    cfg = load_config(environ={"HOME": "/x", "PATH": "/bin", "KVD_CACHE_DIR": "/somewhere"})
    assert cfg == KvdConfig()
    assert cfg.daemon.role == "unified" and cfg.daemon.host == "127.0.0.1" and cfg.daemon.port == 0
    assert cfg.daemon.on_worker_death == "restart" and cfg.daemon.max_queue == 1024
    assert cfg.log == LogConfig(level="info", format="auto", file="")
    assert cfg.metrics.prometheus_port == -1
    assert cfg.engine == EngineConfig()


def test_engine_property_carries_the_engine_sections(tmp_path):
    path = write(tmp_path, "[cache]\nnum_blocks = 32\nblock_size = 8\n[scheduler]\nmax_num_seqs = 4\n")
    eng = load_config(path, environ={}).engine
    assert isinstance(eng, EngineConfig)
    assert eng.cache == CacheConfig(num_blocks=32, block_size=8)
    assert eng.scheduler.max_num_seqs == 4


def test_toml_file_sets_values(tmp_path):
    path = write(
        tmp_path,
        '[daemon]\nrole = "decode"\nport = 5555\ndrain_timeout_s = 5\n'
        '[log]\nformat = "json"\n[metrics]\nprometheus_port = 0\n[pd]\nprefill_endpoints = ["tcp://127.0.0.1:7100"]\n',
    )
    cfg = load_config(path, environ={})
    assert cfg.daemon.role == "decode" and cfg.daemon.port == 5555
    assert cfg.daemon.drain_timeout_s == 5.0 and isinstance(cfg.daemon.drain_timeout_s, float)
    assert cfg.log.format == "json" and cfg.metrics.prometheus_port == 0


def test_precedence_file_then_env_then_overrides(tmp_path):
    path = write(tmp_path, "[cache]\nnum_blocks = 10\nblock_size = 8\nmemory_gb = 2.0\n")
    env = {"KVD_CACHE_NUM_BLOCKS": "20", "KVD_CACHE_BLOCK_SIZE": "32"}
    cfg = load_config(path, overrides={"cache.num_blocks": 30}, environ=env)
    assert cfg.cache.num_blocks == 30  # override beats env beats file
    assert cfg.cache.block_size == 32  # env beats file
    assert cfg.cache.memory_gb == 2.0  # file beats default
    # a None override means "flag not given": the lower layers stand
    assert load_config(path, overrides={"cache.num_blocks": None}, environ=env).cache.num_blocks == 20


def test_env_values_parse_as_toml_else_string():
    env = {
        "KVD_DAEMON_ON_WORKER_DEATH": "exit",  # not TOML: taken as text
        "KVD_CACHE_ENABLE_PREFIX_CACHING": "false",
        "KVD_CACHE_MEMORY_GB": "0.5",
        "KVD_DAEMON_MAX_QUEUE": "7",
        "KVD_MODEL_MODEL": "123",  # a string field keeps the text even though it parses as an int
        "KVD_LOG_FILE": "/tmp/x.jsonl",
    }
    cfg = load_config(environ=env)
    assert cfg.daemon.on_worker_death == "exit"
    assert cfg.cache.enable_prefix_caching is False
    assert cfg.cache.memory_gb == 0.5
    assert cfg.daemon.max_queue == 7
    assert cfg.model.model == "123"
    assert cfg.log.file == "/tmp/x.jsonl"


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("KVD_SCHEDULER_MAX_NUM_SEQS", "3")
    assert load_config().scheduler.max_num_seqs == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overrides": {"cache.num_blocks": 0}}, r"^cache\.num_blocks: must be >= 1, got 0 \(from override\)$"),
        ({"overrides": {"cache.blok_size": 4}}, r"^cache\.blok_size: unknown key"),
        ({"environ": {"KVD_CACHE_BLOK_SIZE": "4"}}, r"^KVD_CACHE_BLOK_SIZE: unknown key cache\.blok_size"),
        ({"environ": {"KVD_CACHE_NUM_BLOCKS": "0"}}, r"^cache\.num_blocks: .*\(from KVD_CACHE_NUM_BLOCKS\)$"),
        ({"environ": {"KVD_DAEMON_PORT": "abc"}}, r"^daemon\.port: expected int, got str \(from KVD_DAEMON_PORT\)$"),
        ({"environ": {"KVD_NOPE_X": "1"}}, r"^KVD_NOPE_X: unknown section 'nope'"),
        ({"overrides": {"nope.x": 1}}, r"^nope: unknown section"),
        ({"overrides": {"port": 1}}, r"^port: expected section\.key"),
        ({"overrides": {"daemon.role": "both"}}, r"^daemon\.role: expected one of unified\|prefill\|decode"),
        ({"overrides": {"daemon.port": 70000}}, r"^daemon\.port: must be in \[0, 65535\]"),
        ({"overrides": {"http.tool_call_parser": "xml"}}, r"^http\.tool_call_parser: expected hermes, json or"),
        ({"overrides": {"daemon.on_worker_death": "ignore"}}, r"^daemon\.on_worker_death: expected restart\|exit"),
        ({"overrides": {"daemon.max_worker_restarts": -1}}, r"^daemon\.max_worker_restarts: must be >= 0"),
        ({"overrides": {"daemon.max_queue": 0}}, r"^daemon\.max_queue: must be >= 1"),
        ({"overrides": {"daemon.drain_timeout_s": -1.0}}, r"^daemon\.drain_timeout_s: must be finite and >= 0"),
        ({"overrides": {"daemon.request_timeout_s": 0}}, r"^daemon\.request_timeout_s: must be finite and > 0"),
        ({"overrides": {"daemon.heartbeat_interval_s": float("inf")}}, r"^daemon\.heartbeat_interval_s: must be finite"),
        ({"overrides": {"daemon.integrity_check_interval_s": float("nan")}}, r"^daemon\.integrity_check_interval_s:"),
        ({"overrides": {"daemon.max_frame_bytes": 10}}, r"^daemon\.max_frame_bytes: must be >= 1024"),
        ({"overrides": {"daemon.host": ""}}, r"^daemon\.host: must not be empty"),
        ({"overrides": {"log.level": "loud"}}, r"^log\.level: expected one of debug\|info"),
        ({"overrides": {"log.format": "xml"}}, r"^log\.format: expected auto\|json\|console"),
        ({"overrides": {"metrics.prometheus_port": -2}}, r"^metrics\.prometheus_port: must be -1"),
        ({"overrides": {"cache.enable_prefix_caching": 1}}, r"^cache\.enable_prefix_caching: expected bool, got int"),
    ],
)
def test_errors_name_the_key(kwargs, message):
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError, match=message):
        load_config(**kwargs)


def test_file_errors_name_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "[cache]\nnum_blocks = 0\n")
    with pytest.raises(ConfigError, match=rf"^cache\.num_blocks: must be >= 1, got 0 \(in {re.escape(str(path))}\)$"):
        load_config(path, environ={})
    path.write_text("[cache]\nblok_size = 4\n")
    with pytest.raises(ConfigError, match=r"^cache\.blok_size: unknown key"):
        load_config(path, environ={})
    path.write_text("[deamon]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"^deamon: unknown section"):
        load_config(path, environ={})
    path.write_text("cache = 3\n")
    with pytest.raises(ConfigError, match=r"^cache: expected a \[cache\] table"):
        load_config(path, environ={})
    path.write_text("[cache\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.toml", environ={})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_sections_are_frozen():
    cfg = load_config(environ={})
    with pytest.raises(AttributeError):
        cfg.daemon.port = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="daemon.port"):
        DaemonConfig(port=-5)
    with pytest.raises(ValueError, match="metrics.host"):
        MetricsConfig(host="")


@pytest.mark.parametrize(("name", "role"), [("kvd", "unified"), ("prefill", "prefill"), ("decode", "decode")])
def test_shipped_conf_files_load_and_list_every_option(name, role):
    path = CONF / f"{name}.toml"
    cfg = load_config(path, environ={})
    assert cfg.daemon.role == role
    # apart from the role (and a decode instance's prefill endpoints), the shipped files hold the defaults
    if role == "decode":
        assert cfg.pd.prefill_endpoints == ["/run/kvd/prefill"]  # kvd@prefill's run dir on the same host
    base = msgspec.structs.replace(cfg, daemon=msgspec.structs.replace(cfg.daemon, role="unified"),
                                   pd=msgspec.structs.replace(cfg.pd, prefill_endpoints=[]))  # fmt: skip
    assert base == KvdConfig()
    # every option appears, set or (for None defaults) commented out, each under a comment
    text = path.read_text()
    tables = [(section, owner) for section, owner in typing.get_type_hints(KvdConfig).items()]
    for section, owner in tables:
        body = text.split(f"[{section}]\n", 1)[1].split("\n[", 1)[0]
        for key, hint in typing.get_type_hints(owner).items():
            if isinstance(hint, type) and issubclass(hint, msgspec.Struct):
                tables.append((f"{section}.{key}", hint))  # a nested table, e.g. [prefill.parallel]
                continue
            m = re.search(rf"^(# )?{key} = ", body, re.M)
            assert m, f"{name}.toml: [{section}] lacks {key}"
            before = body[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            assert before.startswith("# ") and "Default" in before, f"{name}.toml: {section}.{key} lacks its comment"


def test_resolve_run_dir(tmp_path, monkeypatch):
    run = tmp_path / "r"
    assert resolve_run_dir(load_config(overrides={"daemon.run_dir": str(run)}, environ={})) == run
    cfg = load_config(overrides={"model.cache_dir": str(tmp_path / "c")}, environ={})
    assert resolve_run_dir(cfg) == tmp_path / "c" / "run"
    monkeypatch.setenv("KVD_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_run_dir(load_config(environ={})) == tmp_path / "env" / "run"


def test_pd_section_validates_and_a_decode_instance_needs_prefill_instances():
    with pytest.raises(ConfigError, match=r"pd.prefill_endpoints: a decode instance needs"):
        load_config(overrides={"daemon.role": "decode"}, environ={})
    with pytest.raises(ConfigError, match=r"pd.redis_url"):
        load_config(overrides={"daemon.role": "prefill", "pd.pool": "redis"}, environ={})
    with pytest.raises(ConfigError, match=r"pd.partial_ttl_s: must exceed pd.lease_s \(60.0\), got 30"):
        load_config(overrides={"pd.partial_ttl_s": 30}, environ={})
    with pytest.raises(ConfigError, match=r"pd.on_kv_failure: expected fail\|recompute"):
        load_config(overrides={"pd.on_kv_failure": "retry"}, environ={})
    cfg = load_config(environ={"KVD_DAEMON_ROLE": "decode", "KVD_PD_PREFILL_ENDPOINTS": '["/run/kvd/prefill", "tcp://10.0.0.2:7100"]'})
    assert cfg.pd.prefill_endpoints == ["/run/kvd/prefill", "tcp://10.0.0.2:7100"]  # a list, not its text


def test_prefill_parallel_table_and_env():
    cfg = load_config(environ={"KVD_PREFILL_PARALLEL_SP": "2", "KVD_PREFILL_PARALLEL_SYNC": "ring"})
    assert cfg.prefill.parallel.sp == 2 and cfg.prefill.parallel.sync == "ring" and cfg.prefill.group
    with pytest.raises(ConfigError, match="prefill.parallel.bogus"):
        load_config(environ={"KVD_PREFILL_PARALLEL_BOGUS": "1"})
    with pytest.raises(ConfigError, match="prefill.parallel.sync"):
        load_config(environ={"KVD_PREFILL_PARALLEL_SYNC": "tree"})


def test_route_section_validates_and_its_conf_file_lists_every_option(tmp_path):
    with pytest.raises(ConfigError, match=r"^route\.policy: expected kv\|round_robin\|least_loaded"):
        load_config(overrides={"route.policy": "random"}, environ={})
    with pytest.raises(ConfigError, match=r"^route\.instances: \[0\] needs run_dir or url"):
        load_config(overrides={"route.instances": [{"name": "a"}]}, environ={})
    with pytest.raises(ConfigError, match=r"^route\.instances: \[1\] needs both events and snapshot"):
        load_config(overrides={"route.instances": [{"url": "http://a"}, {"url": "http://b", "events": "tcp://x"}]},
                    environ={})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^route\.instances: names must differ"):
        load_config(overrides={"route.instances": [{"url": "http://a", "name": "i1"}, {"url": "http://b"}]},
                    environ={})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^route\.connect_timeout_s: must be finite and > 0"):
        load_config(overrides={"route.connect_timeout_s": 0}, environ={})
    with pytest.raises(ConfigError, match=r"route\.instances\[0\]\.bogus|unknown field"):
        load_config(overrides={"route.instances": [{"url": "http://a", "bogus": 1}]}, environ={})
    cfg = load_config(environ={"KVD_ROUTE_POLICY": "round_robin",
                               "KVD_ROUTE_INSTANCES": '[{run_dir = "/run/kvd/a"}, {url = "http://127.0.0.1:8000"}]'})
    assert cfg.route.policy == "round_robin" and cfg.route.names == ["i0", "i1"]
    # conf/route.toml: loads, names two instances, and lists every [route] option under its comment
    path = CONF / "route.toml"
    cfg = load_config(path, environ={})
    assert cfg.route.names == ["a", "b"] and cfg.route.policy == "kv" and cfg.http.port == 0
    assert msgspec.structs.replace(cfg.route, instances=[]) == KvdConfig().route
    body = path.read_text().split("[route]\n", 1)[1]
    for key in typing.get_type_hints(type(cfg.route)):
        m = re.search(rf"^{key} = ", body, re.M)
        assert m, f"route.toml: [route] lacks {key}"
        assert "Default" in body[: m.start()].rstrip("\n").rsplit("\n", 1)[-1], f"route.toml: {key} lacks its comment"
