"""The config file: the spec's format loads, every problem is reported, defaults hold."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from first_hop_proxy.config import (
    Config,
    ConfigError,
    LoadedConfig,
    load_config,
    parse_config,
)
from first_hop_proxy.config_file import (
    Lookup,
    find_config,
    starter_config,
    user_config_file,
    write_starter_config,
)

from .conftest import LEGACY_CONFIG, REPO

EXAMPLE = REPO / "config.yaml.example"


def parse(data: dict[str, Any], env: dict[str, str] | None = None) -> LoadedConfig:
    return parse_config(data, base_dir=Path("/srv/proxy"), env=env or {})


def problems(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(data, env)
    return caught.value.problems


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- A legacy config and the shipped example -------------------------------------------


def test_spec_config_loads_unchanged() -> None:
    loaded = load_config(LEGACY_CONFIG, env={})
    config = loaded.config
    assert config.target_proxy.url == "https://your-remote-proxy.com/chat/completions"
    assert config.target_proxy.headers == {"Authorization": "Bearer your-api-key-here"}
    assert config.target_proxy.timeout == 30
    assert len(config.regex_replacement.rules) == 12
    assert config.regex_replacement.rules[0].roles == frozenset({"user"})
    assert len(config.response_processing.rules) > 40
    parsing = config.response_parsing
    assert [r.new_status for r in parsing.status_recategorization.rules] == [
        429,
        429,
        429,
        503,
        503,
    ]
    assert parsing.status_recategorization.rules[0].original_status == 200
    assert "choices[0].message.content" in parsing.json_extraction.paths
    assert parsing.logging.include_matched_pattern is True
    eh = config.error_handling
    assert eh.max_retries == 10
    assert eh.conditional_retry_delay_multiplier == 0.5
    assert 451 in eh.retry_codes and 422 in eh.fail_codes and 404 in eh.conditional_retry_codes
    rule = eh.hard_stop_conditions.rules[0]
    assert rule.pattern.startswith("googleAIBlockingResponseHandler")
    assert rule.preserve_original_response and rule.add_user_message
    assert config.server.host == "0.0.0.0" and config.server.port == 8765
    assert config.error_logging.max_files == 100
    # Relative folders resolve against the config file's folder, not the working directory.
    assert Path(config.logging.folder) == LEGACY_CONFIG.parent.resolve() / "logs"
    assert Path(config.error_logging.folder) == LEGACY_CONFIG.parent.resolve() / "logs" / "errors"


def test_spec_config_warnings() -> None:
    warnings = load_config(LEGACY_CONFIG, env={}).warnings
    overlap = [w for w in warnings if w.startswith("error_handling.conditional_retry_codes")]
    assert any("411" in w and "fail_codes wins" in w for w in overlap), warnings
    assert any("423" in w and "retry_codes wins" in w for w in overlap), warnings
    pipe = [w for w in warnings if w.startswith("regex_replacement.rules[9].pattern")]
    assert pipe and "'|'" in pipe[0] and "empty string" in pipe[0]
    # It listens on 0.0.0.0 with a key in its headers.
    assert any(w.startswith("server.host:") and "exposes the key" in w for w in warnings)


def keys(d: dict[str, Any], prefix: str = "") -> set[str]:
    """Every key path of a config mapping (header names excluded)."""
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k != "headers":
            out |= keys(v, prefix + k + ".")
    return out


def test_example_loads_without_warning() -> None:
    loaded = load_config(EXAMPLE, env={})
    assert loaded.warnings == []
    assert loaded.config.target_proxy.url.startswith("https://")
    assert not loaded.demo


def test_example_is_valid_yaml_with_defaults() -> None:
    """Every section and key of the model appears, with its default value."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    example = Config.model_validate(data).model_dump()
    defaults = Config().model_dump()

    assert keys(data) == keys(defaults)
    assert example["upstreams"] == defaults["upstreams"] == []
    for section, values in defaults.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if (section, key) in {("target_proxy", "url")}:
                continue
            got = example[section][key]
            if isinstance(value, dict) and "rules" in value:
                got = {**got, "rules": []}
            if section == "response_parsing" and key == "status_recategorization":
                got = {**got, "rules": []}
            if section == "error_handling" and key == "hard_stop_conditions":
                got = {**got, "rules": []}
            assert got == value, f"{section}.{key}"


