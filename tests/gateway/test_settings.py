"""Gateway settings: flags win over MOEMESH_GATEWAY_* variables, which win over the defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.cli import add_gateway_command
from gateway.settings import GatewaySettings
from moemesh.errors import MoemeshError
from moemesh.settings import settings_from


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_gateway_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(["gateway", *argv])


def test_defaults_match_the_documented_ones():
    s = settings_from(GatewaySettings, parse(["--coordinator", "h:1", "--model", "m"]), {})
    assert s == GatewaySettings(coordinator="h:1", model_dir=Path("m"))
    assert (s.host, s.port, s.max_model_len, s.max_new_tokens_limit, s.max_inflight, s.exit_with_parent) == (
        "127.0.0.1", 50051, 2048, 4096, 1024, False)
    assert (s.max_migrations, s.recovery_wait_s) == (3, 30.0)
    assert (s.max_prompt_bytes, s.max_concurrent_rpcs, s.concurrent_rpcs_limit) == (1024 * 1024, None, 4096)
    assert (s.http_port, s.http_port_file, s.http) == (8000, None, True)


def test_http_port_minus_one_turns_the_http_api_off():
    s = settings_from(GatewaySettings, parse(["--coordinator", "h:1", "--model", "m", "--http-port", "-1"]), {})
    assert (s.http_port, s.http) == (-1, False)
    env = settings_from(GatewaySettings, parse(["--coordinator", "h:1", "--model", "m"]),
                        {"MOEMESH_GATEWAY_HTTP_PORT": "0", "MOEMESH_GATEWAY_HTTP_PORT_FILE": "/tmp/h"})
    assert (env.http_port, env.http_port_file, env.http) == (0, Path("/tmp/h"), True)


def test_the_concurrent_rpcs_limit_follows_max_inflight_unless_given():
    env = {"MOEMESH_GATEWAY_COORDINATOR": "c:9", "MOEMESH_GATEWAY_MODEL": "/ckpt",
           "MOEMESH_GATEWAY_MAX_PROMPT_BYTES": "4096"}
    s = settings_from(GatewaySettings, parse(["--max-inflight", "10"]), env)
    assert (s.max_prompt_bytes, s.concurrent_rpcs_limit) == (4096, 40)
    given = settings_from(GatewaySettings, parse(["--max-inflight", "10", "--max-concurrent-rpcs", "11"]), env)
    assert given.concurrent_rpcs_limit == 11


def test_environment_fills_what_flags_leave_unset():
    env = {"MOEMESH_GATEWAY_COORDINATOR": "c:9", "MOEMESH_GATEWAY_MODEL": "/ckpt",
           "MOEMESH_GATEWAY_PORT": "0", "MOEMESH_GATEWAY_MAX_INFLIGHT": "8",
           "MOEMESH_GATEWAY_EXIT_WITH_PARENT": "true", "MOEMESH_GATEWAY_PORT_FILE": "/tmp/p"}
    s = settings_from(GatewaySettings, parse(["--max-inflight", "3"]), env)
    assert (s.coordinator, s.model_dir, s.port, s.max_inflight, s.exit_with_parent, s.port_file) == (
        "c:9", Path("/ckpt"), 0, 3, True, Path("/tmp/p"))


@pytest.mark.parametrize("argv, env, message", [
    ([], {}, "--coordinator is required (or set MOEMESH_GATEWAY_COORDINATOR)"),
    (["--coordinator", "h:1"], {}, "--model is required"),
    (["--coordinator", "h:1", "--model", "m"], {"MOEMESH_GATEWAY_PORT": "high"}, "MOEMESH_GATEWAY_PORT='high'"),
    (["--coordinator", "h:1", "--model", "m", "--max-inflight", "0"], {}, "max_inflight must be > 0"),
    (["--coordinator", "nocolon", "--model", "m"], {}, "HOST:PORT"),
    (["--coordinator", "h:1", "--model", "m", "--max-migrations", "-1"], {}, "max_migrations and recovery_wait_s"),
    (["--coordinator", "h:1", "--model", "m"], {"MOEMESH_GATEWAY_RECOVERY_WAIT": "-2"}, "must be >= 0"),
    (["--coordinator", "h:1", "--model", "m"], {"MOEMESH_GATEWAY_EXIT_WITH_PARENT": "maybe"}, "EXIT_WITH_PARENT"),
    (["--coordinator", "h:1", "--model", "m", "--max-prompt-bytes", "0"], {}, "max_prompt_bytes must be > 0"),
    (["--coordinator", "h:1", "--model", "m", "--http-port", "-2"], {}, "or -1 for no HTTP API, got -2"),
    (["--coordinator", "h:1", "--model", "m", "--max-inflight", "8", "--max-concurrent-rpcs", "8"], {},
     "max_concurrent_rpcs must be more than max_inflight (8), got 8"),
])
def test_bad_settings_say_what_is_wrong(argv, env, message):
    with pytest.raises(MoemeshError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings_from(GatewaySettings, parse(argv), env)
