"""The `kvd` command line: serve, route, generate, status, trace, bench (docs/architecture.md,
"Interfaces users see").

    kvd serve --config conf/kvd.toml [--role unified|prefill|decode] [--port 0] [--run-dir DIR] [--http-port P]
    kvd generate [--endpoint E | --run-dir DIR] (--prompt TEXT | --chat TEXT) [--max-tokens N]
                 [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S] [--presence-penalty X]
                 [--frequency-penalty X] [--repetition-penalty X] [--min-tokens N] [--stop S ...] [--json]
    kvd status [--endpoint E | --run-dir DIR] [--json]
    kvd launch unified --instances N --run-dir DIR [--config FILE] [--http-port P]
    kvd launch pd --prefill N --decode M --pool local|mooncake|redis --run-dir DIR [--config FILE] [--http-port P]
    kvd route --config conf/route.toml [--run-dir DIR] [--http-port P]
    kvd trace REQUEST_ID [LOG ...]
    kvd bench offline|serve|serve_http|versus|pd|swap|pool|prefill_group|choices|soak|route|peers [ARGS ...]

Without --endpoint, the client commands read `<run_dir>/endpoint`, which `kvd serve`
writes once every process is Ready.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return args.endpoint
    from kvd.config import load_config, resolve_run_dir

    overrides = {"daemon.run_dir": args.run_dir} if args.run_dir else {}
    path = resolve_run_dir(load_config(None, overrides)) / "endpoint"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        sys.exit(f"kvd: no endpoint at {path}: is the daemon running? (or pass --endpoint)")


def cmd_serve(args: argparse.Namespace) -> int:
    from kvd.config import ConfigError, load_config
    from kvd.daemon.main import serve

    overrides = {}
    if args.role:
        overrides["daemon.role"] = args.role
    if args.port is not None:
        overrides["daemon.port"] = args.port
    if args.run_dir:
        overrides["daemon.run_dir"] = args.run_dir
    if args.http_port is not None:
        overrides["http.port"] = args.http_port
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"kvd: config: {e}", file=sys.stderr)
        return 2
    code = serve(cfg, os.environ.get("NOTIFY_SOCKET"))
    # The daemon has stopped its children and closed its sockets: exit without the
    # interpreter's teardown of torch and transformers (over a second), so that systemd
    # and `kvd launch` see the exit at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_route(args: argparse.Namespace) -> int:
    from kvd.config import ConfigError, load_config
    from kvd.daemon.notify import watchdog_interval
    from kvd.route.router import route

    overrides = {"daemon.run_dir": args.run_dir, "daemon.port": args.port, "http.port": args.http_port}
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"kvd: config: {e}", file=sys.stderr)
        return 2
    return route(cfg, os.environ.get("NOTIFY_SOCKET"), watchdog_interval(os.environ))


# SamplingParams fields `kvd generate` takes as flags (--top-p, ...), beside --max-tokens and --temperature.
SAMPLING_FLAGS = {"top_p": float, "top_k": int, "min_p": float, "seed": int, "presence_penalty": float,
                  "frequency_penalty": float, "repetition_penalty": float, "min_tokens": int}  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    from kvd.client import Client

    options = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    options |= {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.stop:
        options["stop"] = args.stop
    source = {"chat": [{"role": "user", "content": args.chat}]} if args.chat is not None else {"prompt": args.prompt}
    with Client(_endpoint(args), timeout=args.timeout) as c:
        if args.json:
            r = c.generate(**source, **options)
            print(json.dumps({"request_id": r.request_id, "token_ids": r.token_ids, "text": r.text,
                              "finish_reason": r.finish_reason}))  # fmt: skip
            return 0
        finish = None
        for chunk in c.stream(**source, **options):
            print(chunk.text, end="", flush=True)
            finish = chunk.finish_reason
        print(f"\n[{finish}]", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from kvd.client import Client

    with Client(_endpoint(args), timeout=args.timeout) as c:
        status = c.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    if status.get("role") == "router":
        return _print_router_status(status)
    blocks = status["blocks"]
    print(f"kvd {status['role']} · {status['state']} · {status['endpoint']} · up {status['uptime_s']:.0f} s")
    print(f"requests   queue {status['queue']}  running {status['running']}  live {status['live_requests']}")
    print(f"blocks     total {blocks.get('total', 0)}  free {blocks.get('free', 0)}  used {blocks.get('held', 0)}"
          f"  cached-only {blocks.get('cached_only', 0)}")  # fmt: skip
    print(f"prefix     hit rate {status['prefix_hit_rate']:.1%}   preemptions {status['preemptions']}")
    print(f"throughput {status['throughput_tok_s']:.1f} tok/s   generated {status['generated_tokens']} tokens")
    print(f"integrity  {status['integrity']}")
    if status.get("not_ready"):
        print(f"not ready  {'; '.join(status['not_ready'])}")
    procs = "  ".join(f"{n} pid {p['pid']} {'up' if p['alive'] else 'DOWN'}" for n, p in status["processes"].items())
    print(f"processes  {procs}")
    return 0


def _print_router_status(status: dict) -> int:
    print(f"kvd router · {status['state']} · {status['endpoint']} · {status['http_url']} · "
          f"up {status['uptime_s']:.0f} s")  # fmt: skip
    print(f"requests   live {status['live_requests']}   policy {status['policy']}   "
          f"prefix hit rate {status['prefix_hit_rate']:.1%}")  # fmt: skip
    for name, i in status["instances"].items():
        load = i.get("load")
        reported = (f"  queue {load['waiting']} running {load['running']} free {load['free_blocks']}"
                    f" cached {load.get('cached_blocks', 0)}" if load else "")  # fmt: skip
        print(f"instance   {name} {'up' if i['up'] else 'DOWN'}  in flight {i['in_flight']}{reported}"
              f"  requests {i['requests']}  failovers {i['failovers']}  errors {i['errors']}"
              f"  {i['endpoint'] or i['url']}")  # fmt: skip
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvd.launch import launch_pd, launch_unified

    if args.kind == "unified":
        return launch_unified(args.instances, Path(args.run_dir), args.config, args.http_port)
    return launch_pd(args.prefill, args.decode, args.pool, Path(args.run_dir), args.config, args.redis_url,
                     args.http_port)


def cmd_trace(args: argparse.Namespace) -> int:
    from kvd import trace

    return trace.main([args.request_id, *args.logs])


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    sys.argv = [f"kvd bench {args.kind}", *args.rest]
    runpy.run_module(f"kvd.bench.{args.kind}", run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvd", description="KV-cache-centric LLM inference daemon")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--config", help="a TOML file (conf/kvd.toml documents every option)")
    s.add_argument("--role", choices=["unified", "prefill", "decode"])
    s.add_argument("--port", type=int, help="client port; 0 = a random free port on 127.0.0.1")
    s.add_argument("--run-dir", help="where the endpoint file goes")
    s.add_argument("--http-port", type=int, help="also serve the OpenAI HTTP API; 0 = a random free port")
    s.set_defaults(fn=cmd_serve)

    r = sub.add_parser("route", help="the client and OpenAI HTTP APIs in front of several instances, KV-cache aware")
    r.add_argument("--config", help="a TOML file ([route] lists the instances; conf/route.toml)")
    r.add_argument("--run-dir", help="where the endpoint and http_endpoint files go")
    r.add_argument("--port", type=int, help="its ZeroMQ client API; 0 = a random free port (default: [daemon] port)")
    r.add_argument("--http-port", type=int, help="0 = a random free port (default: [http] port)")
    r.set_defaults(fn=cmd_route)

    for name, fn, help_ in (("generate", cmd_generate, "stream a completion"), ("status", cmd_status, "daemon status")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--endpoint", help="tcp://127.0.0.1:PORT (default: read from the run dir)")
        c.add_argument("--run-dir")
        c.add_argument("--json", action="store_true")
        c.add_argument("--timeout", type=float, default=600.0 if name == "generate" else 10.0,
                       help="seconds to wait for the daemon's reply")
        c.set_defaults(fn=fn)
        if name == "generate":
            src = c.add_mutually_exclusive_group(required=True)
            src.add_argument("--prompt")
            src.add_argument("--chat", help="a user message; the model's chat template is applied")
            c.add_argument("--max-tokens", type=int, default=128)
            c.add_argument("--temperature", type=float, default=0.0)
            for name, kind in SAMPLING_FLAGS.items():
                c.add_argument("--" + name.replace("_", "-"), type=kind)
            c.add_argument("--stop", action="append", help="a stop string (repeatable)")

    la = sub.add_parser("launch", help="start a whole deployment on this host, `kvd route` in front")
    kinds = la.add_subparsers(dest="kind", required=True)
    lu = kinds.add_parser("unified", help="unified instances behind the router")
    lu.add_argument("--instances", type=int, default=1, help="unified instances")
    lp = kinds.add_parser("pd", help="prefill and decode instances, the router in front of the decode ones")
    lp.add_argument("--prefill", type=int, default=1, help="prefill instances")
    lp.add_argument("--decode", type=int, default=1, help="decode instances")
    lp.add_argument("--pool", choices=["local", "mooncake", "redis"], default="local")
    lp.add_argument("--redis-url", help="use this Redis server instead of starting one")
    for kind in (lu, lp):
        kind.add_argument("--run-dir", required=True, help="DIR/http_endpoint and DIR/endpoint get the router's "
                                                           "URL and client endpoint")  # fmt: skip
        kind.add_argument("--config", help="a TOML file every process starts from (role, ports and run dir "
                                           "are set per process)")  # fmt: skip
        kind.add_argument("--http-port", type=int, help="the router's OpenAI HTTP API (default: the config's "
                                                        "[http] port; 0 = a random free port)")  # fmt: skip
        kind.set_defaults(fn=cmd_launch)

    t = sub.add_parser("trace", help="rebuild a request's timeline from JSON logs")
    t.add_argument("request_id")
    t.add_argument("logs", nargs="*", help="JSON-lines log files (default: stdin)")
    t.set_defaults(fn=cmd_trace)

    b = sub.add_parser("bench", help="benchmarks: offline (engine vs transformers) or serve (daemon)")
    b.add_argument("kind", choices=["offline", "serve", "serve_http", "versus", "pd", "swap", "pool",
                                      "prefill_group", "choices", "soak", "route", "peers"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> None:
    """Every failure is one line on stderr and a non-zero exit, never a traceback."""
    from kvd.client import KvdError

    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
    except KvdError as e:
        print(f"kvd: error {e.code}: {e.message}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except (OSError, ValueError) as e:
        print(f"kvd: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