def test_example_comments_every_key() -> None:
    """Every key has a comment above it or inline; the keys of an example rule are
    explained by the comment above its ``rules:`` key."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    item_indent = -1
    checked = 0
    for i, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if line.lstrip().startswith("- "):
            item_indent = indent
            continue
        if indent <= item_indent:
            item_indent = -1
        match = re.match(r"^\s*([A-Za-z_0-9]+):", line)
        if not match or item_indent >= 0:
            continue
        above = lines[i - 1].strip()
        inline = "#" in line.split(":", 1)[1]
        assert above.startswith("#") or inline, f"line {i + 1} has no comment: {line}"
        checked += 1
    assert checked == len(keys(Config().model_dump()))


def test_example_commented_rules_are_valid() -> None:
    """The commented-out example rules load without a problem once uncommented."""
    text = EXAMPLE.read_text(encoding="utf-8")
    blocks = re.findall(r"^(\s*)# rules:\n((?:\1#   .*\n)+)", text, flags=re.M)
    assert len(blocks) == 2
    for (indent, body), section in zip(
        blocks, ["regex_replacement", "response_processing"], strict=True
    ):
        uncommented = "\n".join(line[len(indent) + 2 :] for line in body.splitlines())
        rules = yaml.safe_load("rules:\n" + uncommented)["rules"]
        loaded = parse({section: {"rules": rules}})
        assert loaded.warnings == []
        assert len(getattr(loaded.config, section).rules) == 1


def test_example_status_and_hard_stop_rules() -> None:
    config = load_config(EXAMPLE, env={}).config
    (rule,) = config.response_parsing.status_recategorization.rules
    assert (rule.pattern, rule.original_status, rule.new_status) == (
        "The model is overloaded",
        200,
        429,
    )
    assert len(config.error_handling.hard_stop_conditions.rules) == 1


# --- Defaults ------------------------------------------------------------------------------


def test_defaults() -> None:
    config = parse({}).config
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8765
    assert config.server.max_body_mb == 50
    assert config.server.shutdown_grace_seconds == 30
    assert config.server.cors_origins == []
    assert config.server.allowed_hosts == []
    assert config.target_proxy.timeout == 30
    assert config.error_handling.max_retries == 10
    assert config.error_handling.base_delay == 1
    assert config.error_handling.max_delay == 60
    assert config.error_handling.conditional_retry_max_attempts == 2
    assert config.response_parsing.enabled and config.regex_replacement.enabled


def test_circuit_breaker_defaults() -> None:
    breaker = parse({}).config.circuit_breaker
    assert breaker.enabled is True
    assert breaker.failure_threshold == 5
    assert breaker.recovery_timeout == 30
    assert breaker.half_open_max_requests == 1
    custom = parse({"circuit_breaker": {"enabled": False, "failure_threshold": 2}}).config
    assert custom.circuit_breaker.failure_threshold == 2 and not custom.circuit_breaker.enabled


def test_default_lists_do_not_overlap() -> None:
    assert parse({}).warnings == []


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "{}\n"])
def test_empty_file_is_all_defaults(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    loaded = load_config(path, env={})
    assert loaded.demo and loaded.empty
    if text.strip() in ("", "# only a comment"):
        assert loaded.warnings == [f"{path} is empty: built-in defaults apply"]
    assert loaded.config.server.host == "127.0.0.1"
    assert not load_config(write(tmp_path, "server:\n  port: 1\n"), env={}).empty


def test_missing_default_file_is_demo_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_config: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load_config(None, env={})
    assert loaded.demo and loaded.path is None
    assert loaded.searched == (Path("config.yaml"), user_config)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml", env={})
    init = f"first-hop-proxy init {tmp_path / 'nope.yaml'}"
    assert caught.value.problems == [f"no such file; write a starter config there with: {init}"]
    with pytest.raises(ConfigError):
        load_config(None, env={"FHP_CONFIG": str(tmp_path / "nope.yaml")})


def test_required_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(None, env={}, required=True)


@pytest.fixture
def user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the user's config file is looked for, in a fresh $XDG_CONFIG_HOME."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = user_config_file()
    assert path == tmp_path / "xdg" / "first-hop-proxy" / "config.yaml"
    return path


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_config: Path) -> None:
    """--config, then $FHP_CONFIG, then ./config.yaml, then the user's config file."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    option = write(tmp_path, "server:\n  port: 1001\n", "option.yaml")
    from_env = write(tmp_path, "server:\n  port: 1002\n", "env.yaml")
    env = {"FHP_CONFIG": str(from_env)}
    user_config.parent.mkdir(parents=True)
    write(user_config.parent, "server:\n  port: 1004\n")

    def port(path: Path | None, env: dict[str, str]) -> tuple[int, Path | None]:
        loaded = load_config(path, env=env)
        return loaded.config.server.port, loaded.path

    assert port(option, env) == (1001, option)
    assert port(None, env) == (1002, from_env)
    assert port(None, {}) == (1004, user_config)
    write(work, "server:\n  port: 1003\n")
    assert port(None, {}) == (1003, Path("config.yaml"))
    assert find_config(None, {}) == Lookup(Path("config.yaml"))
    assert find_config(option, env) == Lookup(option, explicit=True)


