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

from moemesh.commands import run
from moemesh.errors import MoemeshError


@dataclass(frozen=True)
class GenerateSettings:
    model: Path | None
    target: str | None
    prompt: str | None
    token_ids: tuple[int, ...] | None
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    json: bool
    timeout_s: float


def _add_tiny_model(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from moemesh.model.tiny import add_tiny_model_args

    p = sub.add_parser("tiny-model", help="write a random-initialised MoE checkpoint (Hugging Face layout)")
    add_tiny_model_args(p)

    def run(args: argparse.Namespace) -> int:
        from moemesh.model.tiny import spec_from_args, write_tiny_model

        out = write_tiny_model(args.out, spec_from_args(args))
        print(f"wrote {out}")
        return 0

    return run


def _token_ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--token-ids wants comma-separated integers: {exc}") from exc


def _add_generate(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser("generate", help="generate text, in this process (--local) or through a gateway")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="run the engine in this process (needs --model)")
    where.add_argument("--target", metavar="HOST:PORT", help="a running gateway")
    p.add_argument("--model", type=Path, help="checkpoint folder (for --local)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="prompt text")
    what.add_argument("--token-ids", type=_token_ids, help="prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (--target)")
    p.add_argument("--json", action="store_true", help='print only {"token_ids": [...], "text": "..."}')

    def run(args: argparse.Namespace) -> int:
        if args.local and args.model is None:
            raise MoemeshError("--local needs --model DIR")
        settings = GenerateSettings(
            model=args.model, target=args.target, prompt=args.prompt, token_ids=args.token_ids,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, json=args.json, timeout_s=args.timeout,
        )
        return _generate(settings)

    return run


def _generate(s: GenerateSettings) -> int:
    from moemesh.engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                            top_k=s.top_k, seed=s.seed)
    if s.target:
        from moemesh.client import generate_remote

        ids, text = generate_remote(s.target, s.prompt, s.token_ids, params, s.timeout_s)
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

    assert s.model is not None, "--local needs --model (checked when the flags are read)"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(s.model)
    codec = TextCodec(s.model, cfg)
    prompt = list(s.token_ids) if s.token_ids is not None else codec.encode(s.prompt or "")
    model = build_model(s.model, RuntimeShape(max_seqs=1, max_model_len=min(cfg.max_position_embeddings, 4096)))
    ids = generate(Engine(model), [prompt], params)[0]
    return ids, codec.decode(ids)


def _commands() -> tuple:
    from coordinator.cli import add_coordinator_command, add_placement_command
    from expert_worker.cli import add_worker_command
    from gateway.cli import add_gateway_command
    from moemesh.bench_cli import add_bench_command
    from moemesh.launcher import add_up_command
    from moemesh.planner.cli import add_plan_command
    from moemesh.simulate.cli import add_simulate_command

    return (_add_tiny_model, _add_generate, add_up_command, add_coordinator_command, add_worker_command,
            add_gateway_command, add_placement_command, add_plan_command, add_bench_command, add_simulate_command)


def main(argv: list[str] | None = None) -> int:
    return run(argv, _commands(), description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
