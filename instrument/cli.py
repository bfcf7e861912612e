"""``tokentrace instrument -- <command>``: run a command with the vLLM plugin's
environment set, like ``opentelemetry-instrument``."""

from __future__ import annotations

import argparse
import os
import shutil

from tokentrace.instrument.tracing import TOKEN_SPANS_HELP, TOKEN_SPANS_MODES
from tokentrace.instrument.vllm_plugin import NIXL_PROGRESS_THREAD_ENV, ROLE_ENV

PLUGIN_NAME = "tokentrace"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "instrument",
        help="run a command (e.g. a vLLM server) with tokentrace's vLLM plugin enabled",
        description=(
            "Run COMMAND with the environment that makes tokentrace's vLLM plugin trace it: "
            "TOKENTRACE_OTLP_ENDPOINT, TOKENTRACE_NODE_ID, TOKENTRACE_ROLE, and "
            "tokentrace added to VLLM_PLUGINS when that list is set. Example: tokentrace "
            "instrument --otlp-endpoint http://collector:4317 --node-id gpu-3 --role decode "
            "-- python -m vllm.entrypoints.openai.api_server --model ..."
        ),
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        help="OTLP/gRPC endpoint; https:// for TLS, verified against "
        "$OTEL_EXPORTER_OTLP_CERTIFICATE if set (default: $TOKENTRACE_OTLP_ENDPOINT, "
        "then $OTEL_EXPORTER_OTLP_ENDPOINT)",
    )
    parser.add_argument("--node-id", default=None, help="node identity (default: host name)")
    parser.add_argument(
        "--role",
        choices=["prefill", "decode", "both"],
        default=None,
        help="this server's role in the P/D split (default: decode)",
    )
    parser.add_argument(
        "--nixl-progress-thread",
        choices=["on", "off"],
        default=None,
        help="keep NIXL's progress thread (default: off on CPU, on on GPU)",
    )
    parser.add_argument(
        "--token-spans",
        choices=TOKEN_SPANS_MODES,
        default=None,
        help=TOKEN_SPANS_HELP,
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    parser.set_defaults(func=run)


def instrumented_env(args: argparse.Namespace, base: dict[str, str]) -> dict[str, str]:
    """``base`` with the plugin's variables set from ``args``."""
    env = dict(base)
    endpoint = (
        args.otlp_endpoint
        or env.get("TOKENTRACE_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if endpoint:
        env["TOKENTRACE_OTLP_ENDPOINT"] = endpoint
    if args.node_id:
        env["TOKENTRACE_NODE_ID"] = args.node_id
    if args.role:
        env[ROLE_ENV] = args.role
    if args.token_spans:
        env["TOKENTRACE_TOKEN_SPANS"] = args.token_spans
    if args.nixl_progress_thread:
        env[NIXL_PROGRESS_THREAD_ENV] = "1" if args.nixl_progress_thread == "on" else "0"
    plugins = env.get("VLLM_PLUGINS")
    if plugins is not None and PLUGIN_NAME not in plugins.split(","):
        env["VLLM_PLUGINS"] = ",".join(p for p in (plugins, PLUGIN_NAME) if p)
    return env


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("tokentrace instrument: give the command to run after --")
        return 2
    if shutil.which(command[0]) is None and not os.path.exists(command[0]):
        print(f"tokentrace instrument: command not found: {command[0]}")
        return 127
    os.execvpe(command[0], command, instrumented_env(args, dict(os.environ)))