def test_user_config_folders_resolve_against_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_config: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    user_config.parent.mkdir(parents=True)
    write(user_config.parent, "logging:\n  folder: my-logs\n")
    config = load_config(None, env={}).config
    assert Path(config.logging.folder) == user_config.parent.resolve() / "my-logs"
    assert Path(config.error_logging.folder) == user_config.parent.resolve() / "logs" / "errors"


def test_starter_config_is_the_example() -> None:
    """The package ships the starter config; the repository's example is the same text."""
    assert starter_config() == EXAMPLE.read_text(encoding="utf-8"), (
        "config.yaml.example changed: copy it into the package too "
        "(cp config.yaml.example src/first_hop_proxy/config.yaml.example)"
    )


def test_write_starter_config_never_overwrites(tmp_path: Path) -> None:
    path = write_starter_config(tmp_path / "a" / "b" / "config.yaml")
    assert path.read_text(encoding="utf-8") == starter_config()
    path.write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError):
        write_starter_config(path)
    assert path.read_text(encoding="utf-8") == "mine"


def test_fhp_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "target_proxy:\n  url: http://127.0.0.1:9/v1/chat/completions\n")
    loaded = load_config(None, env={"FHP_CONFIG": str(path)})
    assert loaded.path == path
    assert loaded.config.target_proxy.url == "http://127.0.0.1:9/v1/chat/completions"


# --- Validation: one line per problem, each naming its key path ------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"target_proxy": {"timeout": "abc"}}, "target_proxy.timeout: "),
        ({"target_proxy": {"headers": ["a"]}}, "target_proxy.headers: "),
        ({"server": {"port": "eighty"}}, "server.port: "),
        ({"server": {"debug": "maybe"}}, "server.debug: "),
        ({"error_handling": {"max_retries": "lots"}}, "error_handling.max_retries: "),
        ({"regex_replacement": {"rules": "none"}}, "regex_replacement.rules: "),
        ({"logging": "off"}, "logging: "),
    ],
)
def test_wrong_type(data: dict[str, Any], expected: str) -> None:
    (problem,) = problems(data)
    assert problem.startswith(expected)
    assert "valid" in problem  # "Input should be a valid ..."


def test_negative_delay() -> None:
    found = problems({"error_handling": {"base_delay": -1, "max_delay": -0.5}})
    assert found == [
        "error_handling.base_delay: Input should be greater than or equal to 0 (got -1)",
        "error_handling.max_delay: Input should be greater than or equal to 0 (got -0.5)",
    ]


def test_status_outside_range() -> None:
    found = problems(
        {
            "error_handling": {"retry_codes": [429, 600], "fail_codes": [99]},
            "response_parsing": {
                "status_recategorization": {
                    "rules": [{"pattern": "x", "original_status": 1000, "new_status": 429}]
                }
            },
        }
    )
    assert "error_handling.retry_codes[1]: Input should be less than or equal to 599 (got 600)" in (
        found
    )
    assert (
        "error_handling.fail_codes[0]: Input should be greater than or equal to 100 (got 99)"
        in found
    )
    assert any(
        p.startswith("response_parsing.status_recategorization.rules[0].original_status:")
        and "1000" in p
        for p in found
    )
    assert len(found) == 3


def test_invalid_regex_names_rule_and_error() -> None:
    found = problems(
        {
            "error_handling": {
                "hard_stop_conditions": {"rules": [{"pattern": "ok"}, {"pattern": "abc(def"}]}
            }
        }
    )
    assert found == [
        "error_handling.hard_stop_conditions.rules[1].pattern: "
        "invalid regular expression: missing ) at position 7"
    ]


