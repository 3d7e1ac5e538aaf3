"""`moemesh` command line: one subcommand per job; each builds its settings once.

Each service registers its own subcommand (`add_*_command(subparsers)` returns the function to
run), so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from moemesh.commands import run
from moemesh.errors import ConfigError
from moemesh.settings import add_options, option, parse_bool, settings_from
from moemesh.tls import ca_option, cert_option, key_option, tls_of


def _add_tiny_model(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from moemesh.model.tiny import TinyModelSettings, write_tiny_model

    p = sub.add_parser("tiny-model", help="write a random-initialised MoE checkpoint (Hugging Face layout)")
    add_options(p, TinyModelSettings)

    def run(args: argparse.Namespace) -> int:
        s = settings_from(TinyModelSettings, args, {})
        print(f"wrote {write_tiny_model(s.out, s.spec())}")
        return 0

    return run


def _add_train(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from moemesh.train.recipe import TrainSettings

    p = sub.add_parser("train", help="train the default model (a small MoE on Shakespeare; docs/training.md)")
    add_options(p, TrainSettings)

    def run(args: argparse.Namespace) -> int:
        from moemesh.train.export import export
        from moemesh.train.recipe import train

        s = settings_from(TrainSettings, args, {})
        model, corpus, result = train(s, say=lambda line: print(line, flush=True))
        print(f"wrote {export(model, s, corpus, result)}: held-out {result.held_out_bits_per_byte:.3f} bits/byte "
              f"(unigram {result.unigram_bits_per_byte:.3f}) after {result.steps} steps in {result.seconds:.0f} s")
        return 0

    return run


def _token_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--token-ids wants comma-separated integers: {exc}") from exc


@dataclass(frozen=True)
class GenerateSettings:
    """`moemesh generate`: where (--local with --model, or --target) and what (--prompt or --token-ids).
    A one-shot tool: flags only (no MOEMESH_* variables), so its command line says what ran."""

    ENV_PREFIX: ClassVar[str | None] = None

    local: bool = option("--local", "run the engine in this process (needs --model)", parse_bool, default=False)
    target: str | None = option("--target", "a running gateway", default=None, metavar="HOST:PORT")
    model: Path | None = option("--model", "checkpoint folder (for --local)", Path, default=None)
    prompt: str | None = option("--prompt", "prompt text", default=None)
    token_ids: tuple[int, ...] | None = option("--token-ids", "prompt as comma-separated token ids", _token_ids,
                                               default=None)
    max_new_tokens: int = option("--max-new-tokens", "tokens to generate", int, default=32)
    temperature: float = option("--temperature", "0 = greedy", float, default=0.0)
    top_p: float = option("--top-p", "nucleus sampling mass (1 = off)", float, default=1.0)
    top_k: int = option("--top-k", "sample among the k likeliest tokens (0 = off)", int, default=0)
    seed: int | None = option("--seed", "sampling seed (none: unseeded)", int, default=None)
    timeout_s: float = option("--timeout", "deadline in seconds (--target)", float, default=120.0)
    json: bool = option("--json", 'print only {"token_ids": [...], "text": "..."}', parse_bool, default=False)
    tls_cert: Path | None = cert_option(env="MOEMESH_TLS_CERT")  # mTLS to the gateway (--target): all or none
    tls_key: Path | None = key_option(env="MOEMESH_TLS_KEY")
    tls_ca: Path | None = ca_option(env="MOEMESH_TLS_CA")
    api_key: str | None = option("--api-key", "API key sent as 'authorization: Bearer <key>' (prefer the variable: "
                                 "a command line is visible to other users)", default=None, env="MOEMESH_API_KEY",
                                 metavar="KEY")

    def __post_init__(self) -> None:
        tls_of(self)  # all three or none
        if self.local == (self.target is not None):
            raise ConfigError("give one of --local or --target HOST:PORT")
        if self.local and self.model is None:
            raise ConfigError("--local needs --model DIR")
        if (self.prompt is None) == (self.token_ids is None):
            raise ConfigError("give one of --prompt or --token-ids")


def _add_generate(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("generate", help="generate text, in this process (--local) or through a gateway")
    add_options(p, GenerateSettings)

    def run(args: argparse.Namespace) -> int:
        return _generate(settings_from(GenerateSettings, args, {}))

    return run


def _generate(s: GenerateSettings) -> int:
    from moemesh.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                            top_k=s.top_k, seed=s.seed)
    if s.target:
        from moemesh.client import generate_remote

        ids, text = generate_remote(s.target, s.prompt, s.token_ids, params, s.timeout_s, tls=tls_of(s),
                                    api_key=s.api_key)
    else:
        ids, text = _generate_local(s, params)
    print(json.dumps({"token_ids": ids, "text": text}) if s.json else text)
    return 0


def _generate_local(s: GenerateSettings, params) -> tuple[list[int], str]:
    import torch

    from moemesh.engine.engine import Engine, generate
    from moemesh.model.config import load_config
    from moemesh.model.decoder import RuntimeShape, build_model
    from moemesh.text import TextCodec

    assert s.model is not None, "GenerateSettings requires --model with --local"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(s.model)
    codec = TextCodec(s.model, cfg)
    prompt = list(s.token_ids) if s.token_ids is not None else codec.encode(s.prompt or "")
    model = build_model(s.model, RuntimeShape(max_seqs=1, max_model_len=min(cfg.max_position_embeddings, 4096)))
    ids = generate(Engine(model), [prompt], params)[0]
    return ids, codec.decode(ids)


def _add_certs(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from moemesh.certs import CertsSettings

    p = sub.add_parser("certs", help="write a CA and one mTLS certificate per role (coordinator, worker, gateway, "
                                     "admin, client) for tests and small clusters; never commit them")
    add_options(p, CertsSettings)

    def run(args: argparse.Namespace) -> int:
        from moemesh.certs import write_certs

        s = settings_from(CertsSettings, args, {})
        written = write_certs(s.out, s.nodes, s.days, overwrite=s.force)
        print(f"wrote a CA and certificates for {', '.join(written)} to {s.out} (keys 0600); each service takes "
              f"--tls-cert DIR/ROLE.pem --tls-key DIR/ROLE-key.pem --tls-ca DIR/ca.pem")
        return 0

    return run


@dataclass(frozen=True)
class ApiKeySettings:
    """`moemesh api-key`: a new key and its line for --api-keys-file. Flags only."""

    ENV_PREFIX: ClassVar[str | None] = None

    rpm: int | None = option("--rpm", "requests per minute this key may make (unset: no limit)", int, default=None)
    max_tokens: int | None = option("--max-tokens", "new tokens per request this key may ask for (unset: no limit)",
                                    int, default=None)
    name: str = option("--name", "a label for logs (no spaces)", default="")

    def __post_init__(self) -> None:
        for flag, value in (("--rpm", self.rpm), ("--max-tokens", self.max_tokens)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if any(c.isspace() or c == "#" for c in self.name):
            raise ConfigError(f"--name must have no spaces and no '#', got {self.name!r}")


def _add_api_key(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("api-key", help="print a new API key and its line for the gateway's --api-keys-file")
    add_options(p, ApiKeySettings)

    def run(args: argparse.Namespace) -> int:
        from moemesh.auth import new_key

        s = settings_from(ApiKeySettings, args, {})
        key, line = new_key(s.rpm, s.max_tokens, s.name)
        print(f"key:  {key}\nline: {line}")
        print("give the key to its client (authorization: Bearer <key>); append the line to --api-keys-file; "
              "the key itself is not stored anywhere", file=sys.stderr)
        return 0

    return run


def _commands(argv: list[str] | None = None) -> tuple:
    """Every subcommand; only `probe` for a probe (a healthcheck every few seconds must not import torch)."""
    from moemesh.probe import add_probe_command

    if (argv if argv is not None else sys.argv[1:])[:1] == ["probe"]:
        return (add_probe_command,)
    from coordinator.cli import add_coordinator_command, add_placement_command
    from expert_worker.cli import add_worker_command
    from gateway.cli import add_gateway_command
    from moemesh.bench_cli import add_bench_command
    from moemesh.compose_gpu import add_compose_gpu_command
    from moemesh.eval_cli import add_eval_command
    from moemesh.launcher import add_up_command
    from moemesh.planner.cli import add_plan_command
    from moemesh.simulate.cli import add_simulate_command
    from moemesh.top import add_top_command

    return (_add_tiny_model, _add_train, _add_generate, add_up_command, add_coordinator_command, add_worker_command,
            add_gateway_command, add_placement_command, add_plan_command, add_bench_command, add_simulate_command,
            _add_certs, _add_api_key, add_top_command, add_probe_command, add_compose_gpu_command, add_eval_command)


def main(argv: list[str] | None = None) -> int:
    return run(argv, _commands(argv), description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