@pytest.mark.parametrize(
    "section",
    [
        "regex_replacement",
        "response_processing",
    ],
)
def test_invalid_regex_in_rewrite_rules(section: str) -> None:
    (problem,) = problems({section: {"rules": [{"pattern": "[unclosed"}]}})
    assert problem.startswith(f"{section}.rules[0].pattern: invalid regular expression: ")
    assert "unterminated character set" in problem


def test_invalid_regex_in_recategorization() -> None:
    rules = [{"pattern": "a)", "new_status": 429}]
    (problem,) = problems({"response_parsing": {"status_recategorization": {"rules": rules}}})
    assert problem.startswith("response_parsing.status_recategorization.rules[0].pattern: invalid")


def test_unknown_flag_letter() -> None:
    (problem,) = problems({"regex_replacement": {"rules": [{"pattern": "a", "flags": "iq"}]}})
    assert problem == (
        "regex_replacement.rules[0].flags: unknown flag letter(s) 'q'; use only i, m, s, x"
    )
    assert parse({"regex_replacement": {"rules": [{"pattern": "a", "flags": "imsx"}]}})


def test_unknown_role() -> None:
    (problem,) = problems({"regex_replacement": {"rules": [{"pattern": "a", "apply_to": "robot"}]}})
    assert problem.startswith("regex_replacement.rules[0].apply_to: unknown role(s) 'robot'")
    (problem,) = problems(
        {"regex_replacement": {"rules": [{"pattern": "a", "apply_to": ["user", "bot"]}]}}
    )
    assert "'bot'" in problem and "'user'" not in problem
    loaded = parse(
        {"regex_replacement": {"rules": [{"pattern": "a", "apply_to": ["user", "tool"]}]}}
    )
    assert loaded.config.regex_replacement.rules[0].roles == frozenset({"user", "tool"})


def test_missing_required_key() -> None:
    (problem,) = problems({"regex_replacement": {"rules": [{"replacement": "x"}]}})
    assert problem == "regex_replacement.rules[0].pattern: required key is missing"


def test_every_problem_reported_at_once() -> None:
    found = problems(
        {
            "target_proxy": {"timeout": -1},
            "regex_replacement": {
                "rules": [{"pattern": "(", "flags": "z", "apply_to": "narrator"}]
            },
            "server": {"port": 70000},
        }
    )
    paths = [p.split(":", 1)[0] for p in found]
    assert paths == [
        "target_proxy.timeout",
        "regex_replacement.rules[0].pattern",
        "regex_replacement.rules[0].flags",
        "regex_replacement.rules[0].apply_to",
        "server.port",
    ]


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, 'target_proxy:\n  url: "unterminated\n'), env={})
    (problem,) = caught.value.problems
    assert problem.startswith("not valid YAML:") and "line" in problem


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "- a\n- b\n"), env={})
    assert caught.value.problems == ["the top level must be a mapping of sections"]


# --- Warnings -----------------------------------------------------------------------------


def test_unknown_key_did_you_mean() -> None:
    loaded = parse({"error_handling": {"max_retires": 3}})
    assert loaded.warnings == [
        "error_handling.max_retires: unknown key, ignored; did you mean 'max_retries'?"
    ]
    assert loaded.config.error_handling.max_retries == 10


def test_unknown_keys_everywhere() -> None:
    loaded = parse(
        {
            "servr": {},
            "regex_replacement": {"rules": [{"pattern": "a", "replacment": "b"}]},
            "target_proxy": {"headers": {"X-Anything": "goes"}},
            "completely_unrelated": 1,
        }
    )
    assert "servr: unknown key, ignored; did you mean 'server'?" in loaded.warnings
    assert (
        "regex_replacement.rules[0].replacment: unknown key, ignored; "
        "did you mean 'replacement'?" in loaded.warnings
    )
    assert "completely_unrelated: unknown key, ignored" in loaded.warnings
    assert len(loaded.warnings) == 3  # header names are free-form


def test_overlapping_code_lists() -> None:
    loaded = parse(
        {
            "error_handling": {
                "fail_codes": [400, 404],
                "retry_codes": [429, 400],
                "conditional_retry_codes": [404, 429, 500],
            }
        }
    )
    assert sorted(loaded.warnings) == sorted(
        [
            "error_handling.retry_codes: 400 also in fail_codes; fail_codes wins "
            "(precedence: fail_codes, then retry_codes, then conditional_retry_codes)",
            "error_handling.conditional_retry_codes: 404 also in fail_codes; fail_codes wins "
            "(precedence: fail_codes, then retry_codes, then conditional_retry_codes)",
            "error_handling.conditional_retry_codes: 429 also in retry_codes; retry_codes wins "
            "(precedence: fail_codes, then retry_codes, then conditional_retry_codes)",
        ]
    )


def test_empty_match_pattern_warns() -> None:
    loaded = parse({"response_processing": {"rules": [{"pattern": "a*"}]}})
    assert loaded.warnings[0].startswith("response_processing.rules[0].pattern: 'a*' matches")


def test_base_delay_above_max_delay_warns() -> None:
    loaded = parse({"error_handling": {"base_delay": 10, "max_delay": 5}})
    assert loaded.warnings == [
        "error_handling.base_delay: 10.0 is above max_delay (5.0); every retry waits max_delay"
    ]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_public_host_with_key_warns(host: str) -> None:
    loaded = parse(
        {"server": {"host": host}, "target_proxy": {"headers": {"Authorization": "Bearer sk-1"}}}
    )
    (warning,) = loaded.warnings
    assert warning.startswith(f"server.host: listening on {host} exposes the key")


def test_configured_accept_encoding_warns() -> None:
    url = "http://127.0.0.1:9/v1/chat/completions"
    headers = {"accept-encoding": "br"}
    ignored = (
        ".headers.Accept-Encoding: ignored; the proxy asks the upstream only "
        "for the encodings it can decode (gzip, deflate, br, zstd)"
    )
    single = parse({"target_proxy": {"url": url, "headers": headers}}).warnings
    assert single == ["target_proxy" + ignored]
    listed = [{"name": "a", "url": url}, {"name": "b", "url": url, "headers": headers}]
    assert parse({"upstreams": listed}).warnings == ["upstreams[1]" + ignored]


@pytest.mark.parametrize(
    ("host", "headers"),
    [
        ("127.0.0.1", {"Authorization": "Bearer sk-1"}),
        ("localhost", {"X-Api-Key": "k"}),
        ("::1", {"Authorization": "Bearer sk-1"}),
        ("127.0.0.2", {"Authorization": "Bearer sk-1"}),
        ("0.0.0.0", {}),
        ("0.0.0.0", {"X-Title": "SillyTavern"}),
        ("0.0.0.0", {"Authorization": "Bearer ${NO_SUCH_KEY_VAR:-}"}),
    ],
)
def test_no_exposure_warning(host: str, headers: dict[str, str]) -> None:
    loaded = parse({"server": {"host": host}, "target_proxy": {"headers": headers}})
    assert loaded.warnings == []


def test_env_host_override_warns_too() -> None:
    loaded = parse(
        {"target_proxy": {"headers": {"X-Api-Key": "secret"}}}, env={"FHP_HOST": "0.0.0.0"}
    )
    assert loaded.config.server.host == "0.0.0.0"
    assert loaded.warnings and "exposes the key" in loaded.warnings[0]


# --- Environment ------------------------------------------------------------------------


def test_env_var_expansion() -> None:
    env = {"MY_KEY": "sk-abc", "HOST": "up.example", "EMPTY": ""}
    loaded = parse(
        {
            "target_proxy": {
                "url": "https://${HOST}/v1/chat/completions",
                "headers": {"Authorization": "Bearer ${MY_KEY}", "X-Empty": "[${EMPTY}]"},
            },
            "server": {"port": "${PORT:-9000}", "host": "${BIND:-127.0.0.1}"},
            "logging": {"folder": "${LOGDIR:-logs}/requests"},
            "error_logging": {"folder": "${EMPTY:-errs}"},
        },
        env=env,
    )
    config = loaded.config
    assert config.target_proxy.url == "https://up.example/v1/chat/completions"
    assert config.target_proxy.headers == {"Authorization": "Bearer sk-abc", "X-Empty": "[]"}
    assert config.server.port == 9000
    assert config.server.host == "127.0.0.1"
    assert config.logging.folder == "/srv/proxy/logs/requests"
    assert config.error_logging.folder == "/srv/proxy/errs"


def test_env_var_in_list_and_rule() -> None:
    loaded = parse(
        {"regex_replacement": {"rules": [{"pattern": "${WORD:-hello}", "replacement": "${TO}"}]}},
        env={"TO": "hi"},
    )
    rule = loaded.config.regex_replacement.rules[0]
    assert (rule.pattern, rule.replacement) == ("hello", "hi")


def test_unset_env_var_is_an_error() -> None:
    found = problems(
        {
            "target_proxy": {
                "url": "${TARGET}",
                "headers": {"Authorization": "Bearer ${KEY}"},
            }
        }
    )
    assert found == [
        "target_proxy.url: environment variable TARGET is not set "
        "(set it, or write ${TARGET:-fallback} for a default)",
        "target_proxy.headers.Authorization: environment variable KEY is not set "
        "(set it, or write ${KEY:-fallback} for a default)",
    ]


def test_env_overrides() -> None:
    loaded = parse(
        {
            "target_proxy": {
                "url": "http://file.example/v1/chat/completions",
                "headers": {"authorization": "Bearer from-file", "X-Other": "1"},
            },
            "server": {"host": "127.0.0.1", "port": 1234},
        },
        env={
            "FHP_TARGET_URL": "http://env.example/v1/chat/completions",
            "FHP_TARGET_API_KEY": "sk-env",
            "FHP_HOST": "::1",
            "FHP_PORT": "4321",
        },
    )
    config = loaded.config
    assert config.target_proxy.url == "http://env.example/v1/chat/completions"
    assert config.target_proxy.headers == {"X-Other": "1", "Authorization": "Bearer sk-env"}
    assert config.server.host == "::1"
    assert config.server.port == 4321


def test_env_overrides_without_sections() -> None:
    loaded = parse(
        {}, env={"FHP_TARGET_URL": "http://env.example/chat/completions", "FHP_TARGET_API_KEY": "k"}
    )
    assert loaded.config.target_proxy.url == "http://env.example/chat/completions"
    assert loaded.config.target_proxy.headers == {"Authorization": "Bearer k"}
    assert not loaded.demo


def test_bad_fhp_port() -> None:
    assert problems({}, env={"FHP_PORT": "http"}) == [
        "FHP_PORT: 'http' is not a port number (use 1-65535)"
    ]
    (problem,) = problems({}, env={"FHP_PORT": "99999"})
    assert problem.startswith("server.port:")


def test_env_overrides_from_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: 1000\n")
    loaded = load_config(path, env={"FHP_PORT": "2000"})
    assert loaded.config.server.port == 2000


# --- Folders ------------------------------------------------------------------------------


def test_relative_folders_resolve_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(conf_dir, "logging:\n  folder: my-logs\nerror_logging:\n  folder: ../errs\n")
    config = load_config(path, env={}).config
    assert Path(config.logging.folder) == conf_dir.resolve() / "my-logs"
    assert Path(config.error_logging.folder).resolve() == (tmp_path / "errs").resolve()


def test_relative_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "logging:\n  folder: l\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("sub/config.yaml"), env={}).config
    assert Path(config.logging.folder) == (tmp_path / "sub" / "l").resolve()
    assert Path(config.error_logging.folder) == (tmp_path / "sub" / "logs" / "errors").resolve()


def test_absolute_folders_stay(tmp_path: Path) -> None:
    config = parse({"logging": {"folder": str(tmp_path / "abs")}}).config
    assert config.logging.folder == str(tmp_path / "abs")


@pytest.mark.parametrize(
    ("settings", "start"),
    [
        pytest.param(
            {"error_handling": {"max_total_seconds": 30}, "target_proxy": {"timeout": 30}},
            "error_handling.max_total_seconds: 30 s is not more than target_proxy.timeout",
            id="budget-below-timeout",
        ),
        pytest.param(
            {"error_handling": {"base_delay": 90, "max_delay": 120}},
            "error_handling.base_delay: 90 s leaves no retry room",
            id="no-retry-fits",
        ),
        pytest.param(
            {"error_handling": {"exhausted_429_status": 429}},
            "error_handling.exhausted_429_status: 429 makes SillyTavern retry",
            id="429-retried-by-sillytavern",
        ),
    ],
)
def test_combinations_that_cannot_work_are_warned(settings: dict[str, Any], start: str) -> None:
    warnings = parse(settings).warnings
    assert any(w.startswith(start) for w in warnings), warnings


def test_default_budget_and_breaker_agree() -> None:
    config = parse({}).config
    assert config.error_handling.max_total_seconds == 60
    assert parse({}).warnings == []
    assert parse({"error_handling": {"max_total_seconds": None}}).warnings == []
